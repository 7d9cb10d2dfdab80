"""`distilkit reproduce` end to end on a tiny teacher and tiny data: stamps, skipping, --from, kill and restart."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WORDS, make_tiny_teacher
from distilkit.pipeline import STAGE_KEY_FILE, STAGES, Pipeline, load_preset, reproduce
from distilkit.utils import DistilkitError


def _sentence(rng: random.Random, lo: int = 4, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tiny_data(root: Path) -> Path:
    """A data dir in the real layouts: WikiText raw (gz), GLUE CoLA (no header), MRPC (BOM header)."""
    rng = random.Random(0)
    wt = root / "wikitext" / "wikitext-2-raw"
    wt.mkdir(parents=True)
    for split, n in [("train", 240), ("valid", 60)]:
        lines = [" = Title = \n"] + [f" {_sentence(rng, 10, 40)} . \n" for _ in range(n)]
        with gzip.open(wt / f"wiki.{split}.raw.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(lines)
    cola = root / "cola" / "glue"
    cola.mkdir(parents=True)
    for split, n in [("train", 64), ("dev", 32)]:
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = _sentence(rng) + (" good" if label else " bad")
            rows.append(f"src\t{label}\t{'' if label else '*'}\t{words}\n")
        (cola / f"{split}.tsv").write_text("".join(rows))
    mrpc = root / "mrpc"
    mrpc.mkdir()
    for split, n in [("train", 48), ("dev", 24)]:
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
        for i in range(n):
            a = _sentence(rng)
            label = rng.randint(0, 1)
            b = a if label else _sentence(rng)
            rows.append(f"{label}\t{i}\t{i + 1000}\t{a}\t{b}\n")
        (mrpc / f"{split}.tsv").write_text("".join(rows))
    return root


PRESET = """
teacher: {teacher}
adapt: auto
adapt_config: {{steps: 4, batch_size: 4, save_every: 2, eval_batches: 2}}
student: {{layers: [0, 2]}}
corpus:
  train: [wikitext/wikitext-2-raw/wiki.train.raw.gz]
  heldout: [wikitext/wikitext-2-raw/wiki.valid.raw.gz]
  block_size: 32
distill: {{steps: 6, batch_size: 4, save_every: 2, eval_batches: 2}}
finetune:
  tasks: [cola, mrpc]
  seeds: [1]
  common: {{epochs: 1, batch_size: 8, max_length: 32}}
  per_task: {{mrpc: {{max_train: 32, seeds: [1, 2]}}}}
variants:
  - {{name: no_ce, label: without L_ce, paper_key: "without L_ce (L_cos + L_mlm)", distill: {{alpha_ce: 0}}, tasks: [cola], seeds: [1]}}
