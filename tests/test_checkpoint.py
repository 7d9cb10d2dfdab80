"""Trustworthy resume and no data loss (issue 14 items 1, 5, 7, 8): resume refuses changed inputs, outputs
never destroy inputs, broken checkpoints are skipped (or named), temp leftovers never block a rerun; also
freeze_position_embeddings, and the resolved mixed precision recorded and compared."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distill import _assert_same_weights, _metrics, tiny_corpus, tiny_student  # noqa: F401  (module fixtures)

from distilkit import checkpoint
from distilkit.cli import main
from distilkit.config import DistillConfig
from distilkit.corpus import prepare_corpus
from distilkit.distill import distill
from distilkit.utils import DistilkitError, atomic_dir, check_output_not_input, output_occupied

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = DistillConfig(steps=6, batch_size=4, lr=2e-3, save_every=2, keep_checkpoints=3, log_every=1, eval_batches=1,
                    mixed_precision="no")


def _args(teacher, student, corpus, out, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--corpus", str(corpus), "--out", str(out),
            "--set", "steps=6", "--set", "batch_size=4", "--set", "lr=2e-3", "--set", "save_every=2",
            "--set", "keep_checkpoints=3", "--set", "log_every=1", "--set", "eval_batches=1",
            "--set", "mixed_precision='no'", *extra]  # YAML: a bare no is False


@pytest.fixture(scope="module")
def full_run(tiny_teacher, tiny_student, tiny_corpus, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted 6-step run with checkpoints at steps 2, 4, 6."""
    out = tmp_path_factory.mktemp("full") / "run"
    distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN)
    return out


def _cut(full_run: Path, tmp_path: Path, keep_steps: int = 4) -> Path:
    """A copy of the full run as if it had been killed after its step-`keep_steps` checkpoint."""
    out = tmp_path / "cut"
    shutil.copytree(full_run, out)
    for p in checkpoint.step_dirs(out):
        if int(p.name.split("-")[1]) > keep_steps:
            shutil.rmtree(p)
    for name in ("final", "distill.json", "eval.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


# --------------------------------------------------------------------------- item 1: changed inputs


def test_checkpoint_records_the_run_identity_and_manifest(full_run, tiny_teacher, tiny_student):
    ckpt = checkpoint.latest_checkpoint(full_run)
    assert checkpoint.verify(ckpt) is None
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    assert {"state.json", "optimizer.pt", "scheduler.pt", "rng-rank0.safetensors", "model/model.safetensors"} <= set(manifest)
    inputs = json.loads((ckpt / "state.json").read_text())["inputs"]
    summary = json.loads((full_run / "distill.json").read_text())
    assert inputs["teacher"] == summary["teacher_fingerprint"] and inputs["initial_model"] == summary["initial_fingerprint"]
    assert inputs["block_size"] == 32 and inputs["mixed_precision"] == "no" and inputs["world_size"] == 1
    assert inputs["architecture"]["model_type"] == "distilbert" and "lr" in inputs["trajectory_config"]
    assert checkpoint.saved_inputs(full_run) == inputs and checkpoint.saved_inputs(full_run / "none") is None


def test_resume_with_another_student_teacher_or_corpus_is_refused(
    full_run, tiny_teacher, tiny_student, tiny_corpus, tiny_text_file, tmp_path, capsys  # noqa: F811
):
    out = _cut(full_run, tmp_path)
    other_student = tmp_path / "other-student"
    shutil.copytree(tiny_student, other_student)
    weights = load_file(str(other_student / "model.safetensors"))
    from safetensors.torch import save_file

    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key] = weights[key] + 0.01
    save_file(weights, str(other_student / "model.safetensors"), metadata={"format": "pt"})
    # the case: standalone `distill --resume --student OTHER` must not return the old model with exit 0
    assert main(_args(tiny_teacher, other_student, tiny_corpus, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "step-00000004" in err and "initial weights of the trained model" in err and "use another --out" in err
    assert not (out / "final").exists()

    other_corpus = tmp_path / "other-corpus"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(other_corpus), block_size=32, heldout_fraction=0.3,
                   progress=False)
    with pytest.raises(checkpoint.InputsChanged, match="the corpus") as info:
        distill(str(tiny_teacher), str(tiny_student), str(other_corpus), str(out), RUN, resume=True)
    assert len(info.value.changed) == 1 and isinstance(info.value, DistilkitError)

    from conftest import make_tiny_teacher

    other_teacher = make_tiny_teacher(tmp_path / "other-teacher", seed=5)
    with pytest.raises(checkpoint.InputsChanged, match="the teacher's weights"):
        distill(str(other_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN, resume=True)
    other_config = tmp_path / "other-config"  # same weights, another dropout
    shutil.copytree(tiny_student, other_config)
    config = json.loads((other_config / "config.json").read_text())
    (other_config / "config.json").write_text(json.dumps({**config, "dropout": 0.2}))
    with pytest.raises(checkpoint.InputsChanged, match=r"the model architecture in \['dropout'\]"):
        distill(str(tiny_teacher), str(other_config), str(tiny_corpus), str(out), RUN, resume=True)
    # unchanged inputs: continues, and matches the uninterrupted run
    r = distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN, resume=True)
    assert r["resumed_from"].endswith("step-00000004")
    _assert_same_weights(full_run / "final", out / "final")


def test_resume_mismatch_names_each_difference():
    base = {"teacher": "t", "initial_model": "s", "corpus": "c", "block_size": 128, "mixed_precision": "bf16",
            "architecture": {"dim": 768, "n_layers": 6}, "world_size": 1, "trajectory_config": {"lr": 5e-4, "seed": 0}}
    assert checkpoint.resume_mismatch({"inputs": base}, base) == []
    now = {**base, "block_size": 64, "mixed_precision": "no", "architecture": {"dim": 768, "n_layers": 3},
           "trajectory_config": {"lr": 1e-4, "seed": 0}}
    changed = checkpoint.resume_mismatch({"inputs": base}, now)
    assert len(changed) == 4
    assert any("block size (128 then, 64 now)" in c for c in changed)
    assert any("mixed precision (bf16 then, no now)" in c for c in changed)
    assert "the model architecture in ['n_layers']" in changed and "the config in ['lr']" in changed
    assert checkpoint.resume_mismatch({}, base) == ["the checkpoint records no inputs (written by an older distilkit)"]


def test_resume_refuses_another_resolved_precision(full_run, tiny_teacher, tiny_student, tiny_corpus, tmp_path):  # noqa: F811
    out = _cut(full_run, tmp_path)
    with pytest.raises(checkpoint.InputsChanged, match=r"resolved mixed precision \(no then, bf16 now\)"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out),
                dataclasses.replace(RUN, mixed_precision="bf16"), resume=True)


