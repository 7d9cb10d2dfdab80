"""`distilkit export`: a saved model to ONNX, optionally int8, with checks against PyTorch.

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript exporter. Hugging Face's exporter
(`optimum-onnx` 0.1.0, the newest) requires transformers < 4.58 and distilkit needs transformers 5.x;
torch's dynamo exporter needs `onnxscript`, one more dependency for no gain on these encoders. The traced
graph has dynamic batch and sequence axes; it is traced on a padded batch, and transformers skips its
"mask is all ones" shortcut while tracing, so the attention-mask path is always in the graph.

Kinds (`--kind auto` picks from the folder): `sequence-classification` (a fine-tuned classifier: output
`logits` (batch, labels)), `masked-lm` (a student or teacher with an MLM head: `logits` (batch, seq,
vocab)), `feature-extraction` (the encoder alone, `AutoModel`: `last_hidden_state`; what `bench` times).
BERT and DistilBERT only (`model_type` bert / distilbert); inputs `input_ids`, `attention_mask`, and
`token_type_ids` for BERT.

OUT holds `model.onnx`, with `--int8` `model_quantized.onnx` (ONNX Runtime dynamic quantization:
int8 weights of every MatMul, activations quantized on the fly), `config.json`, the tokenizer, and
`export.json`:

* `check`: max abs difference of ONNX Runtime fp32 vs PyTorch fp32 outputs on one padded batch of real
  inputs (the first `CHECK_EXAMPLES` examples of the task's evaluation split with `--task`, else the
  built-in `CHECK_SENTENCES`); `passed` when <= `TOLERANCE` (1e-4; the CLI exits 1 otherwise). The int8
  difference is recorded, not checked.
* `files`: sizes in bytes, and the fp32 / int8 size ratio.
* with `--task`: the evaluation-split metrics of PyTorch fp32, ONNX fp32 and ONNX int8 side by side
  (same examples, same tokenization as `distilkit evaluate`), and `int8_cost` = fp32 score - int8 score.

Everything is written into a temporary folder and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .models import has_mlm_head, resolve_model
from .utils import DistilkitError, atomic_dir, atomic_write_json, model_fingerprint, provenance

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("bert", "distilbert")
KINDS = ("auto", "sequence-classification", "masked-lm", "feature-extraction")
ONNX_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
EXPORT_JSON = "export.json"
TOLERANCE = 1e-4
OPSET = 17
CHECK_EXAMPLES = 32
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
#: The check batch when no task is given: real sentences of different lengths (so the batch is padded).
CHECK_SENTENCES = [
    "The film was a great success, and the story stayed with me for days.",
    "He was born in the city in 1950.",
    "A very bad movie.",
    "The series first aired on television in the spring of the following year, after two years of work.",
    "They said that the new game would be released in the summer.",
    "What is the capital of France?",
    "She sang the song at the end of the war, and the people in the city joined her.",
    "It is not very good.",
]

Runner = Callable[..., np.ndarray]


def require_onnx() -> None:
    """Raise the user-facing error when the optional extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DistilkitError("ONNX export needs onnx and onnxruntime: pip install 'distilkit[export]'") from None


def onnx_available() -> bool:
    try:
        require_onnx()
        return True
    except DistilkitError:
        return False


# =========================================================================== the model to export


def inspect_model(model: str | os.PathLike, kind: str = "auto") -> tuple[str, Any, str]:
    """(resolved path, config, kind) of a saved model, or a one-line error for what cannot be exported."""
    from transformers import AutoConfig

    if kind not in KINDS:
        raise DistilkitError(f"--kind: expected one of {', '.join(KINDS)}, got '{kind}'")
    path = resolve_model(model)
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise DistilkitError(f"{folder}: no safetensors weights (model.safetensors) in this model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DistilkitError(f"{path}: cannot read config.json ({str(exc).splitlines()[0]})") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise DistilkitError(f"{path}: model_type '{config.model_type}' is not supported for export "
                             f"(expected one of {', '.join(SUPPORTED_TYPES)})")
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        # (transformers would build an empty tokenizer and carry on)
        raise DistilkitError(f"{folder}: no usable tokenizer in the model folder (expected {' or '.join(TOKENIZER_FILES)})")
    if kind == "auto":
        archs = config.architectures or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            kind = "sequence-classification"
        elif has_mlm_head(path):
            kind = "masked-lm"
        else:
            kind = "feature-extraction"
    return path, config, kind


