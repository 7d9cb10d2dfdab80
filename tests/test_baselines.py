"""Baselines: the majority-class score per metric (hand-computed, and on the real MRPC dev set), headroom
arithmetic, seed-spread verdicts, the built-in no-KD / cut-only variants, and a tiny `reproduce` run
that builds, fine-tunes and reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distilkit.baselines import (BASELINES, baseline_variants, compare_seeds, headroom_clear, headroom_retention, majority_baseline,
                                 majority_score)
from distilkit.cli import main
from distilkit.finetune import subset_indices
from distilkit.pipeline import FinetuneSection, ReproduceConfig, VariantSection, reproduce
from distilkit.tasks import Example, get_task, load_split
from distilkit.utils import DistilkitError
from test_reproduce import write_tiny_data


def _ex(*labels):
    return [Example("a b", None, y) for y in labels]


def test_majority_score_uses_each_tasks_metric():
    cola, mrpc, sst2, stsb = (get_task(t) for t in ("cola", "mrpc", "sst2", "stsb"))
    # Matthews correlation of a constant prediction is 0
    assert majority_score(cola, _ex(1, 1, 0), _ex(1, 0, 1, 1)) == 0.0
    # MRPC: always "equivalent" on 3 of 4 positives: acc 0.75, F1 2 * 0.75 / 1.75; paper score = their mean x100
    m = majority_baseline(mrpc, _ex(1, 1, 0), _ex(1, 1, 1, 0))
    assert m["prediction"] == 1 and m["metrics"]["accuracy"] == pytest.approx(0.75)
    assert m["score"] == pytest.approx(100 * (2 * 0.75 / 1.75 + 0.75) / 2)
    # accuracy; the majority comes from train, not from the eval set
    assert majority_score(sst2, _ex(0, 0, 1), _ex(0, 1, 1, 1)) == pytest.approx(25.0)
    assert majority_baseline(sst2, _ex(1, 0), _ex(0))["prediction"] == 0  # a tie: the smallest label id
    # regression: the training mean, whose Pearson / Spearman with anything is 0
    s = majority_baseline(stsb, _ex(1.0, 3.0), _ex(0.5, 4.0, 2.5))
    assert s["prediction"] == 2.0 and s["score"] == 0.0 and s["metrics"] == {"pearson": 0.0, "spearman": 0.0}
    json.dumps(s)  # recorded in results.json as is
    with pytest.raises(DistilkitError, match="no training examples"):
        majority_score(sst2, [], _ex(1))


def test_majority_on_real_mrpc_dev(shared_data):
    task = get_task("mrpc")
    train, dev = load_split(task, shared_data, "train"), load_split(task, shared_data, "dev")
    pos = sum(e.label for e in dev) / len(dev)
    assert sum(e.label for e in train) > len(train) / 2  # "equivalent" is the majority class
    # predicting 1 everywhere: precision = pos rate, recall 1 -> F1 = 2 pos / (1 + pos)
    assert majority_score(task, train, dev) == pytest.approx(100 * (2 * pos / (1 + pos) + pos) / 2)
    assert majority_score(task, train, dev) == pytest.approx(74.80, abs=0.01)


def test_headroom_clear_of_the_teachers_seed_spread():
    assert headroom_clear({"min": 75.0, "n": 3}, 74.8) is True
    assert headroom_clear({"min": 74.8, "n": 3}, 74.8) is False  # worst seed on the floor
    assert headroom_clear({"min": 70.0, "n": 3}, 74.8) is False
    assert headroom_clear({"min": 90.0, "n": 1}, 74.8) is None  # one seed: no spread measured
    assert headroom_clear(None, 74.8) is None and headroom_clear({"min": 90.0, "n": 3}, None) is None


def test_headroom_arithmetic():
    assert headroom_retention(81.0, 85.0, 74.8) == pytest.approx(100 * 6.2 / 10.2)
    assert headroom_retention(33.0, 42.0, 0.0) == pytest.approx(100 * 33.0 / 42.0)  # floor 0: plain retention
    assert headroom_retention(73.2, 76.7, 74.8) == pytest.approx(100 * (73.2 - 74.8) / (76.7 - 74.8))  # < 0: below
    assert headroom_retention(80.0, 74.0, 74.8) is None  # the teacher does not beat the majority class
    assert headroom_retention(80.0, 74.8, 74.8) is None
    assert headroom_retention(None, 85.0, 74.8) is None and headroom_retention(80.0, 85.0, None) is None


def _seeds(*scores):
    return {"median": sorted(scores)[len(scores) // 2], "min": min(scores), "max": max(scores), "n": len(scores)}


def test_seed_spread_verdicts():
    student = _seeds(30.0, 33.0, 36.0)
    assert compare_seeds(student, _seeds(25.0, 27.0, 29.0))["verdict"] == "beats"
    assert compare_seeds(student, _seeds(37.0, 38.0, 40.0))["verdict"] == "below"
    assert compare_seeds(student, _seeds(29.0, 30.0, 31.0))["verdict"] == "overlap"  # touching ranges overlap
    assert compare_seeds(student, _seeds(10.0))["verdict"] == "one_seed"
    c = compare_seeds(student, _seeds(25.0, 27.0, 29.0))
    assert c["delta_median"] == 6.0 and c["student_range"] == [30.0, 36.0] and c["baseline_range"] == [25.0, 29.0]
    assert compare_seeds(None, student) is None and compare_seeds(student, None) is None


def test_baseline_variants():
    cfg = ReproduceConfig(finetune=FinetuneSection(baselines=["cut_only", "no_kd", "cut_only"]),
                          distill={"steps": 7, "alpha_mlm": 2.0})
    cut, nokd = baseline_variants(cfg)
    assert (cut.name, cut.init, cut.distill, cut.tasks, cut.seeds) == ("cut_only", "none", {}, None, None)
    assert (nokd.name, nokd.init, nokd.distill) == ("no_kd", "teacher", {"alpha_ce": 0.0, "alpha_cos": 0.0})
    assert nokd.label == BASELINES["no_kd"][0] and BASELINES["no_kd"][1]["distill"] == {"alpha_ce": 0.0, "alpha_cos": 0.0}
    assert baseline_variants(ReproduceConfig()) == []
    # a main loss without the masked-LM term: no-KD still trains with one (the default weight)
    no_mlm = ReproduceConfig(finetune=FinetuneSection(baselines=["no_kd"]), distill={"alpha_mlm": 0})
    assert baseline_variants(no_mlm)[0].distill == {"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_mlm": 2.0}
    with pytest.raises(DistilkitError, match=r"finetune.baselines: unknown baseline 'kd'"):
        baseline_variants(ReproduceConfig(finetune=FinetuneSection(baselines=["kd"])))
    clash = ReproduceConfig(finetune=FinetuneSection(baselines=["no_kd"]), variants=[VariantSection(name="no_kd")])
    with pytest.raises(DistilkitError, match="'no_kd' is the name of a built-in baseline"):
        baseline_variants(clash)


PRESET = """
teacher: {teacher}
student: {{layers: [0, 2]}}
corpus: {{block_size: 32}}  # the default WikiText-2 train / valid files of write_tiny_data
distill: {{steps: 6, batch_size: 4, save_every: 3, eval_batches: 2}}
finetune:
  tasks: [mrpc]
  seeds: [1, 2]
  baselines: [no_kd, cut_only]
  common: {{epochs: 1, batch_size: 8, max_length: 32, max_train: 32}}
