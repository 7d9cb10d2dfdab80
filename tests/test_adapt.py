"""Teacher adaptation: a headless tiny BERT gets a working MLM head (held-out perplexity falls), the output
loads as a teacher with an MLM head, adapt.json is written, and the shared loop's resume works here too."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distilkit.adapt import adapt_teacher
from distilkit.cli import main
from distilkit.config import AdaptConfig
from distilkit.corpus import prepare_corpus
from distilkit.distill import latest_checkpoint
from distilkit.models import has_mlm_head, load_teacher


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tiny_teacher_no_head, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt_corpus") / "c"
    prepare_corpus(str(tiny_teacher_no_head), [str(tiny_text_file)], str(out), block_size=32, heldout_fraction=0.15,
                   progress=False)
    return out


def test_adapt_teacher_learns_masked_lm(tiny_teacher_no_head, corpus, tmp_path):
    assert not has_mlm_head(str(tiny_teacher_no_head))
    out = tmp_path / "adapted"
    cfg = AdaptConfig(steps=60, batch_size=8, lr=3e-3, warmup_ratio=0.0, save_every=30, log_every=10, eval_batches=None)
    r = adapt_teacher(str(tiny_teacher_no_head), str(corpus), str(out), cfg)
    before, after = r["before"], r["after"]
    assert before["n_masked"] == after["n_masked"] > 50  # identical masks
    assert after["perplexity"] < 0.7 * before["perplexity"], (before, after)
    assert after["mlm_accuracy"] > before["mlm_accuracy"], (before, after)
    assert json.loads((out / "adapt.json").read_text())["after"] == after
    # OUT is a BertForMaskedLM folder with an MLM head (tied to the word embeddings)
    model, had_head = load_teacher(str(out))
    assert had_head and type(model).__name__ == "BertForMaskedLM"
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    # the whole model was trained, not only the head
    start = load_file(str(tiny_teacher_no_head / "model.safetensors"))
    end = load_file(str(out / "model.safetensors"))
    layer = next(k for k in start if "encoder.layer.0.attention.self.query.weight" in k)
    assert not torch.equal(start[layer], end["bert." + layer if not layer.startswith("bert.") else layer])
    assert r["config"]["lr"] == 3e-3 and r["teacher_had_mlm_head"] is False
    # the resolved precision is recorded ("auto" -> bf16 where the device computes bf16 natively, else no)
    assert r["mixed_precision"] in ("bf16", "no") and r["config"]["mixed_precision"] == "auto"
    assert json.loads((out / "adapt.json").read_text())["mixed_precision"] == r["mixed_precision"]


def test_adapt_cli_resume_is_exact(tiny_teacher_no_head, corpus, tmp_path, capsys):
    import shutil

    def run(out, *extra):
        return main(["adapt-teacher", "--teacher", str(tiny_teacher_no_head), "--corpus", str(corpus), "--out", str(out),
                     "--steps", "8", "--set", "batch_size=4", "--set", "save_every=4", "--set", "eval_batches=1", *extra])

    assert run(tmp_path / "full") == 0
    assert "held-out MLM top-1" in capsys.readouterr().out
    # a run that stopped after its step-4 checkpoint: a complete run with everything later removed
    assert run(tmp_path / "cut") == 0
    ckpts = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000008"]
    shutil.rmtree(ckpts[-1])
    for name in ("model.safetensors", "config.json", "adapt.json"):
        (tmp_path / "cut" / name).unlink()
    assert run(tmp_path / "cut", "--resume") == 0
    assert json.loads((tmp_path / "cut" / "adapt.json").read_text())["resumed_from"].endswith("step-00000004")
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000008"


def test_adapt_config_defaults():
    cfg = AdaptConfig()
    assert cfg.lr == 1e-4 and cfg.steps == 200 and not hasattr(cfg, "alpha_ce")
