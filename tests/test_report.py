"""Report: values in report.json equal hand-computed medians / retention / headroom / GLUE macro /
baseline verdicts / ablation deltas, report.md holds the table rows, report.png is a PNG, missing
pieces are said, malformed input exits 2."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from distilkit.cli import main
from distilkit.report import PAPER_FILE, build_report, load_paper, render_chart, write_report
from distilkit.utils import DistilkitError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "distilbert_paper_tables.json"

# variant -> task -> per-seed scores (paper scale)
SCORES = {
    "teacher": {"cola": [40.0, 44.0, 42.0], "mrpc": [85.0, 86.0, 84.0], "imdb": [88.0, 90.0, 89.0], "sst2": [90.0]},
    "student": {"cola": [30.0, 36.0, 33.0], "mrpc": [80.0, 82.0, 81.0], "imdb": [86.0, 87.0, 85.0]},
    "no_ce": {"cola": [20.0, 26.0], "mrpc": [79.0, 75.0]},
    "random_init": {"cola": [0.0], "mrpc": [70.0], "imdb": [60.0]},
    "no_kd": {"cola": [25.0, 29.0, 27.0], "mrpc": [80.5, 83.0, 81.5], "imdb": [84.0, 85.0, 86.0]},
    "cut_only": {"cola": [10.0, 12.0, 14.0], "mrpc": [78.0, 79.0, 77.0], "imdb": [80.0]},
}
SCORE_NAMES = {"cola": "mcc x100", "mrpc": "mean(f1, acc) x100", "imdb": "acc x100", "sst2": "acc x100"}
MAJORITY = {"cola": 0.0, "mrpc": 74.8, "imdb": 50.0, "sst2": 50.9}  # as finetune records it in results.json


def _results(task: str, scores: list[float], max_train: int | None = 200) -> dict:
    return {
        "majority": {"prediction": 1, "metrics": {}, "score": MAJORITY.get(task, 50.0)},
        "task": task,
        "score_name": SCORE_NAMES.get(task, "acc x100"),
        "metric_names": ["accuracy"],
        "seeds": [{"seed": i + 1, "metrics": {"accuracy": s / 100}, "score": s} for i, s in enumerate(scores)],
        "score": {"median": statistics.median(scores), "min": min(scores), "max": max(scores), "n": len(scores)},
        "config": {"max_train": max_train, "max_eval": 100},
        "data": {"train": {"split": "train", "files": {f"{task}/train.tsv": "ab" * 32}, "n_total": 1000, "n_used": 200},
                 "eval": {"split": "dev", "files": {f"{task}/dev.tsv": "cd" * 32}, "n_total": 500, "n_used": 100}},
        "model_fingerprint": "f" * 16,
        "git_commit": "abc123",
    }


BENCH = {
    "teacher": {"model": "minilm", "params": 22_713_216, "params_with_head": None, "layers": 6,
                "bs1_seconds": {"median": 10.0, "min": 9.0, "max": 12.0, "rounds": [10.0, 9.0, 12.0]},
                "bs32_sentences_per_s": {"median": 100.0, "min": 90.0, "max": 110.0, "rounds": [100.0, 90.0, 110.0]}},
    "student": {"model": "student", "params": 17_389_056, "params_with_head": 17_600_000, "layers": 3,
                "bs1_seconds": {"median": 5.0, "min": 4.5, "max": 6.0, "rounds": [5.0, 4.5, 6.0]},
                "bs32_sentences_per_s": {"median": 190.0, "min": 180.0, "max": 200.0, "rounds": [190.0, 180.0, 200.0]}},
    "speedup_bs1": 2.0, "speedup_bs32": 1.9, "param_ratio": 17_389_056 / 22_713_216,
    "sentences": {"source": "mrpc/dev.tsv", "n": 408, "sha256": "9e" * 32},
    "protocol": "test protocol", "threads": 2, "cpu": "Test CPU", "device": "cpu", "torch": "2.13.0",
}


def make_run_dir(root: Path, *, bench: bool = True, mlm: bool = True, run_json: bool = True) -> Path:
    run = root / "run"
    for variant, tasks in SCORES.items():
        for task, scores in tasks.items():
            d = run / "finetune" / variant / task
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_results(task, scores)))
    (run / "variants.json").write_text(json.dumps({
        "no_ce": {"label": "without L_ce", "paper_key": "without L_ce (L_cos + L_mlm)"},
        "random_init": {"label": "random init", "paper_key": "triple loss, random initialisation"},
    }))
    if bench:
        (run / "bench").mkdir()
        (run / "bench" / "bench.json").write_text(json.dumps(BENCH))
    if mlm:
        (run / "distill").mkdir()
        (run / "distill" / "eval.json").write_text(json.dumps({
            "teacher": {"mlm_accuracy": 0.55, "perplexity": 9.5},
            "student_before": {"mlm_accuracy": 0.21, "perplexity": 120.0},
            "student_after": {"mlm_accuracy": 0.42, "perplexity": 20.25, "seed": 0},
            "masking_seed": 1234, "student_fingerprint": "5f" * 8,
        }))
    if run_json:
        (run / "run.json").write_text(json.dumps({
            "command": "distilkit reproduce --preset quick --data-dir D --out run", "preset": "quick",
            "config": {"teacher": "minilm", "finetune": {"seeds": [1, 2, 3]}}, "seeds": [1, 2, 3],
            "data_checksums": {"wikitext/wiki.train.raw.gz": "9a" * 32}, "git_commit": "abc123",
        }))
    return run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run_dir(tmp_path)


def test_report_values_equal_hand_computed(run_dir):
    rep = write_report(run_dir)
    data = json.loads((run_dir / "report.json").read_text())
    assert data["tasks"].keys() == {"cola", "mrpc", "sst2", "imdb"}
    assert list(data["tasks"]) == ["cola", "mrpc", "sst2", "imdb"]  # paper order, IMDb last
    cola = data["tasks"]["cola"]
    assert cola["teacher"]["median"] == 42.0 and cola["teacher"]["min"] == 40.0 and cola["teacher"]["max"] == 44.0
    assert cola["teacher"]["n"] == 3 and cola["student"]["median"] == 33.0
    assert cola["retention_pct"] == pytest.approx(100 * 33.0 / 42.0)
    assert cola["paper"] == {"BERT-base": 56.3, "DistilBERT": 51.3, "retention_pct": pytest.approx(100 * 51.3 / 56.3)}
    assert data["tasks"]["imdb"]["paper"]["BERT-base"] == 93.46  # Table 2
    assert data["tasks"]["sst2"]["student"] is None and data["tasks"]["sst2"]["retention_pct"] is None
    assert cola["teacher"]["subset"]["max_train"] == 200 and cola["teacher"]["subset"]["n_eval"] == 100

    # GLUE macro over the GLUE tasks both have (sst2 has no student; IMDb is not GLUE), the paper's over the same
    macro = data["macro"]
    assert macro["tasks"] == ["cola", "mrpc"] and macro["not_averaged"] == ["imdb"]
    t_macro, s_macro = (42.0 + 85.0) / 2, (33.0 + 81.0) / 2
    assert macro["teacher"] == pytest.approx(t_macro) and macro["student"] == pytest.approx(s_macro)
    assert macro["retention_pct"] == pytest.approx(100 * s_macro / t_macro)
    pb, pd = (56.3 + 88.6) / 2, (51.3 + 87.5) / 2
    assert macro["paper_same_tasks"]["BERT-base"] == pytest.approx(pb)
    assert macro["paper_same_tasks"]["retention_pct"] == pytest.approx(100 * pd / pb)
    assert macro["paper_published"]["BERT-base"] == 79.5 and macro["paper_published"]["DistilBERT"] == 77.0

    # majority class, headroom retention = 100 (student - majority) / (teacher - majority), per task and macro
    assert cola["majority"] == 0.0 and cola["headroom_retention_pct"] == pytest.approx(100 * 33.0 / 42.0)
    mrpc = data["tasks"]["mrpc"]
    assert mrpc["headroom_retention_pct"] == pytest.approx(100 * (81.0 - 74.8) / (85.0 - 74.8))
    assert data["tasks"]["imdb"]["headroom_retention_pct"] == pytest.approx(100 * (86.0 - 50.0) / (89.0 - 50.0))
    assert macro["majority"] == pytest.approx(74.8 / 2)
    assert macro["headroom_retention_pct"] == pytest.approx(100 * (s_macro - 74.8 / 2) / (t_macro - 74.8 / 2))

    # the students without distillation: same shape as the student, GLUE macro, verdicts on the seed ranges
    assert cola["no_kd"]["median"] == 27.0 and cola["no_kd"]["scores"] == [25.0, 29.0, 27.0]
    assert cola["cut_only"]["seeds"] == [1, 2, 3] and cola["cut_only"]["subset"]["n_train"] == 200
    assert macro["no_kd"] == pytest.approx((27.0 + 81.5) / 2) and macro["cut_only"] == pytest.approx((12.0 + 78.0) / 2)
    verdicts = {t: {b: c["verdict"] for b, c in e["vs_baselines"].items()} for t, e in data["tasks"].items()}
    assert verdicts["cola"] == {"no_kd": "beats", "cut_only": "beats"}  # student min 30 > 29 and > 14
    assert verdicts["mrpc"] == {"no_kd": "overlap", "cut_only": "beats"}  # 80-82 vs 80.5-83; 80 > 79
    assert verdicts["imdb"] == {"no_kd": "overlap", "cut_only": "one_seed"}
    assert verdicts["sst2"] == {}
    assert cola["vs_baselines"]["no_kd"]["delta_median"] == pytest.approx(6.0)

    # ablations: each variant vs the student on the tasks the variant has; the baselines are not ablations
    abl = {a["variant"]: a for a in data["ablations"]}
    assert set(abl) == {"no_ce", "random_init"}
    no_ce = abl["no_ce"]
    assert no_ce["tasks"] == ["cola", "mrpc"]
    assert no_ce["macro"] == pytest.approx((23.0 + 77.0) / 2)
    assert no_ce["student_macro"] == pytest.approx((33.0 + 81.0) / 2)
    assert no_ce["delta"] == pytest.approx((23.0 + 77.0) / 2 - (33.0 + 81.0) / 2)
    assert no_ce["paper_delta"] == -2.96 and no_ce["label"] == "without L_ce"
    rnd = abl["random_init"]
    assert rnd["delta"] == pytest.approx((0.0 + 70.0 + 60.0) / 3 - (33.0 + 81.0 + 86.0) / 3)
    assert rnd["paper_delta"] == -3.69

    # bench beside Table 3
    b = data["bench"]
    assert b["speedup_bs1"] == 2.0 and b["paper"]["params_millions"] == {"BERT-base": 110, "DistilBERT": 66}
    assert b["paper"]["speedup"] == pytest.approx(668 / 410)
    assert data["mlm"]["student_after"]["perplexity"] == 20.25
    pv = data["provenance"]
    assert pv["command"].startswith("distilkit reproduce") and pv["seeds"] == [1, 2, 3]
    assert pv["git_commits"] == ["abc123"]
    assert pv["data_checksums"]["cola/dev.tsv"] == "cd" * 32 and "wikitext/wiki.train.raw.gz" in pv["data_checksums"]
    assert rep["tasks"]["cola"]["retention_pct"] == cola["retention_pct"]
    assert any("sst2: no student results" in n for n in data["notes"])


def test_report_markdown_rows_and_png(run_dir):
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert ("| cola | mcc x100 | 42.0 (40.0–44.0, n=3) | 33.0 (30.0–36.0, n=3) | 78.6% | 0.0 | 78.6% | 56.3 | 51.3 "
            "| 91.1% | train 200 of 1000, eval 100 of 500 |") in md
    assert "| mrpc | mean(f1, acc) x100 | 85.0 (84.0–86.0, n=3) | 81.0 (80.0–82.0, n=3) | 95.3% | 74.8 | 60.8% |" in md
    assert "| sst2 | acc x100 | 90.0 (n=1) | — | — | 50.9 | — |" in md
    headroom = 100 * (57.0 - 37.4) / (63.5 - 37.4)
    assert f"| **GLUE macro** (2 of 9 tasks; paper: same tasks) | mean | **63.5** | **57.0** | **89.8%** | 37.4 | **{headroom:.1f}%** |" in md
    # IMDb on its own line, after the GLUE macro rows
    lines = md.splitlines()
    imdb = next(i for i, line in enumerate(lines) if line.startswith("| imdb (Table 2, not in the GLUE macro) |"))
    assert lines[imdb - 1].startswith("| paper GLUE macro (9 tasks) |")
    assert "**Without distillation** (GLUE macro, same tasks and seeds): no-KD 54.2, cut-only 45.0, against the distilled student's 57.0" in md
    assert f"**Headroom retention {headroom:.1f}%:**" in md and "**imdb** (paper Table 2, not in the GLUE macro)" in md
    # the baselines: one row per model, and a verdict per task
    assert "## Baselines: what distillation has to beat" in md
    assert ("| no-KD (same initial student and tokens, masked-LM loss only) | 27.0 (25.0–29.0, n=3) | 81.5 (80.5–83.0, n=3) "
            "| — | 85.0 (84.0–86.0, n=3) | 54.2 |") in md
    assert "| majority class | 0.0 | 74.8 | 50.9 | 50.0 | 37.4 |" in md
    assert "- cola: the distilled student beats no-KD outside the seed spread (+6.0); beats cut-only outside" in md
    assert "- mrpc: the distilled student shows no measurable difference from no-KD (seed ranges overlap; -0.5);" in md
    assert "; is above cut-only by 6.0 with one seed (spread not measured)." in md
    assert "| without L_ce | `no_ce` | cola, mrpc | 50.0 | 57.0 | -7.00 | -2.96 |" in md
    assert "| teacher | `minilm` | 6 | 22.7M | — | 10.00 (9.00–12.00) | 100.0 | BERT-base: 110M | 668 s |" in md
    assert "speedup 2.00x" in md and "speedup 1.63x" in md
    assert "| model | mlm_accuracy | perplexity |" in md and "| student_after | 42.00% | 20.25 |" in md
    assert "masking seed 1234" in md and "`5f5f5f5f5f5f5f5f`" in md
    assert "distilkit reproduce --preset quick" in md and "`abc123`" in md
    assert "not on STS-B dev" in md
    png = (run_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rep = json.loads((run_dir / "report.json").read_text())
    width = int.from_bytes(png[16:20], "big")  # IHDR: the ablation panel makes the chart wider
    no_abl = render_chart({**rep, "ablations": []})
    assert width > int.from_bytes(no_abl[16:20], "big")
    # the majority floor and the baseline bars are drawn: without them the chart is another picture, narrower
    no_floor = {**rep, "macro": {**rep["macro"], "majority": None},
                "tasks": {t: {**e, "majority": None} for t, e in rep["tasks"].items()}}
    assert render_chart(no_floor) != png
    no_base = {**rep, "tasks": {t: {**e, "no_kd": None, "cut_only": None} for t, e in rep["tasks"].items()}}
    assert int.from_bytes(render_chart(no_base)[16:20], "big") < width
    assert (run_dir / "report.png").stat().st_mode == (run_dir / "report.md").stat().st_mode
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_missing_pieces_are_said(tmp_path):
    run = make_run_dir(tmp_path, bench=False, mlm=False, run_json=False)
    rep = write_report(run)
    assert rep["bench"] is None and rep["mlm"] is None
    notes = "\n".join(rep["notes"])
    assert "no bench/bench.json" in notes and "no distill/eval.json" in notes and "no run.json" in notes
    md = (run / "report.md").read_text()
    assert "Not measured: no `bench/bench.json`" in md and "Masked-LM" not in md
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    # only a bench, no fine-tuning: still a report
    only = tmp_path / "only"
    (only / "bench").mkdir(parents=True)
    (only / "bench" / "bench.json").write_text(json.dumps(BENCH))
    rep = write_report(only)
    assert rep["macro"]["tasks"] == [] and rep["macro"]["retention_pct"] is None and rep["bench"] is not None
    with pytest.raises(DistilkitError, match="nothing to report"):
        build_report(tmp_path / "only" / "bench")


def test_malformed_results_is_a_one_line_error(run_dir, capsys):
    bad = run_dir / "finetune" / "student" / "mrpc" / "results.json"
    bad.write_text('{"task": "mrpc", "seeds": [{"seed": 1, "score": "high"}]}')
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "expected a finite number 'score'" in err
    bad.write_text('{"task": "mrpc", "seeds": [')
    assert main(["report", str(run_dir)]) == 2
    assert f"{bad}:1: expected valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps(_results("cola", [1.0])))
    with pytest.raises(DistilkitError, match="expected task 'mrpc'"):
        build_report(run_dir)
    bad.write_text(json.dumps({**_results("mrpc", [1.0]), "majority": {"score": "74.8"}}))
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}: expected 'majority': an object with a finite number 'score'" in err
    assert not (run_dir / "report.md").exists()


def test_nine_glue_tasks_give_the_glue_macro_beside_the_papers(tmp_path):
    """All nine GLUE tasks run: the GLUE macro is over exactly those nine (IMDb apart), beside 79.5 / 77.0."""
    glue = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    for role, base in (("teacher", 80.0), ("student", 70.0)):
        for i, task in enumerate(glue + ["imdb"]):
            d = tmp_path / "finetune" / role / task
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_results(task, [base + i, base + i + 2.0])))
    rep = write_report(tmp_path)
    macro = rep["macro"]
    assert macro["tasks"] == glue and macro["not_averaged"] == ["imdb"]
    assert macro["teacher"] == pytest.approx(80.0 + 1.0 + 4.0) and macro["student"] == pytest.approx(70.0 + 1.0 + 4.0)
    assert macro["paper_same_tasks"]["BERT-base"] == pytest.approx(79.5)  # the paper's own 9-task score
    assert macro["paper_same_tasks"]["DistilBERT"] == pytest.approx(77.0, abs=0.05)
    maj = sum(MAJORITY.get(t, 50.0) for t in glue) / 9
    assert macro["headroom_retention_pct"] == pytest.approx(100 * (75.0 - maj) / (85.0 - maj))
    md = (tmp_path / "report.md").read_text()
    assert "| **GLUE macro** (all 9 tasks) | mean | **85.0** | **75.0** | **88.2%** |" in md
    assert "| 79.5 | 77.0 | 96.9% |" in md  # the paper's row, printed as published


def test_results_without_majority_leave_headroom_undefined(run_dir):
    """results.json written before the majority class was recorded: retention as before, headroom None."""
    for path in (run_dir / "finetune").glob("*/mrpc/results.json"):
        res = json.loads(path.read_text())
        del res["majority"]
        path.write_text(json.dumps(res))
    rep = build_report(run_dir)
    mrpc, macro = rep["tasks"]["mrpc"], rep["macro"]
    assert mrpc["majority"] is None and mrpc["headroom_retention_pct"] is None
    assert mrpc["retention_pct"] == pytest.approx(100 * 81.0 / 85.0)
    assert macro["majority"] is None and macro["headroom_retention_pct"] is None and macro["retention_pct"] is not None
    assert rep["tasks"]["cola"]["headroom_retention_pct"] == pytest.approx(100 * 33.0 / 42.0)
    assert any("macro headroom retention undefined" in n for n in rep["notes"])
    # a teacher at or below the majority class: no headroom to keep, and the report says so
    path = run_dir / "finetune" / "teacher" / "cola" / "results.json"
    path.write_text(json.dumps({**_results("cola", [0.0, -1.0, 0.0])}))
    rep = build_report(run_dir)
    assert rep["tasks"]["cola"]["headroom_retention_pct"] is None
    assert any("cola: the teacher (0.0) does not beat the majority class (0.0)" in n for n in rep["notes"])


def test_report_cli_and_paper_source(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "retention" in out and "speedup 2.00x" in out
    paper = json.loads(PAPER_FILE.read_text())
    paper["table1_glue_dev"]["BERT-base"][1] = 60.0  # cola
    custom = tmp_path / "paper.json"
    custom.write_text(json.dumps(paper))
    rep = build_report(run_dir, paper_path=custom)
    assert rep["paper_source"] == str(custom) and rep["tasks"]["cola"]["paper"]["BERT-base"] == 60.0
    # default: <data-dir>/../reference/distilbert_paper_tables.json when present, else the bundled copy
    data_dir = tmp_path / "shared" / "data"
    (tmp_path / "shared" / "reference").mkdir(parents=True)
    data_dir.mkdir()
    (tmp_path / "shared" / "reference" / "distilbert_paper_tables.json").write_text(json.dumps(paper))
    assert load_paper(None, data_dir)[1] == str(tmp_path / "shared" / "reference" / "distilbert_paper_tables.json")
    assert load_paper(None, tmp_path / "nowhere")[1] == str(PAPER_FILE)
    assert main(["report", str(run_dir), "--paper", str(tmp_path / "missing.json")]) == 2


def test_bundled_paper_tables_match_reference():
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference not present")
    bundled, ref = json.loads(PAPER_FILE.read_text()), json.loads(REFERENCE.read_text())
    for key in ("table1_glue_dev", "table2_downstream", "table3_size_speed", "table4_ablation_delta_macro"):
        assert bundled[key] == ref[key]


def test_commit_named_by_whoever_copied_the_tree(monkeypatch):
    """DISTILKIT_GIT_COMMIT wins over git (a copied tree's .git may not be its own); unset: git's HEAD."""
    from distilkit.utils import git_commit

    monkeypatch.delenv("DISTILKIT_GIT_COMMIT", raising=False)
    from_git = git_commit()
    monkeypatch.setenv("DISTILKIT_GIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc" != from_git


def test_commit_is_read_once_per_process(monkeypatch):
    """A long run records the commit it started with: once read, git is not asked again (HEAD may move)."""
    import subprocess

    from distilkit import utils

    monkeypatch.delenv("DISTILKIT_GIT_COMMIT", raising=False)
    first = utils.git_commit()
    calls = []

    def moved_head(*args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="f" * 40 + "\n", stderr="")

    monkeypatch.setattr(utils.subprocess, "run", moved_head)
    assert utils.git_commit() == first and calls == []
    utils._git_head.cache_clear()  # a new process would read the moved HEAD
    try:
        assert utils.git_commit() == "f" * 40 + "+dirty" and calls
    finally:
        utils._git_head.cache_clear()


def test_mlm_table_lists_scored_models_only(run_dir):
    """eval.json carries provenance dicts (the machine record): they are not rows of the masked-LM table."""
    from distilkit.report import render_markdown

    path = run_dir / "distill" / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "machine": {"cpu_family": 25, "cores": 2}}))
    section = render_markdown(build_report(run_dir)).split("evaluation (held-out text)")[1].split("##")[0]
    assert "| teacher |" in section and "| student_after |" in section
    assert "machine" not in section and "cpu_family" not in section


def test_headroom_inside_the_teachers_seed_spread_is_marked(run_dir):
    """MRPC's teacher: median above the majority class (74.8), worst seed below it: the headroom retention is
    still computed but marked †, with a note; CoLA's teacher (worst seed 40 > 0) is clear of the floor."""
    path = run_dir / "finetune" / "teacher" / "mrpc" / "results.json"
    path.write_text(json.dumps(_results("mrpc", [74.0, 80.0, 76.0])))
    rep = write_report(run_dir)
    mrpc, cola = rep["tasks"]["mrpc"], rep["tasks"]["cola"]
    assert mrpc["headroom_clear"] is False and cola["headroom_clear"] is True
    assert mrpc["headroom_retention_pct"] == pytest.approx(100 * (81.0 - 74.8) / (76.0 - 74.8))
    assert any(n.startswith("mrpc: the teacher's worst seed (74.0) is not above the majority class (74.8)")
               for n in rep["notes"])
    md = (run_dir / "report.md").read_text()
    mrpc_row = next(line for line in md.splitlines() if line.startswith("| mrpc |"))
    cola_row = next(line for line in md.splitlines() if line.startswith("| cola |"))
    assert f"{100 * 6.2 / 1.2:.1f}% †" in mrpc_row and "†" not in cola_row


def test_mlm_table_has_the_variants_measured_the_same_way(run_dir):
    """variants/<name>/distill/eval.json joins the masked-LM table when its masks and teacher match the main
    student's; a variant scored with other masks is left out (its numbers would not be comparable)."""
    from distilkit.report import render_markdown

    main = json.loads((run_dir / "distill" / "eval.json").read_text())
    for name, seed, acc in (("no_ce", 1234, 0.25), ("random_init", 99, 0.05)):
        d = run_dir / "variants" / name / "distill"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({**main, "masking_seed": seed,
                                                 "student_after": {"mlm_accuracy": acc, "perplexity": 99.0}}))
    rep = build_report(run_dir)
    assert rep["mlm"]["no_ce_after"] == {"mlm_accuracy": 0.25, "perplexity": 99.0}
    assert "random_init_after" not in rep["mlm"]
    section = render_markdown(rep).split("evaluation (held-out text)")[1].split("##")[0]
    assert "| no_ce_after | 25.00% |" in section and "random_init" not in section