# --------------------------------------------------------------------------- item 5: outputs never destroy inputs


def test_check_output_not_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    for out, relation in [(model, "is"), (tmp_path / "link", "is"), (model / "sub", "lies inside"), (tmp_path, "contains")]:
        with pytest.raises(DistilkitError, match=f"--out {relation} the input"):
            check_output_not_input(out, "minilm-hub-id", model)
    check_output_not_input(tmp_path / "other", model, None, "", "not/a/path")
    check_output_not_input(tmp_path / "model2", model)  # a sibling whose name starts alike


def test_commands_refuse_an_output_that_is_an_input(tiny_teacher, tiny_student, tiny_corpus, tmp_path, capsys):  # noqa: F811
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    before = sorted(p.name for p in teacher.iterdir())
    assert main(["init-student", "--teacher", str(teacher), "--out", str(teacher), "--overwrite"]) == 2
    assert "--out is the input" in capsys.readouterr().err
    assert main(["finetune", "--model", str(teacher), "--task", "sst2", "--data-dir", str(tmp_path / "none"),
                 "--out", str(teacher), "--overwrite"]) == 2
    assert "--out is the input" in capsys.readouterr().err
    assert main(["adapt-teacher", "--teacher", str(teacher), "--corpus", str(tiny_corpus), "--out", str(teacher / "x")]) == 2
    assert main(_args(tiny_teacher, tiny_student, tiny_corpus, tiny_corpus)) == 2
    assert "--out is the input" in capsys.readouterr().err
    assert main(["prepare-corpus", "--tokenizer", str(teacher), "--input", str(teacher / "vocab.txt"),
                 "--out", str(teacher), "--overwrite"]) == 2
    assert sorted(p.name for p in teacher.iterdir()) == before


# --------------------------------------------------------------------------- item 7: broken checkpoints


def test_truncated_latest_checkpoint_falls_back_with_a_warning(full_run, tiny_teacher, tiny_student, tiny_corpus, tmp_path):  # noqa: F811
    out = _cut(full_run, tmp_path)
    weights = out / "checkpoints" / "step-00000004" / "model" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.warns(UserWarning, match=r"step-00000004: skipped.*model.safetensors.*truncated"):
        r = distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN, resume=True)
    assert r["resumed_from"].endswith("step-00000002") and r["steps"] == 6
    _assert_same_weights(full_run / "final", out / "final")
    assert [m["step"] for m in _metrics(out)] == list(range(1, 7))


@pytest.mark.parametrize("name", ["state.json", "optimizer.pt", "rng-rank0.json"])
def test_corrupted_file_is_detected_by_hash(full_run, tmp_path, name):
    out = _cut(full_run, tmp_path, keep_steps=2)
    path = out / "checkpoints" / "step-00000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(data))
    assert checkpoint.verify(path.parent, hashes=False) is None  # sizes alone do not see it
    with pytest.raises(DistilkitError, match=rf"{name}: sha256 differs.*no complete checkpoint to resume from"):
        checkpoint.resume_point(out, is_main=False)