def load_model(path: str, kind: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    cls = {"sequence-classification": AutoModelForSequenceClassification, "masked-lm": AutoModelForMaskedLM,
           "feature-extraction": AutoModel}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cls.from_pretrained(path, use_safetensors=True, trust_remote_code=False).eval()
        except (OSError, ValueError) as exc:
            raise DistilkitError(f"{path}: cannot load as {kind} ({str(exc).splitlines()[0]})") from None


def input_names(model: torch.nn.Module) -> list[str]:
    from .finetune import input_names as forward_names

    return list(forward_names(model))


class _FirstOutput(torch.nn.Module):
    """The model with positional inputs and one tensor out (logits or last_hidden_state)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs)))[0]


def output_name(kind: str) -> str:
    return "last_hidden_state" if kind == "feature-extraction" else "logits"


def export_onnx(model: torch.nn.Module, kind: str, path: Path, opset: int = OPSET) -> None:
    """Trace `model` on a padded dummy batch and write `path` with dynamic batch and sequence axes."""
    names = input_names(model)
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in the traced batch: the mask path is part of the graph
    sample = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    out = output_name(kind)
    axes[out] = {0: "batch"} if kind == "sequence-classification" else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(_FirstOutput(model, names).eval(), tuple(sample[n] for n in names), str(path),
                          input_names=names, output_names=[out], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 MatMul weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises "pre-processing" through the root logger on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


# =========================================================================== running


class OrtRunner:
    """An ONNX Runtime CPU session called like a model: `runner(input_ids=..., ...)` -> first output (numpy)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()  # as many threads as PyTorch uses
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **feeds: Any) -> np.ndarray:
        return self.session.run(None, {k: _numpy(feeds[k]) for k in self.names})[0]


def _numpy(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def torch_runner(model: torch.nn.Module) -> Runner:
    names = input_names(model)

    @torch.inference_mode()
    def run(**feeds: Any) -> np.ndarray:
        return model(**{k: torch.as_tensor(feeds[k]) for k in names})[0].float().numpy()

    return run


# =========================================================================== checks


def _check_batch(tokenizer, examples: list[tuple[str, str | None]], max_length: int) -> dict[str, np.ndarray]:
    a = [x[0] for x in examples]
    b = [x[1] for x in examples] if examples[0][1] is not None else None
    enc = tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="np",
                    return_token_type_ids=True)
    return {k: v.astype(np.int64) for k, v in enc.items()}


def max_abs_diff(a: Runner, b: Runner, batch: dict[str, np.ndarray]) -> float:
    return float(np.max(np.abs(a(**batch).astype(np.float64) - b(**batch).astype(np.float64))))


