"""`distilkit report RUN_DIR`: one run's results beside the DistilBERT paper's Tables 1-4.

Reads what the pipeline leaves in RUN_DIR (all optional except at least one result):

    run.json                               command, preset, config, seeds, data checksums, provenance
    finetune/<variant>/<task>/results.json per-seed scores ("teacher", "student", the baselines "no_kd" and
                                           "cut_only", ablation variants) and the majority-class score
    bench/bench.json                       parameters and inference time (`distilkit bench`)
    distill/eval.json                      masked-LM accuracy / perplexity before and after distillation
    variants.json                          {"<variant>": {"label": ..., "paper_key": ...}}

and writes RUN_DIR/report.md, report.json (the same content as data) and report.png (a chart), each
atomically. Scores are medians over seeds on the paper's scale (x100); retention = student / teacher;
headroom retention = (student - majority) / (teacher - majority) (see baselines.py). The macro score is
the mean over the GLUE tasks that both teacher and student have (IMDb, the paper's Table 2, and other
non-GLUE tasks get their own lines); the paper's macro is shown both over the same tasks and as
published (9 GLUE tasks). The baseline students are compared with the distilled one per task, on
their seed ranges, and are not listed as ablations.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .baselines import BASELINES, compare_seeds, headroom_clear, headroom_retention, verdict_text
from .utils import DistilkitError, atomic_write_json, atomic_write_text, fail_at, provenance

#: The paper's numbers, bundled (public data from arXiv:1910.01108 v4).
PAPER_FILE = Path(__file__).with_name("paper_tables.json")
#: Table 1 task order, then IMDb (Table 2); other tasks follow alphabetically.
TASK_ORDER = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli", "imdb"]
CORE = ("teacher", "student")
#: How the baseline students (`baselines.BASELINES`) are named in report.md.
BASELINE_NAMES = {"no_kd": "no-KD", "cut_only": "cut-only"}

# =========================================================================== reading inputs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise fail_at(path, exc.lineno, f"expected valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail_at(path, None, f"expected a readable UTF-8 JSON file ({exc.__class__.__name__})") from None


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_paper(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The paper's tables and where they came from: `path`, else `<data_dir>/../reference/
    distilbert_paper_tables.json` when it exists, else the copy bundled with distilkit."""
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise DistilkitError(f"{chosen}: no such paper tables file")
    else:
        ref = Path(data_dir).parent / "reference" / "distilbert_paper_tables.json" if data_dir else None
        chosen = ref if ref is not None and ref.is_file() else PAPER_FILE
    paper = _read_json(chosen)
    for key in ("table1_glue_dev", "table2_downstream", "table3_size_speed", "table4_ablation_delta_macro"):
        if not isinstance(paper, dict) or not isinstance(paper.get(key), dict):
            raise fail_at(chosen, None, f"expected the paper tables with a '{key}' object")
    return paper, str(chosen)


def paper_scores(paper: dict) -> dict[str, dict[str, float | None]]:
    """{"BERT-base": {task: score}, "DistilBERT": {...}} from Table 1 (GLUE dev) and Table 2 (IMDb test)."""
    t1, t2 = paper["table1_glue_dev"], paper["table2_downstream"]
    out: dict[str, dict[str, float | None]] = {}
    for model in ("BERT-base", "DistilBERT"):
        row = dict(zip(t1["tasks"], t1.get(model, [])))
        row.pop("score", None)
        if model in t2 and "imdb_test_accuracy" in t2["columns"]:
            row["imdb"] = t2[model][t2["columns"].index("imdb_test_accuracy")]
        out[model] = row
    return out


def read_results(path: Path, task: str) -> dict[str, Any]:
    """Check one finetune results.json and summarise its seeds: median, min, max, n, per-seed scores."""
    res = _read_json(path)
    if not isinstance(res, dict):
        raise fail_at(path, None, "expected a JSON object (finetune results)")
    if res.get("task", task) != task:
        raise fail_at(path, None, f"expected task '{task}' (the folder name), got {res.get('task')!r}")
    seeds = res.get("seeds")
    if not isinstance(seeds, list) or not all(isinstance(s, dict) for s in seeds):
        raise fail_at(path, None, "expected 'seeds': a list of objects with 'seed' and 'score'")
    scores = [s.get("score") for s in seeds]
    if seeds and all(_is_num(x) for x in scores):
        summary = {"median": statistics.median(scores), "min": min(scores), "max": max(scores), "n": len(scores)}
    elif not seeds and isinstance(res.get("score"), dict) and _is_num(res["score"].get("median")):
        s = res["score"]
        summary = {"median": s["median"], "min": s.get("min", s["median"]), "max": s.get("max", s["median"]),
                   "n": s.get("n", 1)}
        scores = []
    else:
        raise fail_at(path, None, "expected a finite number 'score' in every entry of 'seeds'")
    metrics = {}
    for name in res.get("metric_names") or []:
        values = [s.get("metrics", {}).get(name) for s in seeds]
        if values and all(_is_num(v) for v in values):
            metrics[name] = statistics.median(values)
    majority = res.get("majority")
    if majority is not None and not (isinstance(majority, dict) and _is_num(majority.get("score"))):
        raise fail_at(path, None, "expected 'majority': an object with a finite number 'score'")
    config = res.get("config") if isinstance(res.get("config"), dict) else {}
    data = res.get("data") if isinstance(res.get("data"), dict) else {}
    return {
        **summary,
        "majority": majority["score"] if majority else None,
        "scores": scores,
        "seeds": [s.get("seed") for s in seeds],
        "score_name": res.get("score_name"),
        "metrics": metrics,
        "recorded_median": res.get("score", {}).get("median") if isinstance(res.get("score"), dict) else None,
        "subset": {
            "max_train": config.get("max_train"),
            "max_eval": config.get("max_eval"),
            **{f"n_{k}": v.get("n_used") for k, v in data.items() if isinstance(v, dict) and "n_used" in v},
            **{f"n_{k}_total": v.get("n_total") for k, v in data.items() if isinstance(v, dict) and "n_total" in v},
        },
        "data_files": {f: sha for v in data.values() if isinstance(v, dict)
                       for f, sha in (v.get("files") or {}).items()},
        "model": res.get("model"),
        "model_fingerprint": res.get("model_fingerprint"),
        "git_commit": res.get("git_commit"),
        "path": str(path),
    }