def test_no_complete_checkpoint_is_exit_2_naming_the_file(full_run, tiny_teacher, tiny_student, tiny_corpus, tmp_path, capsys):  # noqa: F811
    out = _cut(full_run, tmp_path, keep_steps=2)
    (out / "checkpoints" / "step-00000002" / "MANIFEST.json").unlink()  # killed before the manifest: incomplete
    assert checkpoint.list_checkpoints(out) == []
    assert main(_args(tiny_teacher, tiny_student, tiny_corpus, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "step-00000002/MANIFEST.json: missing" in err and "no complete checkpoint" in err and "Traceback" not in err


# --------------------------------------------------------------------------- item 8: leftovers


def test_failed_run_leftovers_do_not_block_a_plain_rerun(full_run, tiny_teacher, tiny_student, tiny_corpus, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-00000002.tmp").mkdir(parents=True)  # a run killed while writing its first checkpoint
    (out / "checkpoints" / ".step-00000002.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".final.tmp-{int(dead.stdout)}-abc").mkdir()  # write_model_dir killed
    # a full disk while writing the step-4 checkpoint: the error propagates, no temp folder stays
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if "step-00000004" in str(f):
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN)
    monkeypatch.setattr(torch, "save", real)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # the run before it had left only an empty checkpoints/ (+ metrics): a plain rerun starts over
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), RUN)
    _assert_same_weights(full_run / "final", out / "final")
    assert [m["step"] for m in _metrics(out)] == list(range(1, 7))


def test_atomic_dir_removes_leftovers_of_dead_writers_only(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    stale = tmp_path / f".corpus.tmp-{dead}-x1y2"
    live = tmp_path / f".corpus.tmp-{os.getppid()}-z3"
    other = tmp_path / f".other.tmp-{dead}-q"
    for p in (stale, live, other):
        p.mkdir()
    with atomic_dir(tmp_path / "corpus") as tmp:
        assert tmp.name.startswith(f".corpus.tmp-{os.getpid()}-")
        (tmp / "meta.json").write_text("{}")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "corpus" / "meta.json").is_file()
    # a folder holding only a dead writer's leftover is empty
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / f".x.old-{dead}").mkdir()
    assert not output_occupied(tmp_path / "empty") and not (tmp_path / "empty" / f".x.old-{dead}").exists()


def test_sigkilled_prepare_corpus_leaves_nothing_that_blocks(tiny_teacher, tiny_text_file, tmp_path):
    """A writer SIGKILLed inside atomic_dir (as prepare-corpus would be) leaves `.c.tmp-PID-*`; the next
    prepare-corpus of the same folder removes it and succeeds."""
    code = ("import os\nfrom distilkit.utils import atomic_dir\n"
            f"with atomic_dir({str(tmp_path / 'c')!r}) as tmp:\n"
            "    (tmp / 'train-00000.bin').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".c.tmp"]
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# --------------------------------------------------------------------------- freeze_position_embeddings, precision


def test_freeze_position_embeddings_keeps_them_bit_identical(tiny_teacher, tiny_student, tiny_corpus, tmp_path):  # noqa: F811
    cfg = dataclasses.replace(RUN, steps=3, freeze_position_embeddings=True)
    distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "frozen"), cfg)
    start, end = load_file(str(tiny_student / "model.safetensors")), load_file(str(tmp_path / "frozen" / "final" / "model.safetensors"))
    key = "distilbert.embeddings.position_embeddings.weight"
    assert torch.equal(start[key], end[key])
    assert not torch.equal(start["distilbert.embeddings.word_embeddings.weight"], end["distilbert.embeddings.word_embeddings.weight"])
    # part of the trajectory: a resume without it is refused
    with pytest.raises(checkpoint.InputsChanged, match="freeze_position_embeddings"):
        distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(tmp_path / "frozen"),
                dataclasses.replace(cfg, freeze_position_embeddings=False), resume=True)


def test_bf16_distillation_on_cpu_records_its_precision(tiny_teacher, tiny_student, tiny_corpus, tmp_path, capfd):  # noqa: F811
    out = tmp_path / "bf16"
    cfg = dataclasses.replace(RUN, steps=30, save_every=30, lr=2e-3, mixed_precision="bf16")
    r = distill(str(tiny_teacher), str(tiny_student), str(tiny_corpus), str(out), cfg)
    assert "distill: mixed precision bf16 (as configured)" in capfd.readouterr().err
    losses = [m["loss"] for m in _metrics(out)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert r["mixed_precision"] == "bf16"
    assert json.loads((out / "distill.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((out / "eval.json").read_text())["mixed_precision"] == "bf16"
    assert {m["mixed_precision"] for m in _metrics(out)} == {"bf16"}