def task_scores(runners: dict[str, Runner], model_path: str, task: str, data_dir: str, max_eval: int | None,
                subset_seed: int, batch_size: int, max_positions: int) -> tuple[dict[str, dict], dict[str, Any]]:
    """Each runner's metrics and score on the task's evaluation split (as `distilkit evaluate` tokenizes it)."""
    from transformers import AutoTokenizer

    from .config import FinetuneConfig
    from .finetune import (META_FILE, _pad_id, collate, resolve_hparams, score_logits, sorted_batches,
                           subset_indices, tokenize)
    from .tasks import get_task, load_split

    t = get_task(task)
    examples = load_split(t, data_dir, "eval")
    idx = subset_indices(len(examples), max_eval, subset_seed)
    meta_file = Path(model_path) / META_FILE
    trained = json.loads(meta_file.read_text())["hparams"] if meta_file.is_file() else {}
    hp = resolve_hparams(FinetuneConfig(max_length=trained.get("max_length"), truncation=trained.get("truncation")),
                         t, max_positions)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    feats = tokenize([examples[i] for i in idx], tokenizer, hp.max_length, hp.truncation)
    batches = sorted_batches(feats.lengths, batch_size)
    scores: dict[str, dict] = {}
    for name, run in runners.items():
        start = time.perf_counter()
        logits = np.zeros((len(feats), 1 if t.is_regression else t.num_labels), dtype=np.float32)
        for b in batches:
            logits[b] = run(**{k: v.numpy() for k, v in collate(feats, b, _pad_id(tokenizer), torch.device("cpu")).items()})
        metrics, score = score_logits(t, logits, feats.labels)
        scores[name] = {"metrics": metrics, "score": score, "seconds": round(time.perf_counter() - start, 2)}
    info = {"task": t.name, "score_name": t.score_name, "n_eval": len(feats), "n_total": len(examples),
            "max_eval": max_eval, "subset_seed": subset_seed, "max_length": hp.max_length, "truncation": hp.truncation}
    return scores, info