bench: {{task: mrpc, rounds: 1, max_sentences: 8}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    teacher = make_tiny_teacher(root / "teacher", with_head=False, layers=4)  # no head: exercises `adapt`
    data = write_tiny_data(root / "data")
    preset = root / "tiny.yaml"
    preset.write_text(PRESET.format(teacher=teacher))
    return root, data, preset


def _scores(run: Path) -> dict:
    rep = json.loads((run / "report.json").read_text())
    out: dict[str, list] = {}
    for path in sorted((run / "finetune").glob("*/*/results.json")):
        r = json.loads(path.read_text())
        out[f"{path.parent.parent.name}/{r['task']}"] = [s["metrics"] for s in r["seeds"]]
    table = {task: (row["teacher"]["median"], row["student"]["median"], row["retention_pct"])
             for task, row in rep["tasks"].items()}
    return {"results": out, "table": table}


def test_reproduce_runs_skips_and_redoes(setup):
    root, data, preset = setup
    run = root / "run1"
    summary = reproduce(str(preset), str(data), str(run))
    assert [s["stage"] for s in summary] == STAGES
    assert all(s["status"] == "done" for s in summary)
    for name in ("report.md", "report.json", "report.png"):
        assert (run / name).is_file()
    assert (run / "teacher" / "adapt.json").is_file()  # the head-less teacher was adapted
    assert json.loads((run / "run.json").read_text())["data_checksums"]
    res = json.loads((run / "finetune" / "student" / "mrpc" / "results.json").read_text())
    assert [s["seed"] for s in res["seeds"]] == [1, 2] and res["seeds"][0]["n_train"] == 32
    assert (run / "finetune" / "no_ce" / "cola" / "results.json").is_file()
    assert (run / "distill" / "eval.json").is_file()

    again = reproduce(str(preset), str(data), str(run))
    assert all(s["status"] == "skipped" for s in again)

    redo = reproduce(str(preset), str(data), str(run), from_stage="bench")
    status = {s["stage"]: s["status"] for s in redo}
    assert status["finetune"] == "skipped" and status["bench"] == "done" and status["report"] == "done"

    changed = reproduce(str(preset), str(data), str(run), overrides=["bench.rounds=2"])
    status = {s["stage"]: s["status"] for s in changed}
    assert status["distill"] == "skipped" and status["bench"] == "done"


def test_changed_task_file_redoes_that_task_only(setup, capsys):
    """Editing a task's dev file must not reuse its old scores; the other task's results are kept."""
    import shutil

    root, data, preset = setup
    reference = root / "run1"
    if not (reference / "report.json").is_file():
        reproduce(str(preset), str(data), str(reference))
    data2, run = root / "data-edited", root / "run-edited"
    shutil.copytree(data, data2)
    shutil.copytree(reference, run)
    dev = data2 / "mrpc" / "dev.tsv"
    rows = dev.read_text().splitlines(keepends=True)
    dev.write_text("".join(rows[:-1]))  # one pair fewer
    capsys.readouterr()
    summary = reproduce(str(preset), str(data2), str(run))
    status = {s["stage"]: s["status"] for s in summary}
    assert all(status[s] == "skipped" for s in ("corpus", "adapt", "student", "distill", "variants"))
    assert status["finetune"] == "done" and status["bench"] == "done"  # bench reads mrpc too
    redone = [line.split()[2] for line in capsys.readouterr().err.splitlines() if "]   finetune " in line]
    assert sorted(redone) == ["student/mrpc:", "teacher/mrpc:"]  # cola (and no_ce/cola) kept
    res = json.loads((run / "finetune" / "student" / "mrpc" / "results.json").read_text())
    assert res["seeds"][0]["n_eval"] == len(rows) - 2  # header and the dropped row


def test_changed_corpus_or_teacher_redoes_the_corpus(setup):
    """The corpus stage (and so every later one) is keyed by the sha256 of the teacher's and the corpus' files."""
    import shutil

    root, data, preset = setup
    teacher = root / "teacher-copy"
    shutil.copytree(root / "teacher", teacher)
    data2, run = root / "data-corpus", root / "run-corpus"
    shutil.copytree(data, data2)
    tiny = root / "tiny-copy.yaml"
    tiny.write_text(PRESET.format(teacher=teacher))

    def corpus_status() -> str:
        return reproduce(str(tiny), str(data2), str(run), until="corpus")[0]["status"]

    assert corpus_status() == "done"
    assert corpus_status() == "skipped"
    train = data2 / "wikitext" / "wikitext-2-raw" / "wiki.train.raw.gz"
    with gzip.open(train, "at", encoding="utf-8") as fh:
        fh.write(" one more line of text . \n")
    assert corpus_status() == "done"
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "note": "edited"}))
    assert corpus_status() == "done"
    assert corpus_status() == "skipped"


