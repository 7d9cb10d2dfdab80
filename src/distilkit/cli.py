"""`distilkit` command line: one command per pipeline stage.

Every command is a thin wrapper over an importable function. User errors (`DistilkitError`) are
printed as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from . import __version__
from .utils import DistilkitError, git_commit


def _quiet_libraries() -> None:
    """Keep transformers' load reports and progress bars out of the way of ours."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# =========================================================================== init-student


def _add_init_student(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-student", help="build a DistilBERT student from a BERT teacher (one layer out of two)")
    p.add_argument("--teacher", required=True, help="teacher folder, hub id, or 'minilm' (bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="output folder for the student")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", help="comma-separated teacher layers to copy, e.g. 0,2,4,7,9,11")
    g.add_argument("--every", type=int, default=2, help="copy one teacher layer out of EVERY, from 0 (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_init_student)


def _cmd_init_student(args: argparse.Namespace) -> int:
    from .student import init_student, parse_layers

    layers = parse_layers(args.layers) if args.layers is not None else None
    s = init_student(args.teacher, args.out, layers=layers, every=args.every, overwrite=args.overwrite)
    print(f"student: {len(s.layers)} layers copied from teacher layers {s.layers} -> {s.out}")
    print(
        f"parameters: teacher {s.teacher_params / 1e6:.1f}M ({s.teacher_params_no_head / 1e6:.1f}M without MLM head), "
        f"student {s.student_params / 1e6:.1f}M ({s.student_params_no_head / 1e6:.1f}M without MLM head)"
    )
    return 0


# =========================================================================== adapt-teacher


def _stage_config(cls, path: str | None, overrides: list[str], section: str):
    """Load a stage config from YAML (its fields at top level, or under `section`) plus --set overrides."""
    from .config import load_config, read_yaml

    use = section if path and section in read_yaml(path) else None
    return load_config(cls, path, overrides, section=use)


def _print_mlm_scores(label: str, before: dict, after: dict) -> None:
    if before and after:
        if "next_token_accuracy" in after:  # causal-LM family (GPT-2): families.evaluate_clm
            print(f"{label}: held-out next-token top-1 {before['next_token_accuracy']:.2%} -> "
                  f"{after['next_token_accuracy']:.2%}, perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}")
            return
        print(f"{label}: held-out MLM top-1 {before['mlm_accuracy']:.2%} -> {after['mlm_accuracy']:.2%}, "
              f"perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f} ({after['n_masked']} masked tokens)")


def _add_adapt_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt-teacher", help="masked-LM training of a teacher without an MLM head (e.g. minilm)")
    p.add_argument("--teacher", required=True, help="BERT teacher folder, hub id, or 'minilm'")
    p.add_argument("--corpus", required=True, help="prepared corpus folder (distilkit prepare-corpus)")
    p.add_argument("--out", required=True, help="output folder: the adapted BertForMaskedLM, adapt.json, checkpoints/")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--config", help="YAML file with AdaptConfig fields (top level or under 'adapt_teacher')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=_cmd_adapt_teacher)


def _cmd_adapt_teacher(args: argparse.Namespace) -> int:
    import dataclasses

    from .adapt import adapt_teacher
    from .config import AdaptConfig

    cfg = _stage_config(AdaptConfig, args.config, args.set, "adapt_teacher")
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    r = adapt_teacher(args.teacher, args.corpus, args.out, cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only rank 0 reports
        return 0
    print(f"adapt-teacher: {r['steps']} steps, {r['tokens']:,} tokens, {r['tokens_per_s']:.0f} tokens/s "
          f"on {r['world_size']} process(es) -> {args.out}")
    _print_mlm_scores("adapt-teacher", r["before"], r["after"])
    return 0


# =========================================================================== prepare-corpus


def _add_prepare_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-corpus", help="tokenize text files into fixed [CLS] ... [SEP] blocks (memory-mapped shards)"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer: model folder, hub id, or 'minilm'")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="UTF-8 text files (.gz accepted), JSONL / CSV / Parquet files, or hub dataset ids with --text-field")
    p.add_argument("--text-field", metavar="NAME", help="the text field of JSONL / CSV / Parquet records (default: text)")
    p.add_argument("--out", required=True, help="output corpus folder")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block including [CLS] and [SEP] (default 128)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--heldout-fraction", type=float, default=0.0, metavar="F",
                   help="put each block into the 'heldout' split with probability F (seeded)")
    g.add_argument("--heldout", nargs="+", metavar="FILE", help="files for the 'heldout' split (e.g. wiki.valid.raw.gz)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out block assignment (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_corpus)


def _cmd_prepare_corpus(args: argparse.Namespace) -> int:
    from .corpus import prepare_corpus

    meta = prepare_corpus(
        args.tokenizer, args.input, args.out, block_size=args.block_size, heldout_fraction=args.heldout_fraction,
        heldout_inputs=args.heldout, seed=args.seed, overwrite=args.overwrite,
        progress=False if args.no_progress else None, text_field=args.text_field,
    )
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens in {info['blocks']:,} blocks of {meta['block_size']} "
              f"({len(info['shards'])} shard(s), {meta['dtype']})")
    print(f"dropped (final partial block): {sum(meta['tokens_dropped'].values())} tokens; "
          f"{meta['seconds']:.1f}s -> {args.out}")
    return 0


