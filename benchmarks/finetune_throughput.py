#!/usr/bin/env python
"""Fine-tuning throughput: examples/s of `distilkit.finetune.train` for CoLA and MRPC, teacher and student,
fp32 vs bf16 autocast.

    python benchmarks/finetune_throughput.py --data-dir ../shared/data --threads 2 --rounds 3 --steps 6 \
        --out benchmarks/results/finetune_throughput.json

Teacher: `minilm` (all-MiniLM-L6-v2, a 6-layer 384-wide BERT) as `AutoModelForSequenceClassification`
(`finetune.load_classifier`); student: a 3-layer DistilBERT cut from it (`student.init_student`, teacher
layers 0, 2, 4, saved into a temporary folder). Each timed block is `finetune.train` itself (the real
step: length-grouped batches, collation, forward, task loss, backward, clipping, fused AdamW, schedule)
on a seeded random subset of `--steps` x the task's batch size of the real train file, on a fresh copy
of the model, under an Accelerator with mixed_precision "no" (fp32) or "bf16" (`finetune._accelerator`,
as `distilkit finetune` builds it). Every (task, model, precision) runs one untimed step, then rounds
alternate all of them (order reversed every round); os.getloadavg() is recorded after every round.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from distilkit import finetune, hardware, models
from distilkit.config import FinetuneConfig, to_dict
from distilkit.student import init_student
from distilkit.tasks import get_task, load_split
from distilkit.utils import atomic_write_json, model_fingerprint, provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_throughput import _data_dir, _progress, _spread, load_average  # noqa: E402  (the helpers of both benchmarks)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "finetune_throughput.json"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


class Workload:
    """One (task, model) pair: the tokenized subset, the hyper-parameters and the starting classifier."""

    def __init__(self, task_name: str, model_name: str, path: str, data_dir: Path, steps: int, seed: int):
        self.task = get_task(task_name)
        self.name = f"{task_name}/{model_name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            self.model = finetune.load_classifier(path, self.task)
        tokenizer = models.load_tokenizer(path)
        self.pad_id = finetune._pad_id(tokenizer)
        self.cfg = FinetuneConfig(seeds=[seed], epochs=1.0)
        self.hp = finetune.resolve_hparams(self.cfg, self.task, finetune.max_positions(self.model.config))
        examples = load_split(self.task, str(data_dir), "train")
        idx = finetune.subset_indices(len(examples), steps * self.hp.batch_size, seed)
        self.feats = finetune.tokenize([examples[i] for i in idx], tokenizer, self.hp.max_length, self.hp.truncation)
        self.n_train = len(examples)
        self.seed = seed

    def run(self, precision: str, warmup: bool = False) -> dict[str, Any]:
        """`finetune.train` over the subset (one epoch; `warmup`: its first batch only) on a fresh copy."""
        accelerator = finetune._accelerator(PRECISIONS[precision])
        model = copy.deepcopy(self.model)
        feats = self.feats
        if warmup:
            n = self.hp.batch_size
            feats = finetune.Features(feats.input_ids[:n], feats.token_type_ids[:n], feats.labels[:n])
        _, stats = finetune.train(model, self.task, feats, self.hp, self.cfg, self.seed, self.pad_id, accelerator)
        tokens = int(feats.lengths.sum())
        return {"examples_per_s": stats["train_examples_per_s"], "tokens_per_s": tokens / stats["train_wall_s"],
                "steps": stats["steps"], "loss": stats["train_loss"][-1], "accelerator_precision": str(accelerator.mixed_precision)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    quiet = args.quiet
    hardware.tune_allocator()  # as the CLI does (off with DISTILKIT_MALLOC_TUNING=0)
    os.environ.setdefault("DISTILKIT_NO_PROGRESS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = _data_dir(args.data_dir)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SystemExit(f"--precisions: expected a list of {', '.join(PRECISIONS)}, got {args.precisions!r}")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="distilkit-ftbench-") as tmp:
        teacher_path = models.resolve_model(args.teacher)
        student_path = str(Path(tmp) / "student")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            init_student(args.teacher, student_path, layers=[int(x) for x in args.layers.split(",")])
        _progress("loading data and models", quiet)
        workloads = [Workload(t, name, path, data_dir, args.steps, args.seed)
                     for t in args.tasks.split(",") for name, path in (("teacher", teacher_path), ("student", student_path))]
        blocks = [(w, p) for w in workloads for p in precisions]
        for w, p in blocks:  # warm-up: one untimed step of each
            w.run(p, warmup=True)
        rates: dict[str, list[dict[str, Any]]] = {f"{w.name}/{p}": [] for w, p in blocks}
        loads = []
        for r in range(args.rounds):
            for w, p in (blocks if r % 2 == 0 else blocks[::-1]):
                rates[f"{w.name}/{p}"].append(w.run(p))
                _progress(f"round {r + 1}/{args.rounds} {w.name}/{p}: {rates[f'{w.name}/{p}'][-1]['examples_per_s']:.1f} ex/s", quiet)
            loads.append(load_average())
        results: dict[str, Any] = {}
        for w, p in blocks:
            rs = rates[f"{w.name}/{p}"]
            results[f"{w.name}/{p}"] = {
                "examples_per_s": _spread([x["examples_per_s"] for x in rs]),
                "tokens_per_s": _spread([x["tokens_per_s"] for x in rs]),
                "steps_per_round": rs[0]["steps"], "examples_per_round": len(w.feats),
                "mean_tokens_per_example": round(float(w.feats.lengths.mean()), 1),
                "batch_size": w.hp.batch_size, "max_length": w.hp.max_length, "train_examples_in_file": w.n_train,
                "accelerator_precision": rs[0]["accelerator_precision"], "last_loss": round(rs[-1]["loss"], 4),
                "params": models.count_parameters(w.model),
            }
        ratios: dict[str, Any] = {}
        for w in workloads:
            if {"fp32", "bf16"} <= set(precisions):
                a, b = results[f"{w.name}/bf16"], results[f"{w.name}/fp32"]
                ratios[f"{w.name}/bf16_vs_fp32"] = {
                    "ratio_of_medians": round(a["examples_per_s"]["median"] / b["examples_per_s"]["median"], 3),
                    "per_round": [round(x / y, 3) for x, y in zip(a["examples_per_s"]["rounds"], b["examples_per_s"]["rounds"])]}
        for t in args.tasks.split(","):
            for p in precisions:
                a, b = results[f"{t}/student/{p}"], results[f"{t}/teacher/{p}"]
                ratios[f"{t}/student_vs_teacher/{p}"] = {
                    "ratio_of_medians": round(a["examples_per_s"]["median"] / b["examples_per_s"]["median"], 3),
                    "per_round": [round(x / y, 3) for x, y in zip(a["examples_per_s"]["rounds"], b["examples_per_s"]["rounds"])]}
        out = {
            **provenance(),
            "benchmark": "finetune_throughput",
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("finetune_throughput.py") else None,
            "results": results,
            "ratios": ratios,
            "protocol": {
                "rounds": args.rounds, "steps_per_block": args.steps, "tasks": args.tasks.split(","), "precisions": precisions,
                "timed": "finetune.train over the subset: length-grouped batches, collation, forward, task loss, backward, "
                         "clipping, fused AdamW, schedule (one epoch; the task's default batch size and max length)",
                "order": "every (task, model, precision) one untimed step, then rounds alternating all of them, reversed every round",
            },
            "teacher": {"name": args.teacher, "resolved": teacher_path, "fingerprint": model_fingerprint(workloads[0].model)},
            "student": {"layers": [int(x) for x in args.layers.split(",")], "made_by": "student.init_student"},
            "config": to_dict(workloads[0].cfg),
            "machine": {**hardware.machine_record(), "load_before": load_before, "load_after_each_round": loads,
                        "load_note": "os.getloadavg() (1, 5, 15 min); the machine is shared"},
            "seconds": round(time.time() - started, 1),
        }
    atomic_write_json(Path(args.out), out)
    _progress(f"wrote {args.out}", quiet)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="shared data folder (default ../shared/data)")
    p.add_argument("--teacher", default="minilm", help="teacher alias or folder (default minilm)")
    p.add_argument("--layers", default="0,2,4", help="teacher layers copied into the student (default 0,2,4)")
    p.add_argument("--tasks", default="cola,mrpc")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="training steps per timed block")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    r = main()
    for k, v in r["results"].items():
        print(f"{k}: {v['examples_per_s']['median']:.1f} examples/s")
    for k, v in r["ratios"].items():
        print(f"{k}: {v['ratio_of_medians']}")
