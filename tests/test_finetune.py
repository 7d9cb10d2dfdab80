"""Fine-tuning / evaluation: batching and losses, end-to-end runs on tiny BERT teachers and DistilBERT students."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distilkit.cli import main
from distilkit.config import FinetuneConfig
from distilkit.finetune import (
    Features,
    distill_loss,
    evaluate,
    finetune,
    input_names,
    length_grouped_batches,
    load_classifier,
    sorted_batches,
    subset_indices,
    tokenize,
)
from distilkit.tasks import TASKS, get_task, load_split
from distilkit.utils import DistilkitError, sha256_file
from test_tasks import write_task_files

RESULT_KEYS = {
    "task", "model", "model_resolved", "model_fingerprint", "metric_names", "score_name", "seeds", "score",
    "config", "data", "wall_s", "distilkit_version", "git_commit", "torch", "transformers",
}
SEED_KEYS = {"seed", "metrics", "score", "train_wall_s", "train_examples_per_s", "eval_examples_per_s", "n_train", "n_eval"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory) -> Path:
    from distilkit.student import init_student

    out = tmp_path_factory.mktemp("student") / "student"
    init_student(tiny_teacher, out)
    return out


@pytest.fixture(scope="module")
def models(tiny_teacher, student) -> dict[str, Path]:
    return {"teacher": tiny_teacher, "student": student}


def quick(**kw) -> FinetuneConfig:
    """Settings that let a tiny model learn the fixture's 'good' vs 'bad' signal in a second or two."""
    base = dict(seeds=[1], epochs=3, lr=2e-3, batch_size=8, max_length=48, eval_batch_size=16)
    return FinetuneConfig(**{**base, **kw})


# --------------------------------------------------------------------------- batching, subsets, losses


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    rng_lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    batches = length_grouped_batches(rng_lengths, 16, np.random.default_rng(1), mega_batch=5)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000)) and len(batches) == math.ceil(1000 / 16)
    # within a batch lengths are close: padding waste far below random batching
    waste = sum(rng_lengths[b].max() * len(b) - rng_lengths[b].sum() for b in batches)
    random_waste = sum(rng_lengths[b].max() * len(b) - rng_lengths[b].sum() for b in np.array_split(np.arange(1000), 63))
    assert waste < 0.25 * random_waste
    same = length_grouped_batches(rng_lengths, 16, np.random.default_rng(1), mega_batch=5)
    assert all(np.array_equal(a, b) for a, b in zip(batches, same))
    other = length_grouped_batches(rng_lengths, 16, np.random.default_rng(2), mega_batch=5)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    ev = sorted_batches(rng_lengths, 100)
    assert [rng_lengths[b].max() for b in ev] == sorted((rng_lengths[b].max() for b in ev), reverse=True)


def test_subset_indices_is_seeded_random_not_first_n():
    idx = subset_indices(1000, 50, seed=0)
    assert len(idx) == 50 and len(set(idx)) == 50 and list(idx) == sorted(idx)
    assert list(idx) != list(range(50))
    assert np.array_equal(idx, subset_indices(1000, 50, seed=0))
    assert not np.array_equal(idx, subset_indices(1000, 50, seed=1))
    assert np.array_equal(subset_indices(10, None, 0), np.arange(10)) and len(subset_indices(10, 99, 0)) == 10


def test_distill_loss_matches_formula():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 3), torch.randn(5, 3), 2.0
    ps, pt = F.softmax(s / T, -1), F.softmax(t / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert distill_loss(TASKS["sst2"], s, t, T).item() == pytest.approx(kl.item(), abs=1e-6)
    assert distill_loss(TASKS["stsb"], s[:, :1], t[:, :1], T).item() == pytest.approx(((s[:, 0] - t[:, 0]) ** 2).mean().item(), abs=1e-6)


def test_pair_token_types_and_distilbert_inputs(data, tiny_teacher, student):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ex = load_split("mrpc", data, "dev")[:4]
    feats = tokenize(ex, tok, 48, "head")
    for ids, types in zip(feats.input_ids, feats.token_type_ids):
        first_sep = ids.index(tok.sep_token_id)
        assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    assert input_names(load_classifier(str(tiny_teacher), get_task("mrpc"))) == ("input_ids", "attention_mask", "token_type_ids")
    assert input_names(load_classifier(str(student), get_task("mrpc"))) == ("input_ids", "attention_mask")


def test_head_tail_tokenization(tiny_teacher):
    from transformers import AutoTokenizer

    from distilkit.tasks import Example

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    words = [w for w in ("the a of to and in is was it that for on with as by at from his her he she they " * 20).split()]
    feats = tokenize([Example(" ".join(words), None, 1)], tok, 34, "head_tail")
    ids = feats.input_ids[0]
    full = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == 34 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:9] == full[:8] and ids[9:-1] == full[-24:]  # 32 content tokens: 8 head + 24 tail


