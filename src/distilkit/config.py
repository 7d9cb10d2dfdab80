"""Typed configuration: dataclasses with defaults, loadable from YAML and overridable as `key=value`.

Each stage has one dataclass, and each default is stated once, here (masking.MaskingConfig and
losses.LossConfig take theirs from TrainConfig and DistillConfig). `load_config(Cls, path, overrides)`
reads a YAML file (either the dataclass's fields at top level, or under a section named `section`), then
applies `a.b=value` overrides given on the command line, checking every key and converting every value
to the field's type. A path that is not a file may name a preset shipped in the package
(`distilkit/presets/<name>.yaml`, read through importlib.resources so that it works from a wheel).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .utils import DistilkitError

T = TypeVar("T")



def preset_names() -> list[str]:
    """Names of the presets shipped in the package (`distilkit/presets/<name>.yaml`)."""
    folder = resources.files("distilkit").joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_file(name: str) -> Any:
    """The shipped preset `name` (an importlib.resources Traversable), or None."""
    if not name or any(sep in name for sep in "/\\") or name.startswith("."):
        return None
    found = resources.files("distilkit").joinpath("presets", f"{name}.yaml")
    return found if found.is_file() else None


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: Exception | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (DistilkitError, ValueError, TypeError) as exc:
                last = exc
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise DistilkitError(f"{where}: expected {names}, got {value!r}") from last
    if origin in (list, tuple):
        (inner,) = args[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set seeds=1` means [1]
        if not isinstance(value, (list, tuple)):
            raise DistilkitError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise DistilkitError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise DistilkitError(f"{where}: expected true/false, got {value!r}")
    if tp is str and isinstance(value, bool):
        # YAML 1.1 reads a bare no/yes/off/on as a boolean: `--set mixed_precision=no` means the string "no"
        value = "yes" if value else "no"
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise DistilkitError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DistilkitError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise DistilkitError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(obj: T, overrides: list[str] | None, where: str = "override") -> T:
    """Apply `key=value` (or `a.b=value` for nested dataclasses) to a config, returning a new one."""
    for item in overrides or []:
        if "=" not in item:
            raise DistilkitError(f"{where}: expected key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        obj = _set_path(obj, key.strip().split("."), value, f"{where} '{item}'")
    return obj


def _set_path(obj: Any, path: list[str], value: Any, where: str) -> Any:
    if isinstance(obj, dict):  # a partial section (e.g. finetune.per_task), checked when the whole config loads
        new = dict(obj)
        new[path[0]] = value if len(path) == 1 else _set_path(new.get(path[0], {}), path[1:], value, where)
        return new
    if isinstance(obj, list):
        try:
            i = int(path[0])
            new = list(obj)
            new[i] = _set_path(new[i], path[1:], value, where) if len(path) > 1 else value
            return new
        except (ValueError, IndexError):
            raise DistilkitError(f"{where}: '{path[0]}' is not an index of a list of {len(obj)}") from None
    hints = typing.get_type_hints(type(obj))
    if path[0] not in hints:
        raise DistilkitError(f"{where}: unknown key '{path[0]}' for {type(obj).__name__}; known: {sorted(hints)}")
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: _convert(value, hints[path[0]], where)})
    child = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _set_path(child, path[1:], value, where)})


def resolve_yaml(path: str | Path) -> Any:
    """A YAML file's path, or a shipped preset's resource when `path` is a preset name (not a file)."""
    if Path(path).is_file():
        return Path(path)
    named = preset_file(str(path))
    if named is None:
        raise DistilkitError(f"{path}: no such config file (nor a preset: {', '.join(preset_names())})")
    return named


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_yaml(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise DistilkitError(f"{path}:{'' if line is None else line + 1}: invalid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DistilkitError(f"{path}: expected a mapping at top level")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, section: str | None = None
) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if section is not None:
            data = data.get(section, {}) or {}
    obj = from_dict(cls, data, str(path) if path else "config")
    return apply_overrides(obj, overrides)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# =========================================================================== stage configs
# Each stage's dataclass lives below, in its own section.

# --- distillation (distill.py) -------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Masked-LM training shared by `distill` and `adapt-teacher` (one loop: distill.train)."""

    steps: int | None = None  # optimizer steps; when None, `epochs` passes over the corpus
    epochs: float = 3.0  # used only when steps is None (the released DistilBERT: 3)
    batch_size: int = 32  # sequences per device per micro-step
    effective_batch: int | None = None  # sequences per optimizer step (all devices); sets accumulation
    effective_tokens: int | None = None  # or tokens per optimizer step; None and None: no accumulation
    lr: float = 5e-4  # peak learning rate
    warmup_ratio: float = 0.05  # linear warm-up over this share of the steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW, not on biases and LayerNorm weights (the paper's code: 0.0)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 5.0  # max gradient norm (0 disables)
    mlm_prob: float = 0.15  # dynamic masking, new masks every batch (masking.MaskingConfig takes these defaults)
    mask_frac: float = 0.8  # of the selected: [MASK]
    random_frac: float = 0.1  # of the selected: a random non-special token (the rest stay unchanged)
    smoothing: float | None = None  # e.g. 0.7: select tokens with weight count**-0.7 (the paper's code: 0.7)
    seed: int = 0
    save_every: int = 500  # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # metrics.jsonl line every N optimizer steps
    mixed_precision: str = "auto"  # auto (bf16 where the CPU/GPU computes bf16 natively, else fp32) | no | bf16 | fp16
    freeze_position_embeddings: bool = False  # keep the student's position embeddings fixed. The paper's code
    # did, for DistilBERT through its student config (sinusoidal_pos_embds: true creates them with requires_grad
    # off; the teacher's learned ones are then loaded into them); its --freeze_pos_embs touches RoBERTa/GPT-2 only
    attention_dropout: float | None = None  # override the attention-probability dropout while training
    # (None: the model's own, 0.1 in DistilBERT/BERT); 0 lets CPU attention use its fused kernel, 1.17x faster
    # steps on CPU (benchmarks/README.md); the saved model keeps its configured value for fine-tuning
    eval_batches: int | None = 50  # held-out batches for evaluate_mlm (None: the whole held-out split)
    eval_batch_size: int | None = None  # default: batch_size
    eval_seed: int = 1234  # fixed masking seed: teacher and student scored on identical masks
    tensorboard: bool = False  # also log to OUT/tensorboard (only if tensorboard is installed)


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """`distilkit distill`: the triple loss (losses.LossConfig takes its defaults from here).

    Loss weights, temperature, optimizer, schedule, masking rates and smoothing default to the paper's
    released recipe; KL positions, position embeddings, the batch and how sequences are built do not
    (README, "distilkit vs the paper's code"; the `paper` preset sets what distilkit can express).
    """

    alpha_ce: float = 5.0  # soft-target KL (0 switches the term off, as in the paper's Table 4)
    alpha_mlm: float = 2.0  # masked-LM cross-entropy
    alpha_clm: float = 2.0  # causal-LM cross-entropy, in place of alpha_mlm for a GPT-2 student (families.py)
    alpha_cos: float = 1.0  # cosine between last hidden states
    temperature: float = 2.0
    kl_positions: str = "masked"  # KL at masked positions, or "all" non-padding positions (the paper's code: all)
    smoothing: float | None = 0.7  # the paper's code: --mlm_smoothing 0.7 (token selection weight count**-0.7)