def test_baselines_on_fewer_tasks_get_their_own_macro(run_dir):
    """finetune.baseline_tasks: baselines on CoLA only -> the GLUE macro row has none for them, and a macro
    over CoLA compares them with the student's (and the teacher's) on that task, with headroom retentions."""
    import shutil

    for b in ("no_kd", "cut_only"):
        shutil.rmtree(run_dir / "finetune" / b / "mrpc")
    rep = write_report(run_dir)
    macro = rep["macro"]
    assert macro["no_kd"] is None and macro["cut_only"] is None  # not over the student's tasks
    bt = macro["baseline_tasks"]
    assert bt["tasks"] == ["cola"] and bt["teacher"] == 42.0 and bt["student"] == 33.0
    assert bt["no_kd"] == 27.0 and bt["cut_only"] == 12.0 and bt["majority"] == 0.0
    assert bt["headroom_retention_pct"]["cut_only"] == pytest.approx(100 * 12.0 / 42.0)
    md = (run_dir / "report.md").read_text()
    assert "The baselines ran on cola only; macro over those tasks: teacher 42.0, distilled student 33.0" in md
    full = write_report(make_run_dir(run_dir.parent / "full"))
    assert "baseline_tasks" not in full["macro"]  # same tasks as the student: the GLUE macro row says it