def collect_results(run_dir: Path) -> dict[str, dict[str, dict]]:
    """{variant: {task: summary}} from RUN_DIR/finetune/<variant>/<task>/results.json."""
    out: dict[str, dict[str, dict]] = {}
    root = run_dir / "finetune"
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*/*/results.json")):
        variant, task = path.parent.parent.name, path.parent.name
        out.setdefault(variant, {})[task] = read_results(path, task)
    return out


def _task_key(task: str) -> tuple[int, str]:
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def _optional_json(path: Path, required: dict[str, type]) -> dict | None:
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise fail_at(path, None, "expected a JSON object")
    for key, tp in required.items():
        if not isinstance(data.get(key), tp):
            raise fail_at(path, None, f"expected '{key}' ({tp.__name__})")
    return data


# =========================================================================== building the report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_all(values: list[float | None]) -> float | None:
    """The mean when every value is known, else None."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _majority(task: str, summaries: list[dict | None], notes: list[str]) -> float | None:
    """The task's majority-class score as recorded in its results.json files (the first model's that has
    one: student, teacher, baselines); a note when the models were scored on different eval sets."""
    found = [r["majority"] for r in summaries if r is not None and r["majority"] is not None]
    if found and max(found) - min(found) > 1e-6:
        notes.append(f"{task}: majority-class scores differ between models ({min(found):.1f}-{max(found):.1f}): "
                     "they were evaluated on different subsets")
    return found[0] if found else None


def _retention(student: float | None, teacher: float | None) -> float | None:
    """student / teacher in percent; undefined when the teacher's score is not positive."""
    if student is None or teacher is None or teacher <= 0:
        return None
    return 100.0 * student / teacher


def _bench_section(bench: dict, path: Path, paper: dict) -> dict:
    for role in CORE:
        m = bench.get(role)
        if not isinstance(m, dict) or not _is_num(m.get("params")) or not _is_num(
            (m.get("bs1_seconds") or {}).get("median")
        ):
            raise fail_at(path, None, f"expected '{role}' with 'params' and 'bs1_seconds': {{'median': ...}}")
    t3, claims = paper["table3_size_speed"], paper.get("headline_claims", {})
    cols = t3["columns"]
    p_params = {m: t3[m][cols.index("params_millions")] for m in ("BERT-base", "DistilBERT")}
    p_secs = {m: t3[m][cols.index("cpu_inference_seconds")] for m in ("BERT-base", "DistilBERT")}
    return {
        **{role: bench[role] for role in CORE},
        "speedup_bs1": bench.get("speedup_bs1"),
        "speedup_bs32": bench.get("speedup_bs32"),
        "param_ratio": bench.get("param_ratio", bench["student"]["params"] / bench["teacher"]["params"]),
        "sentences": bench.get("sentences"),
        "protocol": bench.get("protocol"),
        "batch_size": bench.get("batch_size"),
        "threads": bench.get("threads"),
        "cpu": bench.get("cpu"),
        "device": bench.get("device"),
        "torch": bench.get("torch"),
        "loadavg_1min": bench.get("loadavg_1min"),
        "paper": {
            "params_millions": p_params,
            "cpu_inference_seconds": p_secs,
            "param_ratio": p_params["DistilBERT"] / p_params["BERT-base"],
            "speedup": p_secs["BERT-base"] / p_secs["DistilBERT"],
            "claimed_parameter_reduction": claims.get("parameter_reduction"),
            "claimed_speedup": claims.get("inference_speedup"),
            "protocol": "one full pass over the STS-B dev set, batch size 1, CPU (Intel Xeon E5-2690 v3)",
        },
    }


def build_report(run_dir: str | os.PathLike, paper_path: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read RUN_DIR and return the report as data (what report.json holds)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistilkitError(f"{run_dir}: no such run folder")
    run = _optional_json(run_dir / "run.json", {})
    paper, paper_source = load_paper(paper_path, data_dir or (run or {}).get("data_dir"))
    results = collect_results(run_dir)
    bench_path, eval_path = run_dir / "bench" / "bench.json", run_dir / "distill" / "eval.json"
    bench = _optional_json(bench_path, {"teacher": dict, "student": dict})
    mlm = _optional_json(eval_path, {})
    variants_meta = _optional_json(run_dir / "variants.json", {}) or {}
    if mlm is not None:
        mlm = {**mlm, **_variant_mlm(run_dir, mlm, variants_meta)}
    if not results and bench is None and mlm is None:
        raise DistilkitError(f"{run_dir}: expected finetune/<variant>/<task>/results.json, bench/bench.json "
                             "or distill/eval.json (nothing to report)")
    notes: list[str] = []
    pscores = paper_scores(paper)

    # --- Table 1/2: teacher vs student per task, beside the majority class and the baseline students.
    teacher, student = results.get("teacher", {}), results.get("student", {})
    all_tasks = sorted({t for r in results.values() for t in r}, key=_task_key)
    core_tasks = sorted(set(teacher) | set(student), key=_task_key)
    glue = [t for t in paper["table1_glue_dev"]["tasks"] if t != "score"]
    tasks: dict[str, dict] = {}
    for task in core_tasks:
        t, s = teacher.get(task), student.get(task)
        pb, pd = pscores["BERT-base"].get(task), pscores["DistilBERT"].get(task)
        base = {b: results.get(b, {}).get(task) for b in BASELINES}
        majority = _majority(task, [s, t, *base.values()], notes)
        tasks[task] = {
            "score_name": (t or s)["score_name"],
            "glue": task in glue,
            "teacher": t,
            "student": s,
            **base,
            "majority": majority,
            "retention_pct": _retention(s and s["median"], t and t["median"]),
            "headroom_retention_pct": headroom_retention(s and s["median"], t and t["median"], majority),
            "headroom_clear": headroom_clear(t, majority),
            "vs_baselines": {b: compare_seeds(s, r) for b, r in base.items() if r is not None},
            "paper": {"BERT-base": pb, "DistilBERT": pd, "retention_pct": _retention(pd, pb)},
        }
        if t and majority is not None and t["median"] <= majority:
            notes.append(f"{task}: the teacher ({t['median']:.1f}) does not beat the majority class ({majority:.1f}); "
                         "headroom retention undefined")
        elif tasks[task]["headroom_clear"] is False:
            notes.append(f"{task}: the teacher's worst seed ({t['min']:.1f}) is not above the majority class "
                         f"({majority:.1f}): its headroom retention (marked †) rests on a gain inside the seed spread")
        for role, r in (("teacher", t), ("student", s)):
            if r is None:
                notes.append(f"{task}: no {role} results; left out of the macro score")
            elif r["recorded_median"] is not None and abs(r["recorded_median"] - r["median"]) > 1e-6:
                notes.append(f"{r['path']}: recorded median {r['recorded_median']} differs from the median of "
                             f"its seeds {r['median']}; the report uses the latter")
        if t and s:
            if t["median"] <= 0:
                notes.append(f"{task}: teacher score {t['median']:.1f} <= 0, retention undefined")
            keys = ("max_train", "max_eval", "n_train", "n_eval")
            if any(t["subset"].get(k) != s["subset"].get(k) for k in keys):
                notes.append(f"{task}: teacher and student were trained/evaluated on different subsets")
        if pb is None:
            notes.append(f"{task}: not in the paper's tables")

    # --- GLUE macro score over the GLUE tasks both have, and the paper's over the same tasks. Other tasks
    # (IMDb: the paper's Table 2) are reported on their own lines, not averaged in.
    common = [t for t in core_tasks if teacher.get(t) and student.get(t) and t in glue]
    t_macro = _mean([teacher[t]["median"] for t in common])
    s_macro = _mean([student[t]["median"] for t in common])
    m_macro = _mean_all([tasks[t]["majority"] for t in common])
    paper_common = [t for t in common if pscores["BERT-base"].get(t) is not None and pscores["DistilBERT"].get(t) is not None]
    pb_macro = _mean([pscores["BERT-base"][t] for t in paper_common])
    pd_macro = _mean([pscores["DistilBERT"][t] for t in paper_common])
    t1 = paper["table1_glue_dev"]
    pub = {m: t1[m][t1["tasks"].index("score")] for m in ("BERT-base", "DistilBERT")} if "score" in t1["tasks"] else {}
    claims = paper.get("headline_claims", {})
    macro = {
        "scope": "glue",
        "tasks": common,
        "glue_tasks": glue,
        "not_averaged": [t for t in core_tasks if t not in glue],
        "teacher": t_macro,
        "student": s_macro,
        **{b: _mean_all([(results.get(b, {}).get(t) or {}).get("median") for t in common]) for b in BASELINES},
        "majority": m_macro,
        "retention_pct": _retention(s_macro, t_macro),
        "headroom_retention_pct": headroom_retention(s_macro, t_macro, m_macro),
        "paper_same_tasks": {"tasks": paper_common, "BERT-base": pb_macro, "DistilBERT": pd_macro,
                             "retention_pct": _retention(pd_macro, pb_macro)},
        "paper_published": {**pub, "retention_pct": _retention(pub.get("DistilBERT"), pub.get("BERT-base")),
                            "claimed_retention_pct": 100 * claims["retention_of_bert_glue_macro"]
                            if "retention_of_bert_glue_macro" in claims else None},
    }
    if "seed_reproduction" in paper:
        macro["seed_reproduction"] = paper["seed_reproduction"]
    # The baselines may run on fewer tasks (finetune.baseline_tasks): their macro against the student's on those.
    present = [b for b in BASELINES if results.get(b)]
    base_tasks = [t for t in common if all((results.get(b, {}).get(t)) for b in present)]
    if present and base_tasks and base_tasks != common:
        bt_t = _mean([teacher[t]["median"] for t in base_tasks])
        bt_m = _mean_all([tasks[t]["majority"] for t in base_tasks])
        macro["baseline_tasks"] = {
            "tasks": base_tasks,
            "teacher": bt_t,
            "student": _mean([student[t]["median"] for t in base_tasks]),
            **{b: _mean([results[b][t]["median"] for t in base_tasks]) for b in present},
            "majority": bt_m,
        }
        macro["baseline_tasks"]["headroom_retention_pct"] = {
            m: headroom_retention(macro["baseline_tasks"][m], bt_t, bt_m) for m in ["student", *present]}
    for task in macro["not_averaged"]:
        notes.append(f"{task}: reported on its own line, not in the GLUE macro score"
                     + (" (the paper's Table 2)" if task == "imdb" else ""))
    if common and m_macro is None:
        notes.append("no majority-class score for some GLUE task (results.json written before distilkit recorded "
                     "it): macro headroom retention undefined")
    if not results:
        notes.append("no fine-tuning results (finetune/<variant>/<task>/results.json)")

    # --- Table 4: ablations, each against the full-loss student on the same tasks.
    t4 = paper["table4_ablation_delta_macro"]
    ablations = []
    for variant in sorted(v for v in results if v not in CORE and v not in BASELINES):
        meta = variants_meta.get(variant) if isinstance(variants_meta.get(variant), dict) else {}
        same = [t for t in sorted(results[variant], key=_task_key) if student.get(t)]
        v_macro = _mean([results[variant][t]["median"] for t in same])
        st_macro = _mean([student[t]["median"] for t in same])
        key = meta.get("paper_key")
        ablations.append({
            "variant": variant,
            "label": meta.get("label") or variant,
            "tasks": same,
            "macro": v_macro,
            "student_macro": st_macro,
            "delta": None if v_macro is None else v_macro - st_macro,
            "paper_key": key,
            "paper_delta": t4.get(key) if key else None,
        })
        if not same:
            notes.append(f"variant {variant}: no task in common with the student; no delta")

    # --- Table 3 and the masked-LM evaluation.
    bench_section = _bench_section(bench, bench_path, paper) if bench is not None else None
    if bench_section is None:
        notes.append("no bench/bench.json: parameters and speed not measured (run `distilkit bench`)")
    elif "stsb" not in str((bench.get("sentences") or {}).get("source", "")):
        src = bench.get("sentences") or {}
        notes.append(f"speed timed on {src.get('source')} (n={src.get('n')}), not on STS-B dev as in the paper: "
                     "compare the ratios, not the seconds")
    if mlm is None:
        notes.append("no distill/eval.json: masked-LM accuracy/perplexity not reported")

    # --- Provenance.
    commits = sorted({str(r["git_commit"]) for rs in results.values() for r in rs.values() if r["git_commit"]})
    if run and run.get("git_commit"):
        commits = sorted(set(commits) | {str(run["git_commit"])})
    if len(commits) > 1:
        notes.append(f"results come from {len(commits)} different commits: {', '.join(commits)}")
    checksums = dict((run or {}).get("data_checksums") or {})
    for rs in results.values():
        for r in rs.values():
            checksums.update(r["data_files"])
    prov = {
        "command": (run or {}).get("command"),
        "preset": (run or {}).get("preset"),
        "seeds": (run or {}).get("seeds") or sorted({s for rs in results.values() for r in rs.values()
                                                     for s in r["seeds"] if s is not None}),
        "config": (run or {}).get("config"),
        "git_commits": commits,
        "data_checksums": dict(sorted(checksums.items())),
        "model_fingerprints": {v: {t: r["model_fingerprint"] for t, r in rs.items()} for v, rs in results.items()},
        "run_json": run is not None,
    }
    if run is None:
        notes.append("no run.json: the command and config of the run are unknown")

    return {
        "run_dir": str(run_dir),
        "paper_source": paper_source,
        "tasks": tasks,
        "macro": macro,
        "variants": {v: {t: results[v][t] for t in sorted(rs, key=_task_key)} for v, rs in results.items()},
        "all_tasks": all_tasks,
        "ablations": ablations,
        "bench": bench_section,
        "deployment": deployment_section(run_dir, bench),
        "mlm": mlm,
        "paper": {k: paper[k] for k in ("source", "table1_glue_dev", "table2_downstream", "table3_size_speed",
                                        "table4_ablation_delta_macro", "headline_claims") if k in paper},
        "provenance": prov,
        "notes": notes,
        "generated_by": provenance(),
    }


# =========================================================================== markdown


def _f(x: float | None, nd: int = 1, suffix: str = "") -> str:
    return "—" if x is None else f"{x:.{nd}f}{suffix}"


def _p(x: float | None) -> str:
    """A paper number as printed in the paper."""
    if x is None:
        return "—"
    return f"{x:.1f}" if round(x, 1) == x else f"{x:.2f}"


def _score_cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["n"] == 1:
        return f"{r['median']:.1f} (n=1)"
    return f"{r['median']:.1f} ({r['min']:.1f}–{r['max']:.1f}, n={r['n']})"


def _subset_cell(r: dict | None) -> str:
    if r is None:
        return "—"
    s = r["subset"]

    def part(name: str) -> str:
        used, total, cap = s.get(f"n_{name}"), s.get(f"n_{name}_total"), s.get(f"max_{name}")
        if used is not None and total is not None:
            return f"{used} of {total}"
        return "all" if cap is None else f"≤ {cap}"

    return f"train {part('train')}, eval {part('eval')}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _millions(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.1f}M"


def _variant_mlm(run_dir: Path, main: dict[str, Any], variants_meta: dict[str, Any]) -> dict[str, dict]:
    """`<variant>_after`: each pre-trained variant's held-out masked-LM score (variants/<name>/distill/eval.json)
    where it was measured like the main student's (same masking seed, batches and teacher), so the rows of
    one table are comparable; a variant measured otherwise is left out."""
    same = ("masking_seed", "eval_batches", "teacher_fingerprint")
    out: dict[str, dict] = {}
    for name in variants_meta:
        ev = _optional_json(run_dir / "variants" / name / "distill" / "eval.json", {})
        if ev and isinstance(ev.get("student_after"), dict) and all(ev.get(k) == main.get(k) for k in same):
            out[f"{name}_after"] = ev["student_after"]
    return out


def _baselines_section(rep: dict[str, Any]) -> list[str]:
    """Markdown: the distilled student beside the no-KD and cut-only students and the majority class, per
    task and GLUE macro, and per task whether distillation beat each baseline outside the seed spread."""
    tasks, macro = rep["tasks"], rep["macro"]
    if not tasks:
        return []
    present = [b for b in BASELINES if any(e[b] for e in tasks.values())]
    L = ["## Baselines: what distillation has to beat", ""]
    if not present:
        L += ["No students without distillation in this run (set `finetune.baselines: [no_kd, cut_only]` in the "
              "preset to fine-tune a no-KD and a cut-only student with the same protocol).", ""]
    names = list(tasks) + (["GLUE macro"] if macro["tasks"] else [])

    def row(label: str, key: str) -> list[str]:
        cells = [_score_cell(e[key]) if key != "majority" else _f(e["majority"]) for e in tasks.values()]
        return [label] + cells + ([_f(macro.get(key))] if macro["tasks"] else [])

    rows = [row("teacher", "teacher"), row("distilled student", "student")]
    rows += [row(BASELINES[b][0], b) for b in present]
    rows.append(row("majority class", "majority"))
    L += _table(["model"] + names, rows)
    bt = macro.get("baseline_tasks")
    if bt:
        hr = bt["headroom_retention_pct"]
        L += ["", f"The baselines ran on {', '.join(bt['tasks'])} only; macro over those tasks: teacher {_f(bt['teacher'])}, "
              + ", ".join(f"{'distilled student' if m == 'student' else BASELINE_NAMES[m]} {_f(bt[m])} "
                          f"(headroom retention {_f(hr[m], 1, '%')})" for m in hr)
              + f", majority class {_f(bt['majority'])}."]
    verdicts = []
    for task, e in tasks.items():
        said = [verdict_text(c, BASELINE_NAMES[b]) for b, c in e["vs_baselines"].items() if c is not None]
        if said:
            verdicts.append(f"- {task}: the distilled student " + "; ".join(said) + ".")
    if verdicts:
        L += ["", "Beat outside the seed spread = the distilled student's worst seed above the baseline's best.", ""]
        L += verdicts
    L.append("")
    return L


def render_markdown(rep: dict[str, Any]) -> str:
    L: list[str] = [f"# distilkit report: `{rep['run_dir']}`", ""]
    macro, tasks = rep["macro"], rep["tasks"]
    if macro["retention_pct"] is not None:
        L += [f"**The student keeps {macro['retention_pct']:.1f}% of the teacher's GLUE macro score** over "
              f"{', '.join(macro['tasks'])} (paper, same tasks: {_f(macro['paper_same_tasks']['retention_pct'], 1, '%')}; "
              f"paper, 9 GLUE tasks: {_f(macro['paper_published'].get('retention_pct'), 1, '%')})."]
        if macro["headroom_retention_pct"] is not None:
            L += [f"**Headroom retention {macro['headroom_retention_pct']:.1f}%:** of the teacher's gain over the "
                  f"majority class ({_f(macro['teacher'])} vs {_f(macro['majority'])} macro), the student keeps "
                  f"{macro['headroom_retention_pct']:.1f}% ({_f(macro['student'])})."]
        base = [f"{BASELINE_NAMES[b]} {macro[b]:.1f}" for b in BASELINES if macro.get(b) is not None]
        if base:
            L += [f"**Without distillation** (GLUE macro, same tasks and seeds): {', '.join(base)}, against the "
                  f"distilled student's {_f(macro['student'])} (per task below)."]
    for task in macro["not_averaged"]:
        e = tasks[task]
        if e["retention_pct"] is not None:
            L += [f"**{task}** ({'paper Table 2, ' if task == 'imdb' else ''}not in the GLUE macro): retention "
                  f"{e['retention_pct']:.1f}%, headroom retention {_f(e['headroom_retention_pct'], 1, '%')} "
                  f"(paper: {_f(e['paper']['retention_pct'], 1, '%')})."]
    b = rep["bench"]
    if b is not None:
        L += [f"**Size and speed:** the student has {b['param_ratio']:.0%} of the teacher's parameters "
              f"({1 - b['param_ratio']:.0%} fewer) and runs {_f(b['speedup_bs1'], 2)}x faster at batch 1 "
              f"(paper: {b['paper']['param_ratio']:.0%} / {1 - b['paper']['param_ratio']:.0%} fewer, "
              f"{b['paper']['speedup']:.2f}x)."]
    L.append("")

    # Table 1/2
    L += ["## Downstream tasks (paper Tables 1 and 2)", "",
          "Scores on the paper's scale (x100): median over seeds (min–max, number of seeds). "
          "Paper: GLUE dev (Table 1) and IMDb test accuracy (Table 2), medians of 5 seeds on full data.", ""]
    def task_row(task: str, e: dict) -> list[str]:
        p = e["paper"]
        sub = _subset_cell(e["teacher"])
        if e["teacher"] and e["student"] and _subset_cell(e["student"]) != sub:
            sub += f" (student: {_subset_cell(e['student'])})"
        elif e["teacher"] is None:
            sub = _subset_cell(e["student"])
        name = (task if e["glue"] else f"{task} (Table 2, not in the GLUE macro)" if task == "imdb"
                else f"{task} (not GLUE)")
        return [name, e["score_name"] or "", _score_cell(e["teacher"]), _score_cell(e["student"]),
                _f(e["retention_pct"], 1, "%"), _f(e["majority"]),
                _f(e["headroom_retention_pct"], 1, "%") + (" †" if e.get("headroom_clear") is False else ""),
                _p(p["BERT-base"]), _p(p["DistilBERT"]), _f(p["retention_pct"], 1, "%"), sub]

    rows = [task_row(task, e) for task, e in tasks.items() if e["glue"]]
    if macro["tasks"]:
        ps = macro["paper_same_tasks"]
        n = len(macro["tasks"])
        label = ("**GLUE macro** (all 9 tasks)" if n == len(macro["glue_tasks"])
                 else f"**GLUE macro** ({n} of 9 tasks; paper: same tasks)")
        rows.append([label, "mean", f"**{_f(macro['teacher'])}**", f"**{_f(macro['student'])}**",
                     f"**{_f(macro['retention_pct'], 1, '%')}**", _f(macro["majority"]),
                     f"**{_f(macro['headroom_retention_pct'], 1, '%')}**",
                     _f(ps["BERT-base"]), _f(ps["DistilBERT"]), _f(ps["retention_pct"], 1, "%"), ""])
    pub = macro["paper_published"]
    if pub.get("BERT-base") is not None:
        rows.append(["paper GLUE macro (9 tasks)", "mean", "", "", "", "", "", _p(pub["BERT-base"]), _p(pub["DistilBERT"]),
                     _f(pub["retention_pct"], 1, "%") + (f" (claimed {pub['claimed_retention_pct']:.0f}%)"
                                                         if pub.get("claimed_retention_pct") else ""), ""])
    rows += [task_row(task, e) for task, e in tasks.items() if not e["glue"]]
    if tasks:
        L += _table(["task", "metric", "teacher", "student", "retention", "majority class", "headroom retention",
                     "paper BERT-base", "paper DistilBERT", "paper retention", "subset used (train / eval)"], rows)
        L += ["", "Majority class: the score of always predicting the training set's most frequent label (STS-B: "
              "its mean, correlation 0). Headroom retention = (student − majority) / (teacher − majority); "
              "† where the teacher's worst seed is not above the majority class (a small, noisy denominator)."]
    else:
        L.append("No teacher or student fine-tuning results.")
    if "seed_reproduction" in macro:
        sr = macro["seed_reproduction"]
        L += ["", f"For scale: {sr['note']}"] if sr.get("note") else []
    L.append("")

    L += _baselines_section(rep)

    # Every variant on every task
    if set(rep["variants"]) - set(CORE):
        L += ["### All models, per task", ""]
        order = [v for v in CORE if v in rep["variants"]] + sorted(set(rep["variants"]) - set(CORE))
        L += _table(["model"] + rep["all_tasks"],
                    [[v] + [_score_cell(rep["variants"][v].get(t)) for t in rep["all_tasks"]] for v in order])
        L.append("")

    # Table 3
    L += ["## Size and inference speed (paper Table 3)", ""]
    if b is None:
        L += ["Not measured: no `bench/bench.json` (run `distilkit bench`).", ""]
    else:
        pp, pt = b["paper"]["params_millions"], b["paper"]["cpu_inference_seconds"]
        rows = []
        for role, pkey in (("teacher", "BERT-base"), ("student", "DistilBERT")):
            m = b[role]
            s1, s32 = m["bs1_seconds"], m.get("bs32_sentences_per_s") or {}
            rows.append([role, f"`{m.get('model')}`", str(m.get("layers", "—")), _millions(m["params"]),
                         _millions(m.get("params_with_head")),
                         f"{s1['median']:.2f} ({s1['min']:.2f}–{s1['max']:.2f})",
                         _f(s32.get("median"), 1), f"{pkey}: {pp[pkey]}M", f"{pt[pkey]} s"])
        rows.append(["student / teacher", "", "", f"{b['param_ratio']:.2f} ({1 - b['param_ratio']:.0%} smaller)", "",
                     f"speedup {_f(b['speedup_bs1'], 2)}x", f"speedup {_f(b['speedup_bs32'], 2)}x",
                     f"{b['paper']['param_ratio']:.2f} ({1 - b['paper']['param_ratio']:.0%} smaller; "
                     f"claimed {b['paper']['claimed_parameter_reduction']:.0%})",
                     f"speedup {b['paper']['speedup']:.2f}x (claimed {b['paper']['claimed_speedup']:.1f}x)"])
        L += _table(["model", "checkpoint", "layers", "params (encoder)", "with MLM head", "batch-1 pass, s (min–max)",
                     f"batch-{b.get('batch_size') or 32}, sentences/s", "paper params", "paper CPU time"], rows)
        src = b.get("sentences") or {}
        L += ["", f"Sentences: `{src.get('source')}`, n={src.get('n')}"
              + (f", sha256 `{src['sha256'][:16]}…`" if src.get("sha256") else "")
              + f". {b['cpu']}, {b['threads']} threads, torch {b.get('torch')}, device {b.get('device')}.",
              f"Protocol: {b.get('protocol')}."
              + (f" Machine load (1-min average) before/after timing: {load['before']:.1f} / {load['after']:.1f}."
                 if (load := b.get("loadavg_1min") or {}).get("before") is not None and load.get("after") is not None
                 else ""),
              f"Paper protocol: {b['paper']['protocol']}. Absolute seconds depend on the CPU and the sentence set; "
              "compare the ratios.", ""]

    L += render_deployment(rep.get("deployment"))
    # MLM
    if rep["mlm"] is not None:
        mlm = rep["mlm"]
        causal = any(isinstance(v, dict) and "next_token_accuracy" in v for v in mlm.values())  # GPT-2 (families.py)
        L += [f"## {'Next-token (causal-LM)' if causal else 'Masked-LM'} evaluation (held-out text)", ""]
        models = [k for k in ("teacher", "student_before", "student_after") if isinstance(mlm.get(k), dict)]
        models += [k for k, v in mlm.items()  # other scored models; not the provenance dicts (machine, ...)
                   if isinstance(v, dict) and k not in models and ("perplexity" in v or "mlm_accuracy" in v)]
        metrics: list[str] = []
        for k in models:
            metrics += [n for n, v in mlm[k].items() if _is_num(v) and n not in metrics and n != "seed"]
        first = [n for n in ("mlm_accuracy", "next_token_accuracy", "perplexity") if n in metrics]
        metrics = first + [n for n in metrics if n not in first]

        def cell(v: Any, name: str) -> str:
            if not _is_num(v):
                return "—"
            return f"{v:.2%}" if "accuracy" in name and 0 <= v <= 1 else f"{v:.4g}"

        L += _table(["model"] + metrics, [[k] + [cell(mlm[k].get(n), n) for n in metrics] for k in models])
        extra = [f"{k.replace('_', ' ')} {mlm[k]}" for k in ("masking_seed", "eval_batches") if mlm.get(k) is not None]
        extra += [f"{k.replace('_', ' ')} `{mlm[k]}`" for k in ("teacher_fingerprint", "student_fingerprint") if mlm.get(k)]
        L += ["", "Same masked positions for every model: " + "; ".join(extra) + "."] if extra else []
        if any(k.endswith("_after") and k != "student_after" for k in models):
            L += ["`<name>_after`: that variant's (or baseline's) student after its own pre-training "
                  "(`variants/<name>/distill/eval.json`; its settings in `variants.json`)."]
        L.append("")

    # Table 4
    if rep["ablations"]:
        L += ["## Ablations (paper Table 4)", "",
              "Each variant's macro score against the full-loss student on the same tasks "
              "(difference in points; paper: change in GLUE macro score).", ""]
        rows = [[a["label"], f"`{a['variant']}`", ", ".join(a["tasks"]) or "—", _f(a["macro"]), _f(a["student_macro"]),
                 _f(a["delta"], 2, "") if a["delta"] is None else f"{a['delta']:+.2f}",
                 "—" if a["paper_delta"] is None else f"{a['paper_delta']:+.2f}", a["paper_key"] or "—"]
                for a in rep["ablations"]]
        L += _table(["variant", "name", "tasks", "macro", "student macro", "Δ vs student", "paper Δ", "paper row"], rows)
        L.append("")

    L += ["## Chart", "", "![teacher vs student](report.png)", ""]

    # Provenance
    pv = rep["provenance"]
    L += ["## How this was produced", ""]
    L.append(f"- Command: `{pv['command']}`" if pv["command"] else "- Command: unknown (no run.json)")
    if pv["preset"]:
        L.append(f"- Preset: `{pv['preset']}`")
    L.append(f"- Seeds: {pv['seeds']}")
    L.append(f"- Commit(s): {', '.join(f'`{c}`' for c in pv['git_commits']) or 'unknown'}")
    L.append(f"- Paper numbers: `{rep['paper_source']}`")
    g = rep["generated_by"]
    L.append(f"- Report: distilkit {g.get('distilkit_version')} at `{g.get('git_commit')}`, torch {g.get('torch')}, "
             f"transformers {g.get('transformers')}")
    if pv["data_checksums"]:
        L += ["", "Data checksums (sha256):", ""]
        L += _table(["file", "sha256"], [[f"`{f}`", f"`{h}`"] for f, h in pv["data_checksums"].items()])
    fps = [[v, ", ".join(f"`{fp}`" for fp in sorted({fp for fp in ts.values() if fp}))]
           for v, ts in pv["model_fingerprints"].items()]
    if any(row[1] for row in fps):
        L += ["", "Fingerprints of the models that were fine-tuned:", ""] + _table(["model", "fingerprint"], fps)
    if pv["config"] is not None:
        L += ["", "<details><summary>Full config</summary>", "", "```json",
              json.dumps(pv["config"], indent=2, default=str), "```", "", "</details>"]
    if rep["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(L).rstrip() + "\n"


# =========================================================================== chart


def render_chart(rep: dict[str, Any]) -> bytes:
    """PNG bytes: teacher vs student per task (+ macro) with retention labels; size/speed ratios beside it."""
    from matplotlib.figure import Figure

    macro, b = rep["macro"], rep["bench"]
    entries = {t: e for t, e in rep["tasks"].items() if e["teacher"] or e["student"]}
    glue = [t for t, e in entries.items() if e.get("glue", True)]
    tasks = glue + [t for t in entries if t not in glue]  # IMDb after the GLUE macro, on its own
    labels = glue + (["GLUE\nmacro"] if macro["tasks"] else []) + tasks[len(glue):]
    roles = ["teacher", "student"] + [r for r in BASELINES if any(e.get(r) for e in entries.values())]

    def column(key: str) -> list[float | None]:  # per label: a model's median (or the majority score)
        per_task = [entries[t].get(key) if key == "majority" else (entries[t].get(key) or {}).get("median")
                    for t in tasks]
        return per_task[:len(glue)] + ([macro.get(key)] if macro["tasks"] else []) + per_task[len(glue):]

    vals = {role: column(role) for role in roles}
    t_vals, s_vals, floor = vals["teacher"], vals["student"], column("majority")
    ret = [entries[t]["retention_pct"] for t in tasks]
    ret = ret[:len(glue)] + ([macro["retention_pct"]] if macro["tasks"] else []) + ret[len(glue):]

    abl = [a for a in rep.get("ablations", []) if a["delta"] is not None]
    ratios = [max(len(labels), 2)] + ([2.2] if b else []) + ([3.2] if abl else [])
    # inches: the tasks panel (one more per baseline student), size/speed, ablations
    width = 7.5 + 1.0 * (len(roles) - 2) + (3.5 if b else 0.0) + (5.0 if abl else 0.0)
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    axes = list(fig.subplots(1, len(ratios), width_ratios=ratios)) if len(ratios) > 1 else [fig.subplots()]
    ax = axes[0]
    w = 0.76 / len(roles)
    offs = {role: (i - (len(roles) - 1) / 2) * w for i, role in enumerate(roles)}
    xs = list(range(len(labels)))
    colors = {"teacher": "#4C72B0", "student": "#DD8452", "no_kd": "#8C8C8C", "cut_only": "#C4C4C4"}
    names = {"teacher": "teacher", "student": "student", **BASELINE_NAMES}
    for role in roles:
        pts = [(x + offs[role], v) for x, v in zip(xs, vals[role]) if v is not None]
        if pts:
            ax.bar([p[0] for p in pts], [p[1] for p in pts], w, label=names[role], color=colors[role])
    for i, (x, m) in enumerate((x, m) for x, m in zip(xs, floor) if m is not None):  # the majority-class floor
        ax.hlines(m, x - 0.45, x + 0.45, colors="black", lw=1.4, linestyles="dotted",
                  label="majority class" if i == 0 else None)
    every = [v for r in roles for v in vals[r] if v is not None] + [m for m in floor if m is not None]
    top = max(every + [1.0])
    for x, r, s in zip(xs, ret, s_vals):
        if s is not None and r is not None:
            ax.text(x + offs["student"], max(s, 0) + top * 0.015, f"{r:.0f}%", ha="center", va="bottom", fontsize=8)
    for x, t, s in zip(xs, t_vals, s_vals):
        for role, v in (("teacher", t), ("student", s)):
            if v is None:
                ax.text(x + offs[role], top * 0.02, f"no {role}", ha="center", va="bottom", fontsize=7, rotation=90,
                        color="0.4")
    if macro["tasks"]:
        ax.axvline(len(glue) - 0.5, color="0.7", lw=0.8, ls="--")
        if len(tasks) > len(glue):
            ax.axvline(len(glue) + 0.5, color="0.7", lw=0.8, ls="--")
    ax.set_xticks(xs, labels)
    ax.set_ylim(min([0.0] + every), top * 1.25)
    ax.set_ylabel("score (paper scale, median over seeds)")
    ax.set_title("Downstream tasks: teacher vs student (label: retention), baselines", fontsize=10)
    ax.axhline(0, color="black", lw=0.6)
    if labels:
        ax.legend(loc="upper left", ncols=3, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no fine-tuning results", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])

    if b:
        ax2 = axes[1]
        ours = [100 * b["param_ratio"], 100 / b["speedup_bs1"] if b["speedup_bs1"] else None]
        paper = [100 * b["paper"]["param_ratio"], 100 / b["paper"]["speedup"]]
        names = ["parameters", "CPU time\n(batch 1)"]
        for i, (o, p) in enumerate(zip(ours, paper)):
            if o is not None:
                ax2.bar(i - w / 2, o, w, color=colors["student"], label="this run" if i == 0 else None)
                ax2.text(i - w / 2, o + 2, f"{o:.0f}%", ha="center", va="bottom", fontsize=8)
            ax2.bar(i + w / 2, p, w, color="0.65", label="paper" if i == 0 else None)
            ax2.text(i + w / 2, p + 2, f"{p:.0f}%", ha="center", va="bottom", fontsize=8)
        ax2.axhline(100, color="black", lw=0.8, ls="--")
        ax2.set_xticks(range(len(names)), names)
        ax2.set_ylim(0, max([v for v in ours + paper if v is not None] + [100]) * 1.25)
        ax2.set_ylabel("student as % of teacher")
        ax2.set_title("Size and speed (teacher = 100%)", fontsize=10)
        ax2.legend(loc="upper left", ncols=2, fontsize=8)
    if abl:  # Table 4: each variant's macro change against the full-loss student, beside the paper's
        ax3 = axes[-1]
        ys = list(range(len(abl)))
        ax3.barh([y - w / 2 for y in ys], [a["delta"] for a in abl], w, color=colors["student"], label="this run")
        paper_pts = [(y + w / 2, a["paper_delta"]) for y, a in zip(ys, abl) if a["paper_delta"] is not None]
        if paper_pts:
            ax3.barh([p[0] for p in paper_pts], [p[1] for p in paper_pts], w, color="0.65", label="paper")
        ax3.axvline(0, color="black", lw=0.8)
        ax3.set_yticks(ys, [a["label"] for a in abl], fontsize=7)
        ax3.invert_yaxis()
        ax3.set_xlabel("macro score minus full triple loss (points)")
        ax3.set_title("Ablations (paper Table 4)", fontsize=10)
        ax3.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    return buf.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Like `utils.atomic_write_text`, for bytes: temp file in the same folder, usual permissions, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# =========================================================================== deployment: ONNX, int8, bf16 (issue 13)

#: Extended Table 3 rows in display order: bench.json key -> (model, runtime, precision).
DEPLOY_ROWS = {"teacher": ("teacher", "PyTorch", "fp32"), "student": ("student", "PyTorch", "fp32"),
               "student_onnx_fp32": ("student", "ONNX Runtime", "fp32"),
               "student_onnx_int8": ("student", "ONNX Runtime", "int8 (dynamic)"),
               "teacher_bf16": ("teacher", "PyTorch", "bf16"), "student_bf16": ("student", "PyTorch", "bf16")}


def deployment_section(run_dir: Path, bench: dict | None) -> dict | None:
    """The extended Table 3 (bench.json's extra rows beside teacher and student) and the int8 accuracy
    cost per task (RUN_DIR/export/student/<task>/export.json); None when there is neither."""
    rows = []
    if bench is not None and isinstance(bench.get("rows"), dict) and bench["rows"]:
        t1 = bench["teacher"]["bs1_seconds"]["median"]
        t32 = (bench["teacher"].get("bs32_sentences_per_s") or {}).get("median")
        for key, (model, runtime, precision) in DEPLOY_ROWS.items():
            m = bench["rows"].get(key) or (bench.get(key) if key in CORE else None)
            if not isinstance(m, dict) or not _is_num((m.get("bs1_seconds") or {}).get("median")):
                continue
            s32 = (m.get("bs32_sentences_per_s") or {}).get("median")
            rows.append({"key": key, "model": model, "runtime": runtime, "precision": precision,
                         "params": m.get("params"), "file_bytes": m.get("file_bytes"),
                         "bs1_seconds": m["bs1_seconds"], "speedup_bs1": t1 / m["bs1_seconds"]["median"],
                         "bs32_sentences_per_s": s32, "speedup_bs32": s32 / t32 if _is_num(s32) and _is_num(t32) else None})
    exports = {}
    for path in sorted((run_dir / "export" / "student").glob("*/export.json"), key=lambda p: _task_key(p.parent.name)):
        e = _optional_json(path, {"check": dict, "files": dict})
        ev = e.get("eval") or {}
        exports[path.parent.name] = {
            "score_name": ev.get("score_name"), "n_eval": ev.get("n_eval"),
            **{k: (ev.get(k) or {}).get("score") for k in ("pytorch_fp32", "onnx_fp32", "onnx_int8")},
            "int8_cost": e.get("int8_cost"), "max_abs_diff": e["check"].get("max_abs_diff"),
            "check_passed": e["check"].get("passed"), "files": e["files"], "int8_size_ratio": e.get("int8_size_ratio"),
        }
    if not rows and not exports:
        return None
    costs = [x["int8_cost"] for x in exports.values() if _is_num(x["int8_cost"])]
    return {"rows": rows, "batch_size": (bench or {}).get("batch_size"), "exports": exports,
            "mean_int8_cost": _mean(costs)}


