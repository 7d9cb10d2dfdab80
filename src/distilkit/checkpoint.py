"""Checkpoints of the masked-LM training loop (`distill.train`): what one holds, how it is written, verified
and restored, and when a run may continue from it. The resume rules live here and nowhere else.

OUT/checkpoints/step-NNNNNNNN/ holds
  model/                         save_pretrained folder (safetensors)
  optimizer.pt, scheduler.pt     state dicts of plain tensors (loaded with weights_only=True, never unpickled)
  scaler.pt                      fp16 loss scaler, when there is one
  rng-rank{R}.safetensors/.json  every rank's torch / masking-generator / CUDA / Python / NumPy RNG states
  state.json                     data position, elapsed time, plan, config, held-out scores before training,
                                 and `inputs`: what the run started from (see `run_identity`)
  MANIFEST.json                  size and sha256 of every file above; written last
A step folder is written as `.step-N.tmp` and renamed into place; it counts as a checkpoint only when its
manifest verifies. Resuming (`resume_point`) walks back from the newest to the newest one that verifies,
warning about each broken one (and removing it: training passes that step again); when none verifies it
stops with a DistilkitError naming the broken file.

A run may continue from a checkpoint only with the same inputs: teacher weights, initial weights of the
trained model, corpus (`corpus_identity`), block size, resolved mixed precision, model architecture, number
of processes and every config field that changes the trajectory (all but RESUMABLE_CHANGES). Otherwise
`check_resume` raises `InputsChanged` (a DistilkitError: exit 2; `.changed` lists the differences) naming each
difference; `resume_mismatch` returns the same differences as a list, and `saved_inputs` what a run in OUT
started from, for callers (e.g. the pipeline) that decide themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import DistilkitError, atomic_write_json, sha256_file

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
STATE = "state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_STEP_TMP_RE = re.compile(r"^\.step-\d+\.tmp")
#: Config fields that may change between a run and its resumption (they do not alter the trajectory).
#: mixed_precision is compared as resolved ("auto" -> "bf16" / "no"), in the run identity.
RESUMABLE_CHANGES = {"save_every", "keep_checkpoints", "log_every", "tensorboard", "eval_batches", "eval_batch_size",
                     "eval_seed", "mixed_precision"}
#: Keys of a model's config.json that do not describe the architecture.
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset"}


class InputsChanged(DistilkitError):
    """Resume refused: the checkpoint belongs to a run with other inputs or settings (`changed` lists them)."""

    def __init__(self, checkpoint: Path, changed: list[str]):
        self.checkpoint, self.changed = checkpoint, changed
        super().__init__(
            f"{checkpoint}: not the run this checkpoint belongs to, it differs in {'; '.join(changed)} "
            f"(use another --out, or delete {checkpoint.parent.parent} to start over)"
        )


# =========================================================================== listing and verification


def step_dirs(out: str | os.PathLike) -> list[Path]:
    """Every OUT/checkpoints/step-N folder, verified or not, oldest first."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_manifest(folder: Path) -> None:
    """MANIFEST.json: {relative path: {"bytes", "sha256"}} of every file in `folder`; the checkpoint's last file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    atomic_write_json(folder / MANIFEST, {"files": {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    }})


def verify(folder: Path, hashes: bool = True) -> str | None:
    """None when the checkpoint is complete (its manifest's files all present, sizes and, with `hashes`,
    sha256 equal), else what is wrong, naming the file."""
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"{folder / MANIFEST}: missing (an incomplete checkpoint, or one written by an older distilkit)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{folder / MANIFEST}: unreadable ({exc.__class__.__name__})"
    if STATE not in listed:
        return f"{folder / MANIFEST}: does not list {STATE}"
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if hashes and sha256_file(path) != want["sha256"]:
            return f"{path}: sha256 differs from the manifest's (corrupted)"
    return None


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in OUT/checkpoints (manifest present, sizes right), oldest first."""
    return [p for p in step_dirs(out) if verify(p, hashes=False) is None]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def resume_point(out: str | os.PathLike, *, is_main: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies (sizes and hashes). Broken newer ones are reported with a
    warning and (main process) removed; when checkpoints exist but none verifies, a DistilkitError names the
    newest one's broken file. None when OUT has no checkpoint at all."""
    candidates = step_dirs(out)
    first_problem = None
    for ckpt in reversed(candidates):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        first_problem = first_problem or problem
        if is_main:
            warnings.warn(f"{ckpt}: skipped, not a complete checkpoint ({problem}); trying an older one",
                          UserWarning, stacklevel=2)
    if first_problem:
        raise DistilkitError(f"{first_problem}: no complete checkpoint to resume from "
                             f"(delete {Path(out) / CHECKPOINTS} to start over, or use another --out)")
    return None


def drop_newer(ckpt: Path, out: str | os.PathLike) -> None:
    """Remove step folders newer than the one resumed from (broken ones: training passes those steps again)."""
    step = int(_STEP_RE.match(ckpt.name).group(1))
    for p in step_dirs(out):
        if int(_STEP_RE.match(p.name).group(1)) > step:
            shutil.rmtree(p, ignore_errors=True)


def clean_temps(out: str | os.PathLike) -> None:
    """Remove `.step-N.tmp` folders in OUT/checkpoints: left by a run that was killed (or hit a full disk)
    while writing a checkpoint. Called by the main process before a run starts writing to OUT."""
    folder = Path(out) / CHECKPOINTS
    if folder.is_dir():
        for p in folder.iterdir():
            if _STEP_TMP_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


# =========================================================================== run identity and resume rules


def corpus_identity(meta: dict[str, Any]) -> str:
    """sha256 over what identifies a prepared corpus's content (vocabulary, block size, sources' sha256,
    split sizes, token counts, held-out assignment), not where it or its sources lie or how long it took."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in {"path", "files", "seconds", "provenance", "tokenizer",
                                                                   "tokenizer_path"}}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return hashlib.sha256(json.dumps(strip(meta), sort_keys=True).encode()).hexdigest()[:16]


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config.json fields, without the ones that do not describe the model (name, versions)."""
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    return {k: v for k, v in cfg.items() if k not in _CONFIG_NOISE}


def run_identity(
    *, teacher_fingerprint: str | None, initial_fingerprint: str, corpus_meta: dict[str, Any], block_size: int,
    mixed_precision: str, model: torch.nn.Module, world_size: int, trajectory: dict[str, Any],
) -> dict[str, Any]:
    """What a run started from; saved in every checkpoint's state.json as "inputs" and compared on resume."""
    return {
        "teacher": teacher_fingerprint,
        "initial_model": initial_fingerprint,
        "corpus": corpus_identity(corpus_meta),
        "block_size": block_size,
        "mixed_precision": mixed_precision,
        "architecture": architecture(model),
        "world_size": world_size,
        "trajectory_config": trajectory,
    }


_WHAT = {
    "teacher": "the teacher's weights",
    "initial_model": "the initial weights of the trained model (--student / --teacher)",
    "corpus": "the corpus",
    "block_size": "the block size",
    "mixed_precision": "the resolved mixed precision",
    "world_size": "the number of processes",
}


def resume_mismatch(state: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The differences between a checkpoint's saved run identity (its state.json dict) and this run's, in words;
    empty when the run may continue from it."""
    saved = state.get("inputs")
    if not isinstance(saved, dict):
        return ["the checkpoint records no inputs (written by an older distilkit)"]
    changed = []
    for key, what in _WHAT.items():
        if saved.get(key) != identity.get(key):
            changed.append(f"{what} ({saved.get(key)} then, {identity.get(key)} now)")
    for key, what in (("architecture", "the model architecture"), ("trajectory_config", "the config")):
        a, b = saved.get(key) or {}, identity.get(key) or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            changed.append(f"{what} in {keys}")
    return changed


def check_resume(ckpt: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise InputsChanged unless the run described by `identity` may continue from `ckpt`."""
    changed = resume_mismatch(state, identity)
    if changed:
        raise InputsChanged(ckpt, changed)


def load_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_text(encoding="utf-8"))


def saved_inputs(out: str | os.PathLike) -> dict[str, Any] | None:
    """The run identity (`run_identity`) recorded in OUT's newest complete checkpoint, None without one: lets a
    caller (e.g. the pipeline) see what a run in OUT started from without loading any model."""
    ckpt = latest_checkpoint(out)
    return load_state(ckpt).get("inputs") if ckpt else None


# =========================================================================== RNG


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG streams: (tensors for safetensors, plain values for JSON)."""
    tensors = {"torch": torch.get_rng_state(), "masking": generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    py = random.getstate()
    npy = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    return tensors, plain


def restore_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"rng-rank{rank}.safetensors"))
    plain = json.loads((folder / f"rng-rank{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["masking"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# =========================================================================== save / load


def save(
    accelerator: Any, out: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
    generator: torch.Generator, state: dict[str, Any], keep: int,
) -> Path:
    """Write OUT/checkpoints/step-N atomically (temp folder, manifest last, then rename); keep the newest `keep`.
    All ranks call. A failure (e.g. a full disk) removes the temp folder."""
    from safetensors.torch import save_file

    folder = Path(out) / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        tensors, plain = rng_state(generator)  # every rank: its own RNG streams
        save_file(tensors, str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
        atomic_write_json(tmp / f"rng-rank{accelerator.process_index}.json", plain)
        accelerator.wait_for_everyone()
        if main:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            atomic_write_json(tmp / STATE, state)
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load a save_pretrained safetensors folder into `model` in place (exact; tied weights re-shared)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in weights if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise DistilkitError(f"{folder}: checkpoint does not match the model (missing {untied[:5]}, unexpected {unexpected[:5]})")


def restore_training(ckpt: Path, optimizer: Any, scheduler: Any, scaler: Any, generator: torch.Generator, rank: int) -> None:
    """Optimizer, schedule, loss scaler and this rank's RNG streams from `ckpt` (weights: `load_weights`)."""
    def tensors(name: str) -> Any:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)

    optimizer.load_state_dict(tensors("optimizer.pt"))
    scheduler.load_state_dict(tensors("scheduler.pt"))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(tensors("scaler.pt"))
    restore_rng(ckpt, rank, generator)