# =========================================================================== export


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    int8: bool = False,
    task: str | None = None,
    data_dir: str | os.PathLike | None = None,
    max_eval: int | None = None,
    subset_seed: int = 0,
    batch_size: int = 64,
    threads: int | None = None,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`distilkit export` (see module docstring). Returns the export.json dict; `check.passed` says whether
    the ONNX fp32 outputs are within `tolerance` of PyTorch's."""
    from transformers import AutoTokenizer

    from .tasks import get_task, load_split

    require_onnx()
    path, config, kind = inspect_model(model, kind)
    if task is not None:
        if kind != "sequence-classification":
            raise DistilkitError(f"{path}: --task needs a fine-tuned sequence classifier, this folder holds a {kind} model")
        if data_dir is None:
            raise DistilkitError("--task needs --data-dir")
        t = get_task(task)
        if config.num_labels != t.num_labels:
            raise DistilkitError(f"{path}: model has {config.num_labels} output(s), task {t.name} needs {t.num_labels}")
        check_examples = [(e.text_a, e.text_b) for e in load_split(t, str(data_dir), "eval")[:CHECK_EXAMPLES]]
        check_source = f"first {len(check_examples)} examples of {t.name}'s evaluation split"
    else:
        check_examples = [(s, None) for s in CHECK_SENTENCES]
        check_source = f"{len(check_examples)} built-in sentences (export.CHECK_SENTENCES)"
    if max_eval is not None and max_eval < 1:
        raise DistilkitError(f"--max-eval: expected a positive number of examples, got {max_eval}")
    if threads is not None and threads < 1:
        raise DistilkitError(f"--threads: expected a positive number, got {threads}")

    out_path = Path(out).resolve()
    if Path(path).is_dir() and (out_path == Path(path).resolve() or Path(path).resolve() in out_path.parents):
        raise DistilkitError(f"{out}: the output folder must not be the model folder or inside it")
    start = time.perf_counter()
    net = load_model(path, kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DistilkitError(f"{path}: no usable tokenizer in the model folder ({str(exc).splitlines()[0]})") from None
    positions = int(getattr(config, "max_position_embeddings", 512))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        export_onnx(net, kind, tmp / ONNX_FILE, opset)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        runners: dict[str, Runner] = {"pytorch_fp32": torch_runner(net), "onnx_fp32": OrtRunner(tmp / ONNX_FILE, threads)}
        files = {ONNX_FILE: (tmp / ONNX_FILE).stat().st_size}
        if int8:
            quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE)
            runners["onnx_int8"] = OrtRunner(tmp / INT8_FILE, threads)
            files[INT8_FILE] = (tmp / INT8_FILE).stat().st_size
        batch = _check_batch(tokenizer, check_examples, min(128, positions))
        diff = max_abs_diff(runners["onnx_fp32"], runners["pytorch_fp32"], batch)
        check = {"inputs": check_source, "batch_shape": list(batch["input_ids"].shape), "max_abs_diff": diff,
                 "tolerance": tolerance, "passed": bool(diff <= tolerance)}
        if int8:
            check["int8_max_abs_diff"] = max_abs_diff(runners["onnx_int8"], runners["pytorch_fp32"], batch)
        result: dict[str, Any] = {
            "model": str(model),
            "model_resolved": path,
            "model_fingerprint": model_fingerprint(net),
            "model_type": config.model_type,
            "kind": kind,
            "exporter": f"torch.onnx.export (TorchScript, dynamo=False), opset {opset}",
            "quantization": "onnxruntime.quantization.quantize_dynamic, QInt8 weights" if int8 else None,
            "inputs": input_names(net),
            "output": output_name(kind),
            "files": files,
            "int8_size_ratio": files[ONNX_FILE] / files[INT8_FILE] if int8 else None,
            "check": check,
        }
        if task is not None:
            scores, info = task_scores(runners, path, task, str(data_dir), max_eval, subset_seed, batch_size, positions)
            result["eval"] = {**info, **scores}
            if int8:
                result["int8_cost"] = scores["onnx_fp32"]["score"] - scores["onnx_int8"]["score"]
        import onnxruntime

        result.update(threads=threads or torch.get_num_threads(), onnxruntime=onnxruntime.__version__,
                      seconds=round(time.perf_counter() - start, 1), **provenance())
        atomic_write_json(tmp / EXPORT_JSON, result)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result["files"].items())
    c = result["check"]
    lines = [f"{result['kind']} ({result['model_type']}) -> {files}"
             + (f"; int8 {result['int8_size_ratio']:.2f}x smaller" if result.get("int8_size_ratio") else ""),
             f"check: max |ONNX fp32 - PyTorch fp32| = {c['max_abs_diff']:.2e} on {c['inputs']} "
             f"({'ok' if c['passed'] else 'FAILED'}, tolerance {c['tolerance']:.0e})"
             + (f"; int8: {c['int8_max_abs_diff']:.2e}" if "int8_max_abs_diff" in c else "")]
    ev = result.get("eval")
    if ev:
        cells = ", ".join(f"{name} {ev[name]['score']:.2f}" for name in ("pytorch_fp32", "onnx_fp32", "onnx_int8") if name in ev)
        lines.append(f"{ev['task']} {ev['score_name']} ({ev['n_eval']} examples): {cells}"
                     + (f"; int8 cost {result['int8_cost']:+.2f}" if "int8_cost" in result else ""))
    return lines


def encoder_runners(model: str | os.PathLike, folder: str | os.PathLike, threads: int | None = None) -> dict[str, tuple]:
    """Export `model`'s encoder (fp32 and int8) into `folder` for `bench`: {"onnx_fp32" / "onnx_int8": (runner, info)}."""
    result = export_model(model, folder, kind="feature-extraction", int8=True, threads=threads, overwrite=True)
    if not result["check"]["passed"]:
        raise DistilkitError(f"{model}: ONNX encoder differs from PyTorch by {result['check']['max_abs_diff']:.2e} "
                             f"(> {TOLERANCE:.0e}); not timed")
    folder = Path(folder)
    return {
        "onnx_fp32": (OrtRunner(folder / ONNX_FILE, threads), {"file_bytes": result["files"][ONNX_FILE],
                                                              "max_abs_diff": result["check"]["max_abs_diff"]}),
        "onnx_int8": (OrtRunner(folder / INT8_FILE, threads), {"file_bytes": result["files"][INT8_FILE],
                                                              "max_abs_diff": result["check"]["int8_max_abs_diff"]}),
    }