def render_deployment(d: dict | None) -> list[str]:
    """Markdown lines of `deployment_section` (nothing when it is None)."""
    if d is None:
        return []
    L = ["## Deployment: ONNX, int8 and bf16 (extended Table 3)", ""]
    if d["rows"]:
        L += ["Encoder forward, timed in the same alternated rounds as Table 3 above; speedups against the "
              "PyTorch fp32 teacher. ONNX rows: the student's encoder exported with `torch.onnx`, run by ONNX Runtime "
              "(CPU); int8: dynamic quantization of the MatMul weights.", ""]
        L += _table(["model", "runtime", "precision", "size", "batch-1 pass, s (min–max)", "speedup bs1",
                     f"batch-{d.get('batch_size') or 32}, sentences/s", f"speedup bs{d.get('batch_size') or 32}"],
                    [[r["model"], r["runtime"], r["precision"],
                      f"{r['file_bytes'] / 1e6:.1f} MB file" if r["file_bytes"] else _millions(r["params"]) + " params",
                      f"{r['bs1_seconds']['median']:.2f} ({r['bs1_seconds']['min']:.2f}–{r['bs1_seconds']['max']:.2f})",
                      f"{r['speedup_bs1']:.2f}x", _f(r["bs32_sentences_per_s"], 1), _f(r["speedup_bs32"], 2, "x")]
                     for r in d["rows"]])
        L.append("")
    if d["exports"]:
        L += ["Accuracy of the fine-tuned student after export (same evaluation examples; `distilkit export --task`):", ""]
        L += _table(["task", "metric", "PyTorch fp32", "ONNX fp32", "ONNX int8", "int8 cost", "max abs diff fp32",
                     "size fp32 → int8"],
                    [[task, x["score_name"] or "", _f(x["pytorch_fp32"], 2), _f(x["onnx_fp32"], 2), _f(x["onnx_int8"], 2),
                      _f(x["int8_cost"], 2), f"{x['max_abs_diff']:.1e}" if _is_num(x["max_abs_diff"]) else "—",
                      " → ".join(f"{v / 1e6:.1f} MB" for v in x["files"].values())] for task, x in d["exports"].items()])
        if d["mean_int8_cost"] is not None:
            L += ["", f"Mean int8 cost: {d['mean_int8_cost']:+.2f} points (fp32 score minus int8 score; positive = int8 is worse)."]
        L.append("")
    return L


# =========================================================================== entry point


def write_report(run_dir: str | os.PathLike, paper: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """`distilkit report`: build the report and write report.png, report.json and report.md in RUN_DIR."""
    rep = build_report(run_dir, paper, data_dir)
    run_dir = Path(run_dir)
    png = render_chart(rep)
    md = render_markdown(rep)
    _atomic_write_bytes(run_dir / "report.png", png)
    atomic_write_json(run_dir / "report.json", rep)
    atomic_write_text(run_dir / "report.md", md)
    return rep
