"""Distillation loop: loss falls, exact resume (in-process and after SIGKILL), 2-process torchrun,
non-finite loss handling, batch plan / sharding, outputs, and (slow) MiniLM -> 3-layer student on WikiText-2."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distilkit import losses
from distilkit.config import DistillConfig, load_config
from distilkit.corpus import prepare_corpus
from distilkit.distill import (
    check_config,
    distill,
    epoch_order,
    latest_checkpoint,
    list_checkpoints,
    plan_training,
    rank_slice,
)
from distilkit.student import init_student
from distilkit.utils import DistilkitError

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_corpus(tiny_teacher, tiny_text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "c"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(out), block_size=32, heldout_fraction=0.15, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory) -> Path:
    """A 2-layer student of the tiny teacher, with dropout on so that resuming must restore the RNG."""
    out = tmp_path_factory.mktemp("student") / "s"
    init_student(str(tiny_teacher), str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(dropout=0.1, attention_dropout=0.1)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _env() -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES="": these subprocess tests are about CPU processes (gloo), also on a GPU machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "DISTILKIT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}


def sigkill_resume_matches_uninterrupted(args, tmp_path: Path, steps: int) -> None:
    """`distill` ARGS(OUT) in a separate process, SIGKILLed once its first checkpoint (step 10) is on disk, then
    resumed through the CLI (in this process, one thread like the killed one): the same weights as a run in one go."""
    from distilkit.cli import main

    first = tmp_path / "cut" / "checkpoints" / "step-00000010"
    victim = subprocess.Popen([sys.executable, "-m", "distilkit.cli", *args(tmp_path / "cut")], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert first.exists() and not (tmp_path / "cut" / "final").exists(), "the run was not killed mid-way"
    killed_at = latest_checkpoint(tmp_path / "cut")
    assert main(args(tmp_path / "cut", "--resume")) == 0
    assert main(args(tmp_path / "full")) == 0
    summary = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert summary["resumed_from"] == str(killed_at) and summary["steps"] == steps
    _assert_same_weights(tmp_path / "full" / "final", tmp_path / "cut" / "final")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- plan, sharding, config


def test_plan_accumulation_from_sequences_or_tokens():
    cfg = DistillConfig(batch_size=8, effective_batch=40)
    p = plan_training(cfg, n_blocks=1000, block_size=128, world_size=2)
    assert p.accumulation == 3 and p.sequences_per_step == 48 and p.micro_per_epoch == 62
    p = plan_training(DistillConfig(batch_size=8, effective_tokens=4096), 1000, 128, 1)
    assert p.accumulation == 4 and p.tokens_per_step == 4096
    p = plan_training(DistillConfig(batch_size=8, epochs=2.0), 1000, 128, 1)
    assert p.accumulation == 1 and p.steps == 250
    assert plan_training(DistillConfig(batch_size=8, steps=7), 1000, 128, 1).steps == 7
    with pytest.raises(DistilkitError, match="fewer than"):
        plan_training(DistillConfig(batch_size=8), 15, 128, 2)


def test_ranks_read_disjoint_blocks_and_order_is_seeded():
    order = epoch_order(100, seed=3, epoch=1)
    assert np.array_equal(order, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(order, epoch_order(100, seed=3, epoch=2))
    seen = np.concatenate([rank_slice(order, m, 4, 3, r) for m in range(8) for r in range(3)])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96


def test_config_checks_and_yaml():
    cfg = load_config(DistillConfig, "cpu", ["steps=10"], section="distill")  # a shipped preset's section
    assert (cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos, cfg.temperature, cfg.lr) == (5.0, 2.0, 1.0, 2.0, 5e-4)
    assert cfg.steps == 10 and cfg.betas == [0.9, 0.98]
    check_config(cfg)
    for bad in (["kl_positions=everywhere"], ["alpha_ce=0", "alpha_mlm=0", "alpha_cos=0"], ["mixed_precision=fp8"],
                ["effective_batch=64", "effective_tokens=8192"], ["mask_frac=0.95", "random_frac=0.1"]):
        with pytest.raises(DistilkitError):
            check_config(load_config(DistillConfig, None, bad))


# --------------------------------------------------------------------------- training


def test_loss_falls_and_outputs_are_complete(tiny_teacher, tiny_student, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    cfg = DistillConfig(steps=40, batch_size=8, lr=2e-3, save_every=20, log_every=5, eval_batches=None)
    r = distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), cfg)
    rows = _metrics(out)
    assert [m["step"] for m in rows] == list(range(5, 41, 5))
    assert set(rows[0]) >= {"step", "lr", "loss", "loss_ce", "loss_mlm", "loss_cos", "tokens", "tokens_per_s", "elapsed"}
    first, last = rows[0]["loss"], np.mean([m["loss"] for m in rows[-2:]])
    assert last < first - 0.1, (first, last)
    assert rows[-1]["tokens"] == 40 * 8 * 32 == r["tokens"]
    # held-out scores on identical masks; the student's perplexity went down
    ev = json.loads((out / "eval.json").read_text())
    assert ev["student_before"]["n_masked"] == ev["student_after"]["n_masked"] == ev["teacher"]["n_masked"] > 0
    assert ev["student_after"]["perplexity"] < ev["student_before"]["perplexity"]
    # the final student is a standard DistilBertForMaskedLM folder
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "final", use_safetensors=True)
    assert type(model).__name__ == "DistilBertForMaskedLM"
    assert AutoTokenizer.from_pretrained(out / "final").mask_token == "[MASK]"
    summary = json.loads((out / "distill.json").read_text())
    assert summary["world_size"] == 1 and summary["accumulation"] == 1 and summary["config"]["alpha_ce"] == 5.0
    assert summary["git_commit"] is not None or summary["distilkit_version"]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000020", "step-00000040"]
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["position"]["step"] == 40 and state["position"]["tokens"] == r["tokens"]
    # optimizer state is plain tensors: loadable without pickle
    torch.load(latest_checkpoint(out) / "optimizer.pt", weights_only=True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_in_process_resume_is_exact(tiny_teacher, tiny_student, tiny_corpus, tmp_path, monkeypatch, precision):
    """Bit-exact within one precision: fp32, and bf16 autocast (on CPU too)."""
    cfg = DistillConfig(steps=8, batch_size=4, effective_batch=8, lr=2e-3, save_every=3, keep_checkpoints=1,
                        log_every=1, smoothing=0.7, eval_batches=1, mixed_precision=precision)
    distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "full"), cfg)

    real = losses.compute_losses
    calls = {"n": 0}

    def crash_in_step_5(*args, **kwargs):  # 2 micro-steps per step: call 9 is in step 5
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "compute_losses", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "cut"), cfg)
    monkeypatch.setattr(losses, "compute_losses", real)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    assert not (tmp_path / "cut" / "final").exists()
    r = distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "cut"), cfg, resume=True)
    assert r["resumed_from"].endswith("step-00000003")
    _assert_same_weights(tmp_path / "full" / "final", tmp_path / "cut" / "final")
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == list(range(1, 9))
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    # a changed trajectory setting is refused
    with pytest.raises(DistilkitError, match="lr"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "cut"),
                DistillConfig(**{**cfg.__dict__, "lr": 1e-3}), resume=True)
    # and a non-empty --out without --resume too
    with pytest.raises(DistilkitError, match="not empty"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "cut"), cfg)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_teacher, tiny_student, tiny_corpus, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--corpus", str(tiny_corpus),
                "--out", str(out), "--set", "steps=120", "--set", "batch_size=4", "--set", "save_every=10",
                "--set", "lr=1e-3", "--set", "eval_batches=1", *extra]

    sigkill_resume_matches_uninterrupted(args, tmp_path, steps=120)
    assert not [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_torchrun_two_processes_stay_in_sync(tiny_teacher, tiny_student, tiny_corpus, tmp_path):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "distilkit.cli", "distill",
         "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--corpus", str(tiny_corpus), "--out", str(out),
         "--set", "steps=6", "--set", "batch_size=4", "--set", "effective_batch=16", "--set", "save_every=3",
         "--set", "eval_batches=1"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "distill.json").read_text())
    assert summary["world_size"] == 2
    assert summary["accumulation"] == 2 and summary["sequences_per_step"] == 16
    assert summary["tokens"] == 6 * 16 * 32
    fps = summary["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1] == summary["final_fingerprint"]
    ckpt = latest_checkpoint(out)
    assert (ckpt / "rng-rank0.safetensors").is_file() and (ckpt / "rng-rank1.safetensors").is_file()
    # the two ranks drew different masks (their RNG streams differ)
    r0, r1 = load_file(str(ckpt / "rng-rank0.safetensors")), load_file(str(ckpt / "rng-rank1.safetensors"))
    assert not torch.equal(r0["masking"], r1["masking"])


def test_attention_dropout_override_trains_like_a_student_configured_without_it(tiny_teacher, tiny_student, tiny_corpus, tmp_path):
    """attention_dropout=0 on a student configured with 0.1 == the same student configured with 0 (other
    dropouts off: then training is deterministic); the saved model keeps its configured 0.1."""
    from distilkit.models import load_student, set_attention_dropout

    students = {}
    for p in (0.1, 0.0):
        folder = tmp_path / f"student-{p}"
        shutil.copytree(tiny_student, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(dropout=0.0, attention_dropout=p)
        (folder / "config.json").write_text(json.dumps(cfg))
        students[p] = folder
    run = DistillConfig(steps=4, batch_size=4, lr=2e-3, eval_batches=1)
    distill(str(tiny_teacher), str(students[0.1]), str(tiny_corpus), str(tmp_path / "override"),
            dataclasses.replace(run, attention_dropout=0.0))
    distill(str(tiny_teacher), str(students[0.0]), str(tiny_corpus), str(tmp_path / "configured"), run)
    distill(str(tiny_teacher), str(students[0.1]), str(tiny_corpus), str(tmp_path / "with-dropout"), run)
    _assert_same_weights(tmp_path / "override" / "final", tmp_path / "configured" / "final")
    with pytest.raises(AssertionError):  # the control: attention dropout on changes the trajectory
        _assert_same_weights(tmp_path / "with-dropout" / "final", tmp_path / "configured" / "final")
    assert json.loads((tmp_path / "override" / "final" / "config.json").read_text())["attention_dropout"] == 0.1

    model = load_student(str(students[0.1]))
    assert set_attention_dropout(model, 0.0) == model.config.n_layers and model.config.attention_dropout == 0.1
    with pytest.raises(DistilkitError, match="attention_dropout"):
        check_config(DistillConfig(attention_dropout=1.0))


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun with 2 processes on a 1-GPU node: a one-line error, not CUDA's "invalid device ordinal"."""
    from distilkit.utils import use_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert use_gpu() is False  # no GPU: CPU processes (gloo), any number
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistilkitError, match=r"2 processes on this node but 1 visible GPU\(s\)"):
        use_gpu()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert use_gpu() is True


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher, tiny_student, tiny_corpus, tmp_path, monkeypatch):
    real = losses.compute_losses
    calls = {"n": 0}

    def nan_in_step_5(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses, "compute_losses", nan_in_step_5)
    out = tmp_path / "nan"
    cfg = DistillConfig(steps=10, batch_size=4, save_every=2, eval_batches=1)
    with pytest.raises(DistilkitError, match=r"non-finite loss .* step 5.*step-00000004"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), cfg)
    assert latest_checkpoint(out).name == "step-00000004"
    assert not (out / "final").exists()
    # the CLI reports it on one line with exit code 2
    from distilkit.cli import main

    calls["n"] = 0
    rc = main(["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--corpus", str(tiny_corpus),
               "--out", str(tmp_path / "nan2"), "--set", "steps=10", "--set", "batch_size=4", "--set", "eval_batches=1"])
    assert rc == 2