# --------------------------------------------------------------------------- end to end


def _check_results(r: dict, task: str, model: Path, out: Path, data: Path, cfg: FinetuneConfig) -> None:
    t = get_task(task)
    assert RESULT_KEYS <= set(r)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))
    assert (r["task"], r["model"], r["model_resolved"]) == (task, str(model), str(model))
    assert re.fullmatch(r"[0-9a-f]{16}", r["model_fingerprint"])
    assert r["metric_names"] == list(t.metric_names) and r["score_name"] == t.score_name
    assert [s["seed"] for s in r["seeds"]] == cfg.seeds
    for s in r["seeds"]:
        assert SEED_KEYS <= set(s)
        assert set(s["metrics"]) == set(t.metric_names)
        assert s["score"] == pytest.approx(t.score_fn(s["metrics"]))
        assert s["n_train"] == min(48, cfg.max_train or 48) and s["n_eval"] == min(24, cfg.max_eval or 24)
        assert s["train_examples_per_s"] > 0 and s["eval_examples_per_s"] > 0 and s["train_wall_s"] > 0
    scores = [s["score"] for s in r["seeds"]]
    assert r["score"] == {"median": pytest.approx(float(np.median(scores))), "min": min(scores), "max": max(scores), "n": len(scores)}
    assert r["config"]["seeds"] == cfg.seeds and r["config"]["max_train"] == cfg.max_train
    assert r["config"]["max_eval"] == cfg.max_eval and r["config"]["distill_from"] == cfg.distill_from
    for split in ("train", "eval"):
        rec = r["data"][split]
        assert rec["files"] and all(sha256_file(data / f) == h for f, h in rec["files"].items())
        assert rec["n_total"] == (48 if split == "train" else 24)
    assert r["data"]["train"]["n_used"] == r["seeds"][0]["n_train"]