def test_baselines_run_on_their_tasks_only(setup):
    """finetune.baseline_tasks: the cut-only baseline is fine-tuned on MRPC only; the student on both tasks."""
    root, data, preset = setup
    run = root / "run-baselines"
    reproduce(str(preset), str(data), str(run), until="finetune",
              overrides=["finetune.baselines=[cut_only]", "finetune.baseline_tasks=[mrpc]", "variants=[]"])
    done = sorted(p.parent.relative_to(run / "finetune").as_posix() for p in (run / "finetune").glob("*/*/results.json"))
    assert done == ["cut_only/mrpc", "student/cola", "student/mrpc", "teacher/cola", "teacher/mrpc"]


def test_killed_reproduce_resumes_and_matches(setup):
    """SIGKILL `reproduce` during fine-tuning, start it again: finished stages are skipped, scores equal."""
    root, data, preset = setup
    reference = root / "run1"
    if not (reference / "report.json").is_file():
        reproduce(str(preset), str(data), str(reference))
    run = root / "run-killed"
    env = {**os.environ, "DISTILKIT_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "distilkit.cli", "reproduce", "--preset", str(preset), "--data-dir", str(data),
           "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill once the first fine-tuning run has finished
            if list((run / "stages").glob("finetune-*.json")) or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "reproduce finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run / "stages" / "finetune.json").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("corpus", "adapt", "student", "distill", "variants"):
        assert f"[reproduce] {stage:<9} skipped" in out.stderr, out.stderr[-3000:]
    assert "[reproduce] finetune  done" in out.stderr
    assert _scores(run) == _scores(reference)


def test_until_then_students_only(setup):
    """`--until` stops after a stage; the same command again goes on; finetune.teacher=false skips the teacher."""
    root, data, preset = setup
    run = root / "run-until"
    sets = ["finetune.teacher=false", "variants=[]", "bench.enabled=false"]
    first = reproduce(str(preset), str(data), str(run), overrides=sets, until="student")
    assert [s["stage"] for s in first] == ["corpus", "adapt", "student"]
    assert not (run / "distill").exists() and not (run / "finetune").exists()
    rest = reproduce(str(preset), str(data), str(run), overrides=sets)
    status = {s["stage"]: s["status"] for s in rest}
    assert status["adapt"] == "skipped" and status["student"] == "skipped" and status["report"] == "done"
    assert sorted(p.name for p in (run / "finetune").iterdir()) == ["student"]
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["tasks"]) == {"cola", "mrpc"}
    assert all(row["teacher"] is None and row["student"]["median"] is not None for row in rep["tasks"].values())
    with pytest.raises(DistilkitError, match="--until: unknown stage"):
        reproduce(str(preset), str(data), str(run), until="nope")