# --------------------------------------------------------------------------- real data (slow)


@pytest.mark.slow
@pytest.mark.data
def test_minilm_adapted_then_distilled_student_beats_its_start(shared_data, tmp_path):
    """MiniLM adapted on a WikiText-2 slice, a 3-layer student cut from it, distilled: held-out MLM accuracy rises."""
    import gzip

    from distilkit.adapt import adapt_teacher
    from distilkit.config import AdaptConfig

    wiki = shared_data / "wikitext" / "wikitext-2-raw"
    with gzip.open(wiki / "wiki.train.raw.gz", "rt", encoding="utf-8") as fh:
        lines = [line for _, line in zip(range(2500), fh)]
    text = tmp_path / "wiki.train.head.raw"
    text.write_text("".join(lines))
    corpus = tmp_path / "corpus"
    prepare_corpus("minilm", [str(text)], str(corpus), block_size=128, heldout_fraction=0.1, progress=False)

    teacher = tmp_path / "teacher"
    a = adapt_teacher("minilm", str(corpus), str(teacher),
                      AdaptConfig(steps=40, batch_size=16, lr=3e-4, save_every=1000, eval_batches=4))
    student = tmp_path / "student"
    init_student(str(teacher), str(student))
    d = distill(str(teacher), str(student), str(corpus), str(tmp_path / "distill"),
                DistillConfig(steps=25, batch_size=16, lr=3e-4, save_every=1000, eval_batches=4, smoothing=None))
    ev = d["eval"]
    print(json.dumps({"adapt_before": a["before"], "adapt_after": a["after"], **ev, "distill_tokens_per_s": d["tokens_per_s"]}))
    assert a["after"]["mlm_accuracy"] > a["before"]["mlm_accuracy"] + 0.03
    assert ev["student_after"]["mlm_accuracy"] > ev["student_before"]["mlm_accuracy"]
    assert ev["student_after"]["perplexity"] < ev["student_before"]["perplexity"]


def test_runs_are_reproducible_and_settings_can_change_in_one_process(tiny_teacher, tiny_student, tiny_corpus, tmp_path):
    """Same config twice -> same weights; a bf16 run in between (Accelerate's settings are per run)."""
    args = (str(tiny_teacher), str(tiny_student), str(tiny_corpus))
    cfg = DistillConfig(steps=3, batch_size=4, eval_batches=1)
    a = distill(*args, str(tmp_path / "a"), cfg)
    b = distill(*args, str(tmp_path / "b"), DistillConfig(**{**cfg.__dict__, "mixed_precision": "bf16"}))
    c = distill(*args, str(tmp_path / "c"), cfg)
    assert a["final_fingerprint"] == c["final_fingerprint"] != a["initial_fingerprint"]
    assert all(np.isfinite(v) for v in b["last_losses"].values())
