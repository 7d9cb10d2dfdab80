"""Size and inference speed of teacher vs student: the paper's Table 3 protocol.

Table 3 of the paper times one full pass over the STS-B dev set on CPU at batch size 1. Here the
encoder forward (`AutoModel`, eval mode, `torch.inference_mode`, fp32) of teacher and student is
timed on the same sentences in the same process:

* batch 1: every example (sentence or sentence pair) tokenised upfront (max_length 128), no padding,
  run one at a time; the time of the whole pass is the measurement;
* batch 32: examples sorted by length, batches of 32 with dynamic padding; sentences per second.

After an untimed warm-up, teacher and student are timed alternately for several rounds (the order is
swapped every round, so slow drift of a shared machine hits both alike); the result keeps every round,
their median, min and max, and the speedup as a ratio of medians.

Beside the paper's fp32 protocol, extra rows are timed in the same alternated rounds (bench.json "rows",
each with its speedup over the fp32 teacher): the student's encoder exported to ONNX and run by ONNX
Runtime in fp32 and dynamic int8 (`export.encoder_runners`; where onnxruntime is installed), and
teacher and student with bf16 weights (where the CPU computes bf16 natively, `hardware.cpu_has_bf16`).
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, PretrainedConfig

from . import tasks
from .corpus import TextSource
from .families import lm_auto_class, with_pad_token
from .models import count_parameters, has_mlm_head, load_config, load_pretrained, load_tokenizer, resolve_model
from .utils import DistilkitError, fail_at, model_fingerprint, provenance, sha256_file, sha256_text

log = logging.getLogger(__name__)

Example = tuple[str, "str | None"]

# --------------------------------------------------------------------------- sentences


def read_sentences_file(path: str | os.PathLike) -> list[Example]:
    """Examples from plain text: one sentence per line, or a sentence pair separated by one tab.

    Blank lines are skipped; `.gz` files are read transparently. GLUE TSVs go through `--task`.
    """
    path = Path(path)
    if not path.is_file():
        raise DistilkitError(f"{path}: no such sentences file")
    examples: list[Example] = []
    for lineno, line in TextSource(path).raw_lines():  # UTF-8 (gzip accepted); other bytes: FILE:LINE error
        line = line.rstrip("\r\n")
        if "\x00" in line:
            raise fail_at(path, lineno, "expected text, found a NUL byte (a binary file?)")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) > 2 or not parts[0].strip():
            raise fail_at(path, lineno, "one sentence, or two separated by a tab "
                                        "(for a GLUE TSV use --task TASK --data-dir D)")
        examples.append((parts[0], parts[1] if len(parts) == 2 else None))
    return examples


def load_sentences(
    sentences: str | os.PathLike | None = None,
    task: str | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "eval",
    max_sentences: int | None = None,
) -> tuple[list[Example], dict[str, Any]]:
    """Examples to time and a description of them: `{"source", "n", "sha256", "text_sha256", ...}`.

    Give either a plain-text file (`sentences`) or a `task` (see `distilkit.tasks`; default STS-B, the
    paper's set) with its `data_dir`; `split` "eval" is the task's scored split (dev for GLUE).
    `sha256` is the checksum of the file read (None when several files were read); `text_sha256` is
    that of the examples actually timed (after `max_sentences`, which keeps the first N).
    """
    if sentences is not None and task is not None:
        raise DistilkitError("give either --sentences FILE or --task TASK --data-dir D, not both")
    if sentences is not None:
        path = Path(sentences)
        examples = read_sentences_file(path)
        source: dict[str, Any] = {"source": str(path), "sha256": sha256_file(path)}
    else:
        if data_dir is None:
            raise DistilkitError("no sentences: give --sentences FILE, or --task TASK with --data-dir D")
        examples, source = _load_task(task or "stsb", data_dir, split)
    if not examples:
        raise DistilkitError(f"{source['source']}: no sentences found")
    n_total = len(examples)
    if max_sentences is not None:
        if max_sentences < 1:
            raise DistilkitError(f"--max-sentences must be >= 1, got {max_sentences}")
        examples = examples[:max_sentences]
    text = "".join(f"{a}\t{b or ''}\n" for a, b in examples)
    source.update(
        n=len(examples),
        n_total=n_total,
        pairs=any(b is not None for _, b in examples),
        text_sha256=sha256_text(text),
    )
    return examples, source


def _load_task(name: str, data_dir: str | os.PathLike, split: str) -> tuple[list[Example], dict[str, Any]]:
    task = tasks.get_task(name)
    if str(data_dir).startswith("hf:"):  # hub dataset (online only)
        files: list[Path] = []
        source = f"{data_dir} {name}/{tasks.split_name(task, split)}"
    else:
        try:
            files = tasks.split_files(task, data_dir, split)
        except DistilkitError as exc:
            hint = " (STS-B, the paper's Table 3 set, is absent: use --task mrpc or --sentences FILE)" if name == "stsb" else ""
            raise DistilkitError(f"{exc}{hint}") from None
        source = ", ".join(_rel(f, Path(data_dir)) for f in files)
    examples = [(ex.text_a, ex.text_b) for ex in tasks.load_split(task, data_dir, split)]
    return examples, {"source": source, "task": name, "sha256": sha256_file(files[0]) if len(files) == 1 else None}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- parameters


def param_counts(config: PretrainedConfig, with_head: bool) -> tuple[int, int | None]:
    """(encoder parameters, MLM-model parameters or None) for a model config, without allocating weights.

    The encoder is what `AutoModel` builds: for BERT a `BertModel` *with* pooler (the paper's "110M"
    = 109.5M for bert-base), for DistilBERT a `DistilBertModel` (66.4M). The MLM count is that of the
    `...ForMaskedLM` model (no pooler; tied decoder counted once).
    """
    with torch.device("meta"):
        encoder = count_parameters(AutoModel.from_config(config))
        head = count_parameters(lm_auto_class(config).from_config(config)) if with_head else None  # GPT-2: causal LM
    return encoder, head


# --------------------------------------------------------------------------- timing


def _forward_keys(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _prepare(tokenizer, model, examples: list[Example], batch_size: int, max_length: int, device: torch.device):
    """Inputs for the batch-1 pass (one dict per example) and the length-sorted padded batches."""
    keys = _forward_keys(model)
    features = []
    for a, b in examples:
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        features.append({k: v for k, v in enc.items() if k in keys})
    singles = [{k: torch.tensor([v], device=device) for k, v in f.items()} for f in features]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        padded = tokenizer.pad(chunk, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in padded.items() if k in keys})
    n_tokens = sum(len(f["input_ids"]) for f in features)
    return singles, batches, n_tokens


def _timed(model: torch.nn.Module, inputs: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        for x in inputs:
            model(**x)
        sync()
        return time.perf_counter() - start


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (hardware.cpu_info, which every run and benchmark records)."""
    from .hardware import cpu_info

    return cpu_info()["cpu_model"]


def extra_rows(models: dict[str, dict[str, Any]], dev: torch.device, onnx: bool | None, bf16: bool | None) -> dict[str, dict]:
    """Rows beside the paper's fp32 protocol: the student as ONNX fp32 and int8 (ONNX Runtime, CPU), and
    teacher and student with bf16 weights. None: ONNX where onnx/onnxruntime are installed and the device
    is the CPU; bf16 where the CPU computes it natively (hardware.cpu_has_bf16)."""
    import copy
    import shutil
    import tempfile

    from .export import SUPPORTED_TYPES, encoder_runners, onnx_available
    from .hardware import cpu_has_bf16

    rows: dict[str, dict] = {}
    cpu = dev.type == "cpu"
    exportable = models["student"]["info"].get("model_type") in SUPPORTED_TYPES  # None: only where export supports it
    if onnx or (onnx is None and cpu and onnx_available() and exportable):
        if not cpu:
            raise DistilkitError("--onnx rows run on the CPU (ONNX Runtime's CPU provider): use --device cpu")
        s = models["student"]
        tmp = tempfile.mkdtemp(prefix="distilkit-bench-onnx-")
        try:  # the sessions hold the graphs in memory: the files can go
            runners = encoder_runners(s["path"], Path(tmp) / "student", threads=torch.get_num_threads())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        numpy_inputs = {key: [{k: v.numpy() for k, v in x.items()} for x in s[key]] for key in ("singles", "batches")}
        for name, (runner, info) in runners.items():
            rows[f"student_{name}"] = dict(model=runner, **numpy_inputs, info={
                **s["info"], "runtime": "onnxruntime", "precision": name.split("_")[1], **info})
    if bf16 or (bf16 is None and cpu and cpu_has_bf16()):
        for role in ("teacher", "student"):
            m = models[role]
            rows[f"{role}_bf16"] = dict(model=copy.deepcopy(m["model"]).to(torch.bfloat16), singles=m["singles"],
                                        batches=m["batches"], info={**m["info"], "runtime": "pytorch", "precision": "bf16"})
    return rows


def bench(
    teacher: str,
    student: str,
    sentences: list[Example],
    source: dict[str, Any],
    rounds: int = 5,
    batch_size: int = 32,
    max_length: int = 128,
    warmup: int = 32,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool | None = None,
    onnx: bool | None = None,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """Count parameters and time teacher and student encoders on `sentences` (see module docstring).

    `warmup` examples are run untimed at batch 1 and in one batch of `batch_size` per model first.
    Returns the bench.json dict (teacher, student, speedup_bs1, speedup_bs32, param_ratio, ...), with the
    extra rows (`onnx`: student ONNX fp32 / int8; `bf16`: both models in bf16; None = where available)
    under "rows".
    """
    for flag, value, least in (("--rounds", rounds, 1), ("--batch-size", batch_size, 1), ("--warmup", warmup, 0),
                               ("--threads", threads, 1), ("max_length", max_length, 3)):
        if value is not None and value < least:
            raise DistilkitError(f"{flag} must be >= {least}, got {value}")
    if not sentences:
        raise DistilkitError("no sentences to time")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DistilkitError(f"--device: expected a torch device such as cpu or cuda:0, got '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistilkitError(f"--device {device}: CUDA is not available")

    models: dict[str, dict[str, Any]] = {}
    for role, name in (("teacher", teacher), ("student", student)):
        path = resolve_model(name)
        config = load_config(path)
        params, params_head = param_counts(config, has_mlm_head(path))
        model = load_pretrained(AutoModel, path, role).to(dev).eval()
        loaded = count_parameters(model)
        if loaded != params:
            raise DistilkitError(f"{name}: loaded encoder has {loaded} parameters, its config says {params}")
        singles, batches, n_tokens = _prepare(with_pad_token(load_tokenizer(path)), model, sentences, batch_size, max_length, dev)
        models[role] = dict(
            name=name, path=path, model=model, singles=singles, batches=batches,
            info={
                "model": name,
                "model_type": config.model_type,
                "params": params,
                "params_with_head": params_head,
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "fingerprint": model_fingerprint(model),
                "n_tokens": n_tokens,
            },
        )

    models.update(extra_rows(models, dev, onnx, bf16))
    load_before = _loadavg()
    for m in models.values():  # warm-up: allocator, kernels, lazy init
        _timed(m["model"], m["singles"][:warmup], dev)
        _timed(m["model"], m["batches"][:1], dev)

    bs1: dict[str, list[float]] = {role: [] for role in models}
    bs32: dict[str, list[float]] = {role: [] for role in models}
    schedule: list[str] = []
    n = len(sentences)
    disable = progress is False or (progress is None and bool(os.environ.get("DISTILKIT_NO_PROGRESS")))
    for r in tqdm(range(rounds), desc="bench rounds", disable=disable or None, leave=False):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for role in order:
            bs1[role].append(_timed(models[role]["model"], models[role]["singles"], dev))
            schedule.append(f"{role}:bs1")
        for role in order:
            bs32[role].append(n / _timed(models[role]["model"], models[role]["batches"], dev))
            schedule.append(f"{role}:bs{batch_size}")

    out: dict[str, Any] = {}
    for role, m in models.items():
        row = {**m["info"], "bs1_seconds": _spread(bs1[role]), "bs32_sentences_per_s": _spread(bs32[role])}
        (out if role in ("teacher", "student") else out.setdefault("rows", {}))[role] = row
    t, s = out["teacher"], out["student"]
    for row in out.get("rows", {}).values():
        row["speedup_bs1"] = t["bs1_seconds"]["median"] / row["bs1_seconds"]["median"]
        row["speedup_bs32"] = row["bs32_sentences_per_s"]["median"] / t["bs32_sentences_per_s"]["median"]
    out["speedup_bs1"] = t["bs1_seconds"]["median"] / s["bs1_seconds"]["median"]
    out["speedup_bs32"] = s["bs32_sentences_per_s"]["median"] / t["bs32_sentences_per_s"]["median"]
    out["param_ratio"] = s["params"] / t["params"]
    out["sentences"] = source
    out["protocol"] = (
        f"encoder forward (AutoModel, eval, torch.inference_mode, fp32) on {dev.type}; "
        f"bs1: one full pass over {n} examples, one at a time, tokenised upfront (max_length {max_length}), "
        f"no padding; bs{batch_size}: length-sorted batches of {batch_size} with dynamic padding "
        f"(reported as sentences/s under the key bs32_sentences_per_s); untimed warm-up of {warmup} examples "
        f"and one batch per model; {rounds} rounds, teacher and student alternated, order swapped every round"
    ) + ("; extra rows (timed in the same rounds): " + ", ".join(out["rows"]) if out.get("rows") else "")
    out["batch_size"] = batch_size
    out["max_length"] = max_length
    out["rounds"] = rounds
    out["schedule"] = schedule
    out["threads"] = torch.get_num_threads()
    out["cpu"] = cpu_model()
    out["loadavg_1min"] = {"before": load_before, "after": _loadavg()}  # others' load makes timings noisy
    out["device"] = dev.type if dev.type == "cpu" else f"{dev.type}:{torch.cuda.get_device_name(dev)}"
    out.update(provenance())
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    t, s = result["teacher"], result["student"]
    src = result["sentences"]
    lines = [f"sentences: {src['source']} (n={src['n']}{', pairs' if src.get('pairs') else ''})"]
    for role, m in (("teacher", t), ("student", s)):
        head = f", {m['params_with_head'] / 1e6:.1f}M with MLM head" if m["params_with_head"] else ""
        lines.append(
            f"{role}: {m['model']} | {m['layers']} layers | {m['params'] / 1e6:.1f}M params{head} | "
            f"bs1 pass {m['bs1_seconds']['median']:.2f}s [{m['bs1_seconds']['min']:.2f}-{m['bs1_seconds']['max']:.2f}] | "
            f"bs{result['batch_size']} {m['bs32_sentences_per_s']['median']:.1f} sent/s"
        )
    for name, m in (result.get("rows") or {}).items():
        size = f" | {m['file_bytes'] / 1e6:.1f} MB" if m.get("file_bytes") else ""
        lines.append(
            f"{name}: {m['runtime']} {m['precision']}{size} | bs1 pass {m['bs1_seconds']['median']:.2f}s "
            f"({m['speedup_bs1']:.2f}x the fp32 teacher) | bs{result['batch_size']} "
            f"{m['bs32_sentences_per_s']['median']:.1f} sent/s"
        )
    lines.append(
        f"speedup: {result['speedup_bs1']:.2f}x at bs1, {result['speedup_bs32']:.2f}x at bs{result['batch_size']}; "
        f"student has {result['param_ratio']:.0%} of the teacher's parameters "
        f"({result['threads']} threads, {result['cpu']}, {result['rounds']} rounds)"
    )
    load = result.get("loadavg_1min") or {}
    if load.get("before") is not None and load["before"] > result["threads"]:
        lines.append(f"note: the machine was busy (1-min load {load['before']:.1f} > {result['threads']} threads): "
                     "timings are noisy; compare the ratios, or re-run when idle")
    return lines