@pytest.mark.parametrize(
    "task,kind",
    [("sst2", "teacher"), ("sst2", "student"), ("mrpc", "teacher"), ("rte", "student"),
     ("stsb", "teacher"), ("stsb", "student"), ("imdb", "student")],
)
def test_finetune_end_to_end(tmp_path, data, models, task, kind):
    model = models[kind]
    cfg = quick()
    out = tmp_path / "run"
    r = finetune(str(model), task, str(data), str(out), cfg)
    _check_results(r, task, model, out, data, cfg)
    losses = r["seeds"][0]["train_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns
    assert r["hparams"]["max_length"] == 48
    assert r["hparams"]["truncation"] == ("head_tail" if task == "imdb" else "head")
    # the saved model scores the same through `evaluate`
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    ev = evaluate(str(out / "model"), task, str(data), batch_size=cfg.eval_batch_size, out=str(tmp_path / "eval.json"))
    assert ev["n_eval"] == 24 and ev["max_length"] == 48
    for k, v in r["seeds"][0]["metrics"].items():
        assert ev["metrics"][k] == pytest.approx(v, abs=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == ev["metrics"]


def test_learns_the_signal(tmp_path, data, tiny_teacher):
    r = finetune(str(tiny_teacher), "sst2", str(data), str(tmp_path / "r"), quick(epochs=10, lr=5e-3))
    assert r["seeds"][0]["metrics"]["accuracy"] >= 0.9


def test_same_seed_same_numbers_and_subsets(tmp_path, data, student):
    cfg = quick(seeds=[1, 2], max_train=32, max_eval=16, save_models="all")
    a = finetune(str(student), "mrpc", str(data), str(tmp_path / "a"), cfg)
    b = finetune(str(student), "mrpc", str(data), str(tmp_path / "b"), cfg)
    _check_results(a, "mrpc", student, tmp_path / "a", data, cfg)
    assert [s["metrics"] for s in a["seeds"]] == [s["metrics"] for s in b["seeds"]]
    assert [s["train_loss"] for s in a["seeds"]] == [s["train_loss"] for s in b["seeds"]]
    assert [s["finetuned_fingerprint"] for s in a["seeds"]] == [s["finetuned_fingerprint"] for s in b["seeds"]]
    assert a["seeds"][0]["finetuned_fingerprint"] != a["seeds"][1]["finetuned_fingerprint"]
    assert a["seeds"][0]["train_loss"] != a["seeds"][1]["train_loss"]
    assert a["data"]["train"]["n_used"] == 32 and a["data"]["eval"]["n_used"] == 16
    assert a["saved_models"] == {"1": "model", "2": "seed-2"}
    assert (tmp_path / "a" / "seed-2" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "a" / "seed-2" / "distilkit_finetune.json").read_text())
    assert meta["seed"] == 2 and meta["task"] == "mrpc"


@pytest.fixture(scope="module")
def finetuned_teachers(tmp_path_factory, data, tiny_teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft_teachers")
    for task in ("sst2", "stsb"):
        finetune(str(tiny_teacher), task, str(data), str(root / task), quick(epochs=10, lr=5e-3))
    return {task: root / task / "model" for task in ("sst2", "stsb")}


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_distill_from_teacher(tmp_path, data, student, finetuned_teachers, task):
    teacher = finetuned_teachers[task]
    plain = finetune(str(student), task, str(data), str(tmp_path / "plain"), quick())
    off = finetune(str(student), task, str(data), str(tmp_path / "off"), quick(distill_from=str(teacher), alpha_kd=0.0))
    kd = finetune(str(student), task, str(data), str(tmp_path / "kd"), quick(distill_from=str(teacher), alpha_kd=0.7, temperature=3.0))
    _check_results(kd, task, student, tmp_path / "kd", data, quick(distill_from=str(teacher)))
    # alpha 0: the teacher runs but does not change the student; alpha > 0: it does
    assert off["seeds"][0]["finetuned_fingerprint"] == plain["seeds"][0]["finetuned_fingerprint"]
    assert kd["seeds"][0]["finetuned_fingerprint"] != plain["seeds"][0]["finetuned_fingerprint"]
    assert kd["seeds"][0]["train_loss"] != plain["seeds"][0]["train_loss"]
    assert kd["config"]["alpha_kd"] == 0.7 and kd["distill_from_resolved"] == str(teacher)
    assert re.fullmatch(r"[0-9a-f]{16}", kd["distill_from_fingerprint"])


def test_distill_from_checks_teacher(tmp_path, data, student, finetuned_teachers):
    with pytest.raises(DistilkitError, match=r"the --distill-from teacher was fine-tuned on sst2 \(its distilkit_finetune.json\), not stsb"):
        finetune(str(student), "stsb", str(data), str(tmp_path / "x"), quick(distill_from=str(finetuned_teachers["sst2"])))
    with pytest.raises(DistilkitError, match=r"expected a teacher fine-tuned on stsb \(1 output\(s\)\), got 2"):
        finetune(str(student), "stsb", str(data), str(tmp_path / "x"), quick(distill_from=str(finetuned_teachers["sst2"])),
                 allow_task_mismatch=True)
    with pytest.raises(DistilkitError, match=r"expected a model fine-tuned on sst2 \(no distilkit_finetune.json"):
        finetune(str(student), "sst2", str(data), str(tmp_path / "x"), quick(distill_from=str(student)))
    from transformers import AutoTokenizer, BertTokenizerFast

    other = tmp_path / "other_vocab"  # the same teacher with a tokenizer missing three word pieces
    shutil.copytree(finetuned_teachers["sst2"], other)
    vocab = AutoTokenizer.from_pretrained(other).get_vocab()
    kept = sorted(vocab, key=vocab.get)[:-3]
    for f in other.glob("tokenizer*"):
        f.unlink()
    BertTokenizerFast(vocab={tok: i for i, tok in enumerate(kept)}).save_pretrained(other)  # 5.x: `vocab`, not `vocab_file`
    with pytest.raises(DistilkitError, match="vocabulary differs from the student's"):
        finetune(str(student), "sst2", str(data), str(tmp_path / "y"), quick(distill_from=str(other)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_runs_after_an_accelerator_with_other_settings(tmp_path, data, student):
    """Accelerate's process-wide state refuses changes; a pipeline distills (e.g. bf16), then fine-tunes in fp32."""
    from accelerate.state import AcceleratorState

    from distilkit.finetune import _accelerator

    _accelerator("bf16")
    assert AcceleratorState().mixed_precision == "bf16"
    r = finetune(str(student), "sst2", str(data), str(tmp_path / "r"), quick(epochs=1, mixed_precision="no"))
    assert r["device"] == "cpu" and r["seeds"][0]["steps"] == 6


def test_output_folder_and_config_errors(tmp_path, data, student):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DistilkitError, match="output folder exists and is not empty"):
        finetune(str(student), "sst2", str(data), str(out), quick())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for bad, msg in [
        (dict(save_models="best"), "save_models: expected first, all or none"),
        (dict(seeds=[1, 1]), r"seeds: \[1, 1\] repeats a seed"),
        (dict(max_train=0), "max_train: expected a positive number"),
        (dict(truncation="head_tail"), "head_tail is for single-text tasks; mrpc has sentence pairs"),
    ]:
        with pytest.raises(DistilkitError, match=msg):
            finetune(str(student), "mrpc", str(data), str(tmp_path / "n"), quick(**bad))
    assert not (tmp_path / "n").exists()


def test_cli_finetune_and_evaluate(tmp_path, data, tiny_teacher, capsys):
    out = tmp_path / "cli"
    rc = main(["finetune", "--model", str(tiny_teacher), "--task", "cola", "--data-dir", str(data), "--out", str(out),
               "--seeds", "3,4", "--epochs", "2", "--lr", "2e-3", "--batch-size", "8", "--max-length", "32",
               "--max-train", "40", "--set", "eval_batch_size=8"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "seed 3: matthews_corr" in stdout and "seed 4:" in stdout and "cola mcc x100: median" in stdout
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["seeds"] == [3, 4] and r["config"]["eval_batch_size"] == 8 and r["hparams"]["max_length"] == 32
    assert r["data"]["train"]["n_used"] == 40 and list(r["data"]["train"]["files"]) == ["cola/glue/train.tsv"]
    assert sorted(p.name for p in out.iterdir()) == ["model", "results.json"]
    assert main(["evaluate", "--model", str(out / "model"), "--task", "cola", "--data-dir", str(data)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["metrics"]["matthews_corr"] == pytest.approx(r["seeds"][0]["metrics"]["matthews_corr"], abs=1e-6)
    assert f"-> {out / 'eval.json'}" in capsys.readouterr().out


# --------------------------------------------------------------------------- real model, real data


@pytest.mark.slow
@pytest.mark.data
def test_minilm_cola_2000_reaches_mcc(shared_data, tmp_path):
    """MiniLM (BERT, 6 layers) fine-tuned on 2,000 GLUE CoLA train sentences: MCC > 0.1 on the full dev set."""
    start = time.perf_counter()
    r = finetune("minilm", "cola", str(shared_data), str(tmp_path / "cola"),
                 FinetuneConfig(seeds=[1], epochs=3, lr=5e-5, batch_size=16, max_train=2000, save_models="none"))
    wall = time.perf_counter() - start
    s = r["seeds"][0]
    print(f"\nminilm cola 2000: MCC {s['metrics']['matthews_corr']:.4f}, train {s['train_wall_s']:.0f}s, total {wall:.0f}s")
    assert s["n_train"] == 2000 and s["n_eval"] == 1043
    assert s["metrics"]["matthews_corr"] > 0.1
    assert wall < 600


def test_cli_config_file_section_and_flag_precedence(tmp_path, data, student):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("finetune:\n  epochs: 1\n  lr: 0.002\n  batch_size: 8\n  max_length: 32\n  max_train: 16\n  max_eval: 8\n")
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(student), "--task", "rte", "--data-dir", str(data), "--out", str(out),
                 "--config", str(cfg), "--set", "batch_size=4", "--max-train", "12", "--save-models", "none"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["config"]["epochs"], r["config"]["batch_size"], r["config"]["max_train"]) == (1, 4, 12)
    assert r["seeds"][0]["steps"] == 3 and r["saved_models"] == {} and not (out / "model").exists()


# --------------------------------------------------------------------------- MNLI's two dev sets, task checks


def test_mnli_scores_matched_and_mismatched(tmp_path, data, student):
    out = tmp_path / "mnli"
    r = finetune(str(student), "mnli", str(data), str(out), quick(max_eval=20))
    _check_results(r, "mnli", student, out, data, quick(max_eval=20))
    seed = r["seeds"][0]
    assert r["eval_split"] == "dev_matched" and r["data"]["eval"]["split"] == "dev_matched"
    assert list(r["data"]["eval"]["files"]) == ["mnli/dev_matched.tsv"]
    assert list(r["data"]["dev_mismatched"]["files"]) == ["mnli/dev_mismatched.tsv"]
    mm = seed["also_eval"]["dev_mismatched"]
    assert mm["n_eval"] == 20 and mm["score"] == pytest.approx(100 * mm["metrics"]["accuracy"])
    assert r["also_eval"]["dev_mismatched"] == {"median": mm["score"], "min": mm["score"], "max": mm["score"], "n": 1}
    # the fixture's two dev files hold the same rows: the same numbers, scored separately
    assert mm["metrics"] == seed["metrics"]
    from distilkit.report import read_results

    assert read_results(out / "results.json", "mnli")["median"] == seed["score"]  # matched is the paper's number
    ev = evaluate(str(out / "model"), "mnli", str(data), max_eval=20, batch_size=16)
    assert ev["metrics"]["accuracy"] == pytest.approx(seed["metrics"]["accuracy"], abs=1e-6)
    assert ev["also_eval"]["dev_mismatched"]["metrics"]["accuracy"] == pytest.approx(mm["metrics"]["accuracy"], abs=1e-6)


def test_evaluate_refuses_a_model_of_another_task(tmp_path, data, finetuned_teachers, capsys):
    model = finetuned_teachers["sst2"]
    eval_json = model.parent / "eval.json"
    assert main(["evaluate", "--model", str(model), "--task", "sst2", "--data-dir", str(data)]) == 0
    before = eval_json.read_bytes()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--task", "mrpc", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model was fine-tuned on sst2 (its distilkit_finetune.json), not mrpc" in err
    assert eval_json.read_bytes() == before  # the SST-2 score is not overwritten
    out = tmp_path / "mrpc-eval.json"
    assert main(["evaluate", "--model", str(model), "--task", "mrpc", "--data-dir", str(data), "--out", str(out),
                 "--allow-task-mismatch"]) == 0
    assert json.loads(out.read_text())["allow_task_mismatch"] is True


@pytest.mark.data
@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_real_rte_and_stsb_files_finetune(tmp_path, shared_data, tiny_teacher, task):
    """The real GLUE files of the newly added tasks go through finetune and evaluate (tiny model, small subsets)."""
    out = tmp_path / task
    r = finetune(str(tiny_teacher), task, str(shared_data), str(out), quick(epochs=1, max_train=64, max_eval=64))
    assert r["data"]["train"]["n_total"] == {"rte": 2490, "stsb": 5749}[task]
    assert r["data"]["eval"]["n_total"] == {"rte": 277, "stsb": 1500}[task] and r["seeds"][0]["n_eval"] == 64
    assert all(math.isfinite(x) for x in r["seeds"][0]["metrics"].values())
    ev = evaluate(str(out / "model"), task, str(shared_data), max_eval=64, batch_size=16)
    assert ev["score"] == pytest.approx(r["seeds"][0]["score"], abs=1e-4)