# --- teacher adaptation (adapt.py) ---------------------------------------------------------


@dataclasses.dataclass
class AdaptConfig(TrainConfig):
    """`distilkit adapt-teacher`: masked-LM training of the whole teacher (fresh head tied to the embeddings)."""

    steps: int | None = 200
    lr: float = 1e-4

# --- fine-tuning (finetune.py) -------------------------------------------------------------


@dataclasses.dataclass
class FinetuneConfig:
    """`distilkit finetune`. Fields left as None take the task's default (`tasks.TaskDefaults`)."""

    seeds: list[int] = dataclasses.field(default_factory=lambda: [1])  # one run per seed, same start model
    epochs: float | None = None  # may be fractional
    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None  # tokens incl. [CLS]/[SEP]; capped at the model's position embeddings
    truncation: str | None = None  # "head" or "head_tail" (single-text tasks only)
    warmup_ratio: float | None = None  # share of the steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # AdamW, not on biases and LayerNorm weights
    grad_clip: float = 1.0  # max gradient norm (0 disables)
    eval_batch_size: int = 64
    max_train: int | None = None  # random subset of N training examples (seeded by subset_seed)
    max_eval: int | None = None  # random subset of N evaluation examples (seeded by subset_seed)
    subset_seed: int = 0  # the same subsets for every training seed
    group_by_length: bool = True  # length-grouped training batches (sorted within mega-batches)
    mega_batch: int = 50  # mega-batch size, in batches
    distill_from: str | None = None  # fine-tuned teacher folder: task-specific distillation, the paper's "(D)"
    alpha_kd: float = 0.5  # weight of the distillation term
    temperature: float = 2.0  # softmax temperature of the distillation term (classification only)
    save_models: str = "first"  # "first" (DIR/model), "all" (also DIR/seed-<s> for the other seeds), "none"
    mixed_precision: str = "auto"  # "auto" (bf16 where the CPU/GPU computes bf16 natively, else fp32), "no", "bf16", "fp16"
    overwrite: bool = False  # replace a non-empty output folder