# =========================================================================== distill


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="triple-loss distillation of a student from a teacher on a prepared corpus")
    p.add_argument("--teacher", required=True, help="BERT teacher with an MLM head (folder, hub id; see adapt-teacher)")
    p.add_argument("--student", required=True, help="DistilBERT student folder (distilkit init-student)")
    p.add_argument("--corpus", required=True, help="prepared corpus folder (distilkit prepare-corpus)")
    p.add_argument("--out", required=True, help="output folder: final/, distill.json, eval.json, metrics.jsonl, checkpoints/")
    p.add_argument("--config", help="YAML file with DistillConfig fields (top level or under 'distill'), or a preset name, e.g. cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. steps=1000 or alpha_cos=0 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from .config import DistillConfig
    from .distill import distill

    cfg = _stage_config(DistillConfig, args.config, args.set, "distill")
    r = distill(args.teacher, args.student, args.corpus, args.out, cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only rank 0 reports
        return 0
    print(f"distill: {r['steps']} steps, {r['tokens']:,} tokens, {r['tokens_per_s']:.0f} tokens/s on "
          f"{r['world_size']} process(es), accumulation {r['accumulation']} -> {r['final']}")
    ev = r.get("eval")
    if ev:
        t = ev["teacher"]
        kind, acc = ("next-token", t["next_token_accuracy"]) if "next_token_accuracy" in t else ("MLM", t["mlm_accuracy"])
        print(f"distill: teacher held-out {kind} top-1 {acc:.2%} (ppl {t['perplexity']:.1f})")
        _print_mlm_scores("distill: student", ev["student_before"], ev["student_after"])
    return 0


# =========================================================================== finetune / evaluate


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from .tasks import TASKS

    p = sub.add_parser("finetune", help="fine-tune a teacher or student on a GLUE task or IMDb (one run per seed)")
    p.add_argument("--model", required=True, help="model folder (BERT or DistilBERT), hub id, or 'minilm'")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data-dir", required=True, help="folder holding <task>/... files (e.g. ../shared/data), or hf:[PATH[:CONFIG]]")
    p.add_argument("--out", required=True, help="output folder: results.json and model/ (the first seed's model)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3 (default 1)")
    p.add_argument("--epochs", type=float, help="epochs (may be fractional; default: per task)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: per task)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: per task)")
    p.add_argument("--max-length", type=int, help="max tokens per example incl. special tokens (default: per task)")
    p.add_argument("--max-train", type=int, help="use a seeded random subset of N training examples")
    p.add_argument("--max-eval", type=int, help="use a seeded random subset of N evaluation examples")
    p.add_argument("--distill-from", help="fine-tuned teacher folder: task-specific distillation (the paper's '(D)')")
    p.add_argument("--alpha-kd", type=float, help="weight of the distillation loss (default 0.5)")
    p.add_argument("--temperature", type=float, help="distillation temperature (default 2.0)")
    p.add_argument("--save-models", choices=["first", "all", "none"], help="which fine-tuned models to save (default first)")
    p.add_argument("--config", help="YAML file with FinetuneConfig fields (top level or under 'finetune')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--allow-task-mismatch", action="store_true",
                   help="accept a --distill-from teacher that was not fine-tuned on --task")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import FinetuneConfig
    from .finetune import finetune, parse_seeds

    cfg = _stage_config(FinetuneConfig, args.config, args.set, "finetune")
    flags = {  # explicit options win over --config and --set
        "seeds": parse_seeds(args.seeds) if args.seeds is not None else None,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "max_train": args.max_train, "max_eval": args.max_eval, "distill_from": args.distill_from,
        "alpha_kd": args.alpha_kd, "temperature": args.temperature, "save_models": args.save_models,
        "overwrite": args.overwrite or None,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    r = finetune(args.model, args.task, args.data_dir, args.out, cfg, allow_task_mismatch=args.allow_task_mismatch)
    for s in r["seeds"]:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
        print(f"seed {s['seed']}: {metrics}; {r['score_name']} {s['score']:.2f} "
              f"({s['n_train']} train / {s['n_eval']} eval examples, {s['train_wall_s']:.0f}s)")
    sc = r["score"]
    print(f"{r['task']} {r['score_name']}: median {sc['median']:.2f} (min {sc['min']:.2f}, max {sc['max']:.2f}, "
          f"{sc['n']} seed(s)) -> {args.out}/results.json")
    for split, sc in r.get("also_eval", {}).items():  # MNLI: dev_mismatched beside dev_matched
        print(f"{r['task']} {split} {r['score_name']}: median {sc['median']:.2f} (min {sc['min']:.2f}, max {sc['max']:.2f})")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .tasks import TASKS

    p = sub.add_parser("evaluate", help="score a fine-tuned model on a task's evaluation split")
    p.add_argument("--model", required=True, help="fine-tuned model folder (e.g. RUN/model)")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data-dir", required=True, help="folder holding <task>/... files, or hf:[PATH[:CONFIG]]")
    p.add_argument("--max-eval", type=int, help="use a seeded random subset of N evaluation examples")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--max-length", type=int, help="max tokens (default: as fine-tuned, else per task)")
    p.add_argument("--out", help="JSON file to write (default: eval.json beside the model folder, in its parent; "
                                 "eval-TASK.json with --allow-task-mismatch)")
    p.add_argument("--allow-task-mismatch", action="store_true",
                   help="score a model that distilkit did not fine-tune on --task")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .finetune import evaluate, finetune_meta
    from .models import resolve_model

    out = args.out
    if out is None and Path(args.model).is_dir():  # eval.json; eval-TASK.json for a task it was not fine-tuned on
        path = resolve_model(args.model)
        same = finetune_meta(path).get("task") in (None, args.task)
        out = str(Path(path).resolve().parent / ("eval.json" if same else f"eval-{args.task}.json"))
    r = evaluate(args.model, args.task, args.data_dir, args.max_eval, batch_size=args.batch_size,
                 max_length=args.max_length, out=out, allow_task_mismatch=args.allow_task_mismatch)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    print(f"{r['task']} ({r['n_eval']} examples): {metrics}; {r['score_name']} {r['score']:.2f}"
          + (f" -> {out}" if out else ""))
    for split, res in r.get("also_eval", {}).items():
        print(f"{r['task']} {split} ({res['n_eval']} examples): {r['score_name']} {res['score']:.2f}")
    return 0


# =========================================================================== bench / report / reproduce


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="parameters and CPU inference time of teacher vs student (paper Table 3)")
    p.add_argument("--teacher", required=True, help="teacher folder, hub id, or 'minilm'")
    p.add_argument("--student", required=True, help="student folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sentences", help="plain text, one sentence per line (a tab separates a pair)")
    g.add_argument("--task", help="time a task's eval split, e.g. stsb (the paper's set) or mrpc; needs --data-dir")
    p.add_argument("--data-dir", help="data folder for --task (default task: stsb)")
    p.add_argument("--split", default="eval", help="split of --task (default: eval = the scored split, dev for GLUE)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per model, alternating (default 5)")
    p.add_argument("--max-sentences", type=int, help="time only the first N examples")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput pass (default 32)")
    p.add_argument("--warmup", type=int, default=32, help="untimed warm-up examples per model (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu, as in the paper)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", help="write the result JSON here (e.g. RUN_DIR/bench/bench.json)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction,
                   help="also time the student as ONNX fp32 and int8 (default: when onnxruntime is installed)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="also time both models in bf16 (default: when the CPU computes bf16 natively)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, load_sentences, summary_lines
    from .utils import atomic_write_json

    if args.task is not None and args.data_dir is None:
        raise DistilkitError("--task needs --data-dir")
    sentences, source = load_sentences(args.sentences, args.task, args.data_dir, args.split, args.max_sentences)
    result = bench(args.teacher, args.student, sentences, source, rounds=args.rounds, batch_size=args.batch_size,
                   warmup=args.warmup, device=args.device, threads=args.threads, onnx=args.onnx, bf16=args.bf16)
    if args.out:
        atomic_write_json(args.out, result)
    print("\n".join(summary_lines(result)))
    if args.out:
        print(f"bench: {args.out}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.md, report.json, report.png (results beside the paper's)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (finetune/, bench/, distill/, run.json)")
    p.add_argument("--paper", help="paper tables JSON (default: <data-dir>/../reference/distilbert_paper_tables.json "
                                   "if present, else the copy bundled with distilkit)")
    p.add_argument("--data-dir", help="data folder, to find ../reference (default: run.json's data_dir)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    rep = write_report(args.run_dir, paper=args.paper, data_dir=args.data_dir)
    macro, b = rep["macro"], rep["bench"]
    if macro["retention_pct"] is not None:
        print(f"macro over {', '.join(macro['tasks'])}: teacher {macro['teacher']:.1f}, student {macro['student']:.1f} "
              f"-> retention {macro['retention_pct']:.1f}%")
    if b is not None:
        print(f"params {b['param_ratio']:.0%} of teacher, speedup {b['speedup_bs1']:.2f}x at batch 1")
    for note in rep["notes"]:
        print(f"note: {note}")
    print(f"report: {args.run_dir}/report.md (+ report.json, report.png)")
    return 0


# =========================================================================== reproduce (the whole pipeline)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from .pipeline import STAGES

    p = sub.add_parser("reproduce", help="run the whole recipe: corpus, adapt, student, distill, finetune, bench, report")
    p.add_argument("--preset", default="quick", help="a shipped preset (quick, cpu, gpu, ablations, paper) or a YAML file")
    p.add_argument("--data-dir", help="folder with wikitext/, cola/, mrpc/, sst2/, imdb/ ... (required to run)")
    p.add_argument("--out", help="run folder (re-running it skips finished stages; required to run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. distill.steps=100 or finetune.seeds=[1,2,3]")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (run the same command again to go on)")
    p.add_argument("--show-config", action="store_true",
                   help="print the fully resolved preset (with --set applied) as JSON and exit")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    import shlex

    from .pipeline import load_preset, reproduce, resolved_config

    if args.show_config:
        print(json.dumps(resolved_config(load_preset(args.preset, args.set)), indent=2))
        return 0
    missing = [flag for flag, value in (("--data-dir", args.data_dir), ("--out", args.out)) if not value]
    if missing:
        raise DistilkitError(f"{' and '.join(missing)} required (or --show-config)")
    command = "distilkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = reproduce(args.preset, args.data_dir, args.out, overrides=args.set, from_stage=args.from_stage,
                        command=command, until=args.until)
    if not summary:  # a non-main process under torchrun / accelerate launch: the main one reports
        return 0
    total = sum(s["seconds"] for s in summary)
    ended = "report: " + os.path.join(args.out, "report.md") if summary[-1]["stage"] == "report" else \
        f"stopped after {summary[-1]['stage']}"
    print(f"reproduce: {sum(s['status'] == 'done' for s in summary)} stage(s) run, "
          f"{sum(s['status'] == 'skipped' for s in summary)} skipped, {total:.0f}s; {ended}")
    return 0


# =========================================================================== export


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .export import KINDS

    p = sub.add_parser("export", help="export a saved model to ONNX (optionally int8), checked against PyTorch")
    p.add_argument("--model", required=True, help="model folder: a student, a teacher, or a fine-tuned classifier (RUN/model)")
    p.add_argument("--out", required=True, help="output folder: model.onnx, model_quantized.onnx, config, tokenizer, export.json")
    p.add_argument("--int8", action="store_true", help="also write ONNX Runtime dynamic int8 quantization (model_quantized.onnx)")
    p.add_argument("--task", help="score PyTorch fp32, ONNX fp32 (and int8) on this task's evaluation split; needs --data-dir")
    p.add_argument("--data-dir", help="data folder for --task")
    p.add_argument("--max-eval", type=int, help="use a seeded random subset of N evaluation examples")
    p.add_argument("--kind", default="auto", choices=KINDS, help="what to export (default: from the folder)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: as many as PyTorch uses)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, summary_lines

    r = export_model(args.model, args.out, kind=args.kind, int8=args.int8, task=args.task, data_dir=args.data_dir,
                     max_eval=args.max_eval, threads=args.threads, overwrite=args.overwrite)
    print("\n".join(summary_lines(r)))
    print(f"export: {args.out}/export.json")
    if not r["check"]["passed"]:
        print(f"distilkit export: error: ONNX fp32 outputs differ from PyTorch by {r['check']['max_abs_diff']:.3e} "
              f"(> {r['check']['tolerance']:.0e})", file=sys.stderr)
        return 1
    return 0


# =========================================================================== entry point

#: How a full disk shows up: errno ENOSPC/EDQUOT, or the text of torch.save's / safetensors' write errors.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull",
                   "PytorchStreamWriter failed writing", "inline_container.cc:672] . unexpected pos")


def _disk_full(exc: BaseException) -> str | None:
    """'FILE (reason)' when `exc` (or an exception it was raised from) is a full disk or quota, else None."""
    import errno

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{seen.filename or 'a file'} ({seen.strerror})"
        text = str(seen)
        if any(t in text for t in _DISK_FULL_TEXT):
            return f"a file ({text.splitlines()[0][:120]})"
        seen = seen.__cause__ or seen.__context__
    return None


COMMANDS = [  # pipeline order, as `distilkit --help` lists them
    _add_prepare_corpus, _add_adapt_teacher, _add_init_student, _add_distill, _add_finetune, _add_evaluate,
    _add_export, _add_bench, _add_report, _add_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distilkit", description="DistilBERT-style distillation: teacher -> smaller, faster student -> report."
    )
    parser.add_argument("--version", action="version", version=f"distilkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    from .hardware import tune_allocator

    tune_allocator()  # glibc: keep large temporaries on the heap (DISTILKIT_MALLOC_TUNING=0 turns it off)
    git_commit()  # the commit this process runs, read now: results record it even if HEAD moves later
    try:
        return int(args.func(args) or 0)
    except DistilkitError as exc:
        print(f"distilkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        where = _disk_full(exc)
        if where is not None:  # the environment, not the input (exit 1)
            print(f"distilkit {args.command}: error: disk full while writing {where} (an environment fault, not bad "
                  "input): free some space and run the command again", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # e.g. an --out that cannot be made
            print(f"distilkit {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"distilkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