def test_preset_errors(setup, tmp_path):
    root, data, preset = setup
    with pytest.raises(DistilkitError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(DistilkitError, match="unknown key"):
        load_preset(str(preset), ["distill_typo.steps=3"])
    for name in ("quick", "cpu", "gpu", "paper", "ablations"):
        cfg = load_preset(name)
        assert cfg.finetune.tasks
    with pytest.raises(DistilkitError, match="data directory"):
        reproduce(str(preset), str(tmp_path / "nope"), str(tmp_path / "run"))


def _pipeline(preset: Path, data: Path, run: Path, sets: list[str], logs: list[str]) -> Pipeline:
    return Pipeline(load_preset(str(preset), sets), data, run, log=logs.append)


def _distilled(run: Path) -> dict:
    return json.loads((run / "distill" / "distill.json").read_text())


def test_changed_inputs_redo_resumable_stages(setup):
    """Issue 14.1: rerunning an --out with another student or corpus redoes adapt/distill from scratch (the
    old folders set aside, then deleted), never 'done in 0.2s' from the old checkpoints."""
    root, data, preset = setup
    run = root / "run-stale"
    sets = ["variants=[]"]
    reproduce(str(preset), str(data), str(run), overrides=sets, until="distill")
    first = _distilled(run)
    assert first["steps"] == 6 and json.loads((run / "distill" / STAGE_KEY_FILE).read_text())["stage"] == "distill"

    logs: list[str] = []
    summary = _pipeline(preset, data, run, [*sets, "student.layers=[1,3]"], logs).run_all(until="distill")
    status = {s["stage"]: s["status"] for s in summary}
    assert (status["adapt"], status["student"], status["distill"]) == ("skipped", "done", "done")
    second = _distilled(run)
    assert second["resumed_from"] is None and second["steps"] == 6 and second["tokens_per_s"] > 0
    assert second["final_fingerprint"] != first["final_fingerprint"]
    assert second["initial_fingerprint"] != first["initial_fingerprint"]  # really the layers-[1,3] student
    assert sum("distill: " in m and "set aside (made with other settings)" in m for m in logs) == 1
    assert not (run / ".trash").exists()  # the old folder is deleted once the new distill completes

    logs.clear()
    summary = _pipeline(preset, data, run, [*sets, "student.layers=[1,3]", "corpus.block_size=16"], logs).run_all(
        until="distill")
    assert all(s["status"] == "done" for s in summary)
    assert any("adapt: " in m and "set aside" in m for m in logs) and any("distill: " in m and "set aside" in m for m in logs)
    assert _distilled(run)["block_size"] == 16 and _distilled(run)["resumed_from"] is None
    assert json.loads((run / "teacher" / "adapt.json").read_text())["block_size"] == 16


def test_from_stage_restarts_cleanly_and_killed_stage_resumes(setup):
    """Issue 14.6: `--set distill.steps=... --from distill` works (it used to fail with 'config differs');
    `--from` with the same settings restarts too; a stage killed with the same settings resumes."""
    root, data, preset = setup
    run = root / "run-from"
    sets = ["variants=[]"]
    reproduce(str(preset), str(data), str(run), overrides=sets, until="distill")

    reproduce(str(preset), str(data), str(run), overrides=[*sets, "distill.steps=8"], from_stage="distill", until="distill")
    assert _distilled(run)["steps"] == 8 and _distilled(run)["resumed_from"] is None

    logs: list[str] = []
    summary = _pipeline(preset, data, run, [*sets, "distill.steps=8"], logs).run_all(from_stage="distill", until="distill")
    assert [s["status"] for s in summary] == ["skipped", "skipped", "skipped", "done"]
    assert any("set aside (--from)" in m for m in logs) and _distilled(run)["resumed_from"] is None
    assert not (run / ".trash").exists()

    # killed after its last checkpoint, before `final` and the stamp: same key, so it continues
    import shutil

    shutil.rmtree(run / "distill" / "final")
    (run / "stages" / "distill.json").unlink()
    logs.clear()
    _pipeline(preset, data, run, [*sets, "distill.steps=8"], logs).run_all(until="distill")
    assert _distilled(run)["resumed_from"] and not any("set aside" in m for m in logs)


def test_folder_claims(setup, tmp_path):
    """A stage folder with another key or none is moved to RUN/.trash and deleted when the stage completes."""
    root, data, preset = setup
    run = tmp_path / "run"
    logs: list[str] = []
    pipe = _pipeline(preset, data, run, [], logs)
    folder = run / "distill"
    (folder / "checkpoint-00000002").mkdir(parents=True)  # an old run's, no key recorded
    pipe._claim(folder, "k1", "distill")
    assert [p.name for p in folder.iterdir()] == [STAGE_KEY_FILE]
    (trash,) = (run / ".trash").iterdir()
    assert trash.name.startswith("distill-") and (trash / "checkpoint-00000002").is_dir()
    assert "set aside (no stage key)" in logs[-1]
    (folder / "checkpoint-00000004").mkdir()
    pipe._claim(folder, "k1", "distill")  # same key: kept, to resume
    assert (folder / "checkpoint-00000004").is_dir()
    pipe._claim(folder, "k2", "distill")  # another key: set aside too
    assert len(list((run / ".trash").iterdir())) == 2 and "made with other settings" in logs[-1]
    pipe._empty_trash("distill")
    assert not (run / ".trash").exists()