bench: {{enabled: false}}
"""


def test_reproduce_builds_finetunes_and_reports_the_baselines(tmp_path, tiny_teacher, one_thread, capsys):
    data = write_tiny_data(tmp_path / "data")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(PRESET.format(teacher=tiny_teacher))
    run = tmp_path / "run"
    reproduce(str(preset), str(data), str(run))

    # cut-only: the initial student itself; no-KD: distilled on the same tokens with the masked-LM loss only
    init = load_file(run / "student_init" / "model.safetensors")
    cut = load_file(run / "variants" / "cut_only" / "final" / "model.safetensors")
    assert init.keys() == cut.keys() and all((init[k] == cut[k]).all() for k in init)
    assert not (run / "variants" / "cut_only" / "distill").exists()
    nokd = load_file(run / "variants" / "no_kd" / "final" / "model.safetensors")
    assert any(not (init[k] == nokd[k]).all() for k in init)
    meta = json.loads((run / "variants.json").read_text())
    assert meta["no_kd"]["distill"] == {"alpha_ce": 0.0, "alpha_cos": 0.0} and meta["cut_only"]["init"] == "none"
    steps = [json.loads(line) for line in (run / "variants" / "no_kd" / "distill" / "metrics.jsonl").read_text().splitlines()]
    main_steps = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "step" in s]) == len([s for s in main_steps if "step" in s])  # same budget

    # fine-tuned with the student's protocol and seeds; results.json records the majority class
    task = get_task("mrpc")
    train, dev = load_split(task, data, "train"), load_split(task, data, "dev")
    student = json.loads((run / "finetune" / "student" / "mrpc" / "results.json").read_text())
    for name in ("no_kd", "cut_only"):
        res = json.loads((run / "finetune" / name / "mrpc" / "results.json").read_text())
        assert [s["seed"] for s in res["seeds"]] == [1, 2] and res["config"] == student["config"]
        assert res["majority"] == student["majority"]
    used = [train[i] for i in subset_indices(len(train), 32, student["config"]["subset_seed"])]  # the 32 trained on
    assert student["seeds"][0]["n_train"] == 32 and student["majority"]["score"] == majority_score(task, used, dev)

    rep = json.loads((run / "report.json").read_text())
    e = rep["tasks"]["mrpc"]
    assert e["majority"] == student["majority"]["score"]
    assert e["no_kd"]["seeds"] == [1, 2] and e["cut_only"]["n"] == 2
    assert set(e["vs_baselines"]) == {"no_kd", "cut_only"}
    t, s, m = e["teacher"]["median"], e["student"]["median"], e["majority"]
    assert e["headroom_retention_pct"] == (pytest.approx(100 * (s - m) / (t - m)) if t > m else None)
    assert rep["macro"]["tasks"] == ["mrpc"] and rep["macro"]["no_kd"] == e["no_kd"]["median"]
    assert [a["variant"] for a in rep["ablations"]] == []
    assert "## Baselines: what distillation has to beat" in (run / "report.md").read_text()

    again = reproduce(str(preset), str(data), str(run))
    assert all(st["status"] == "skipped" for st in again)
    # a baseline taken out of the preset: its old scores leave the run and the report
    fewer = reproduce(str(preset), str(data), str(run), overrides=["finetune.baselines=[no_kd]"])
    assert {st["stage"]: st["status"] for st in fewer}["finetune"] == "done"
    assert not (run / "finetune" / "cut_only").exists() or not any((run / "finetune" / "cut_only").iterdir())
    rep = json.loads((run / "report.json").read_text())
    assert rep["tasks"]["mrpc"]["cut_only"] is None and rep["tasks"]["mrpc"]["no_kd"]["n"] == 2
    assert "cut_only" not in rep["variants"] and "cut_only" not in json.loads((run / "variants.json").read_text())

    # a bad baseline name stops before anything runs: one line, exit 2
    capsys.readouterr()
    assert main(["reproduce", "--preset", str(preset), "--data-dir", str(data), "--out", str(tmp_path / "bad"),
                 "--set", "finetune.baselines=[no_kd, kd]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "finetune.baselines: unknown baseline 'kd'" in err
    assert not (tmp_path / "bad" / "corpus").exists()
