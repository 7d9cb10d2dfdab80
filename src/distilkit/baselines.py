"""Honest baselines: what a distilled student has to beat before distillation can claim any credit.

Retention (student / teacher) alone flatters a student on tasks where a constant guess already scores
high (MRPC: predicting "equivalent" gives mean(F1, acc) = 74.8 on dev). So every report also gives,
per task:

- the **majority-class score** (`majority_score`): predict the training set's most frequent label (for
  regression, the training mean) for every eval example, scored with the task's own metric. On the
  paper's scale; Matthews correlation and Pearson/Spearman of a constant prediction are 0;
- the **headroom retention** (`headroom_retention`): 100 * (student - majority) / (teacher - majority),
  the share of the teacher's gain over that floor that the student keeps;
- two students **without** distillation, fine-tuned with the same protocol and seeds as the distilled
  one (`baseline_variants`, from `finetune.baselines` in a preset): `no_kd`, the same initial student
  trained on the same tokens for the same steps with the masked-LM loss only (alpha_ce = alpha_cos = 0),
  and `cut_only`, the initial student cut from the teacher with no further pre-training;
- whether distillation beat each baseline **outside the seed spread** (`compare_seeds`): the student's
  worst seed above the baseline's best.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tasks import Example, Task
from .utils import DistilkitError

#: name -> (label, VariantSection fields). `no_kd` keeps the main distillation config (same corpus, steps,
#: batch and seed) and only switches the teacher's two terms off; `cut_only` is not pre-trained at all.
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "no_kd": ("no-KD (same initial student and tokens, masked-LM loss only)",
              {"init": "teacher", "distill": {"alpha_ce": 0.0, "alpha_cos": 0.0}}),
    "cut_only": ("cut-only (the initial student, no pre-training)", {"init": "none"}),
}


# =========================================================================== the majority class


def majority_prediction(task: Task, train_examples: list[Example]) -> int | float:
    """The constant a model that ignores its input would predict: the most frequent training label
    (the smallest label id on a tie), or the training mean for a regression task."""
    if not train_examples:
        raise DistilkitError(f"{task.name}: no training examples to take the majority class from")
    labels = np.array([e.label for e in train_examples])
    if task.is_regression:
        return float(labels.astype(np.float64).mean())
    return int(np.bincount(labels.astype(np.int64), minlength=task.num_labels).argmax())


def majority_baseline(task: Task, train_examples: list[Example], eval_examples: list[Example]) -> dict[str, Any]:
    """{"prediction", "metrics", "score"}: the training majority class (or mean) predicted for every eval
    example, scored with the task's metric (score on the paper's scale, x100)."""
    pred = majority_prediction(task, train_examples)
    labels = np.array([e.label for e in eval_examples])
    metrics = task.metric_fn(np.full(len(labels), pred), labels)
    return {"prediction": pred, "metrics": metrics, "score": float(task.score_fn(metrics))}


def majority_score(task: Task, train_examples: list[Example], eval_examples: list[Example]) -> float:
    """The paper-scale score of always predicting the training majority class (mean for regression)."""
    return majority_baseline(task, train_examples, eval_examples)["score"]


# =========================================================================== arithmetic


def headroom_retention(student: float | None, teacher: float | None, majority: float | None) -> float | None:
    """100 * (student - majority) / (teacher - majority): the share of the teacher's gain over the
    majority class that the student keeps. None when a value is missing or the teacher does not beat
    the majority class (no headroom to keep)."""
    if student is None or teacher is None or majority is None or teacher <= majority:
        return None
    return 100.0 * (student - majority) / (teacher - majority)


def headroom_clear(teacher: dict | None, majority: float | None) -> bool | None:
    """Is the teacher above the majority class on every seed (its worst seed above the floor)? Where it is
    not, the headroom (teacher - majority) is inside the teacher's own seed spread and a headroom retention
    divides by noise. None when a value is missing or the teacher has a single seed (no spread measured)."""
    if not teacher or majority is None or teacher.get("n", 0) < 2:
        return None
    return teacher["min"] > majority


def compare_seeds(student: dict | None, baseline: dict | None) -> dict[str, Any] | None:
    """Did the distilled student beat a baseline outside the seed spread? Both are seed summaries with
    "min", "max", "median" and "n". verdict: "beats" (student's min > baseline's max), "below" (student's
    max < baseline's min), "overlap" (no measurable difference), or "one_seed" (a side has a single seed:
    no spread was measured, only the sign of the difference is known)."""
    if not student or not baseline:
        return None
    if student["n"] < 2 or baseline["n"] < 2:
        verdict = "one_seed"
    elif student["min"] > baseline["max"]:
        verdict = "beats"
    elif student["max"] < baseline["min"]:
        verdict = "below"
    else:
        verdict = "overlap"
    return {"verdict": verdict, "delta_median": student["median"] - baseline["median"],
            "student_range": [student["min"], student["max"]], "baseline_range": [baseline["min"], baseline["max"]]}


def verdict_text(cmp: dict[str, Any], name: str) -> str:
    """The distilled student ... : one phrase for report.md, e.g. "beats no-KD outside the seed spread (+2.1)"."""
    d = cmp["delta_median"]
    return {
        "beats": f"beats {name} outside the seed spread ({d:+.1f})",
        "below": f"is below {name} outside the seed spread ({d:+.1f})",
        "overlap": f"shows no measurable difference from {name} (seed ranges overlap; {d:+.1f})",
        "one_seed": f"is {'above' if d > 0 else 'below' if d < 0 else 'equal to'} {name} by {abs(d):.1f} "
                    "with one seed (spread not measured)",
    }[cmp["verdict"]]


# =========================================================================== pipeline variants


def _field(section: Any, key: str) -> Any:
    return section.get(key) if isinstance(section, dict) else getattr(section, key, None)


def baseline_variants(cfg: Any) -> list:
    """The built-in `VariantSection`s for the names in `cfg.finetune.baselines` (a `ReproduceConfig`);
    fine-tuned on every task with the student's seeds. Raises on unknown or clashing names."""
    from .pipeline import VariantSection  # the pipeline imports this module inside its stages

    names = list(cfg.finetune.baselines or [])
    taken = {v.name for v in cfg.variants}
    out = []
    for name in dict.fromkeys(names):
        if name not in BASELINES:
            raise DistilkitError(f"finetune.baselines: unknown baseline '{name}', expected any of {sorted(BASELINES)}")
        if name in taken:
            raise DistilkitError(f"variants: '{name}' is the name of a built-in baseline (finetune.baselines); "
                                 "rename the variant")
        label, fields = BASELINES[name]
        fields = {**fields, "distill": dict(fields.get("distill", {}))}
        if fields["init"] != "none" and _field(cfg.distill, "alpha_mlm") == 0:
            from .config import DistillConfig  # the main loss has no masked-LM term: use the default weight

            fields["distill"]["alpha_mlm"] = DistillConfig().alpha_mlm
        out.append(VariantSection(name=name, label=label, **fields))
    return out
