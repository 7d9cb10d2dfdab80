"""Small shared helpers: user-facing errors, atomic writes, hashing, provenance, seeding."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch


class DistilkitError(Exception):
    """An error caused by the user's input. The CLI prints it on one line and exits with code 2."""


def fail_at(path: str | os.PathLike, line: int | None, expected: str) -> DistilkitError:
    """Build the one-line error for bad input: `FILE:LINE: expected ...`."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return DistilkitError(f"{where}: {expected}")


# --------------------------------------------------------------------------- atomic output


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[^/]*)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_stale_temp(path: str | os.PathLike, name: str | None = None) -> bool:
    """Whether `path` is a temporary leftover of distilkit (`.NAME.tmp-PID[-...]` or `.NAME.old-PID`, as made
    by `temp_sibling` / `atomic_dir`) whose process is gone; with `name`, only the leftovers of NAME."""
    m = _TEMP_RE.match(Path(path).name)
    return bool(m) and (name is None or m.group("name") == name) and not _pid_alive(int(m.group("pid")))


def clean_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the stale temporary leftovers (see `is_stale_temp`) in `folder`; return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if is_stale_temp(p, name)]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def temp_sibling(final: str | os.PathLike) -> Path:
    """A new empty folder `.NAME.tmp-PID-XXXX` beside `final` (the PID lets a later run see that its writer is
    gone); stale leftovers of earlier, killed writers of the same NAME are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
    return tmp


def output_occupied(path: str | os.PathLike, ignorable: Iterable[str] = ()) -> bool:
    """The one "output folder exists and is not empty" test: True when `path` is a file, or a folder holding
    anything but stale temporary leftovers (`is_stale_temp`, removed here) and the entries named in `ignorable`."""
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        return True
    clean_stale_temps(path)
    return any(p.name not in set(ignorable) for p in path.iterdir())


def check_output_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None, what: str = "--out") -> None:
    """Refuse an output folder that is, lies inside, or contains one of the (existing, local) inputs: writing it
    (or replacing it with --overwrite) would destroy the input. Symlinks are resolved; hub ids are skipped."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if not given or not Path(given).expanduser().exists():  # None / "" (not the current folder) / hub ids
            continue
        source = Path(given).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else ("lies inside" if source in target.parents else "contains")
            raise DistilkitError(f"{out}: {what} {relation} the input {given}: writing it would destroy that input; "
                                 "choose an output folder apart from the inputs")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success rename it to `final`.

    On any exception the temporary folder is removed, so nothing half-written is left; one left by a killed
    process (SIGKILL) is removed by the next `atomic_dir` on the same `final` (see `temp_sibling`).
    If `final` exists and is non-empty, raise unless `overwrite` (then it is replaced).
    """
    final = Path(final)
    if output_occupied(final) and not overwrite:
        raise DistilkitError(f"{final}: output folder exists and is not empty (use --overwrite)")
    tmp = temp_sibling(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# --------------------------------------------------------------------------- hashing / provenance


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes (order-stable): identifies a set of weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """Commit of the distilkit source tree, with '+dirty' when it has uncommitted changes, as it was when
    this process first asked (the CLI asks at start): a long run records the code it loaded, not a HEAD
    that moved while it ran.

    A tree copied elsewhere (e.g. onto a rented GPU machine) may have no .git, or one that is not its
    own: whoever copied it can name the commit in the environment variable DISTILKIT_GIT_COMMIT, which
    then wins over git.
    """
    if os.environ.get("DISTILKIT_GIT_COMMIT"):
        return os.environ["DISTILKIT_GIT_COMMIT"]
    return _git_head()


@functools.cache
def _git_head() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """What every results file records about the software that produced it."""
    from . import __version__
    from .hardware import machine_record

    import transformers

    return {
        "distilkit_version": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine_record(),
    }


# --------------------------------------------------------------------------- progress bars


def progress(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """The one progress bar: tqdm, hidden when `enabled` is False (e.g. not the main rank), when
    DISTILKIT_NO_PROGRESS is set, or when not on a terminal; not left on screen unless `leave=True`."""
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    disable = True if (not enabled or os.environ.get("DISTILKIT_NO_PROGRESS")) else None
    return tqdm(iterable, disable=disable, **kwargs)


# --------------------------------------------------------------------------- randomness


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def use_gpu() -> bool:
    """Whether this process trains on a GPU (Accelerate's `cpu=not use_gpu()`); one GPU per process.

    A launcher that starts more processes on a node than it has visible GPUs (e.g. torchrun with 2
    processes on a 1-GPU machine) would fail inside CUDA with "invalid device ordinal"; say why instead.
    """
    if not torch.cuda.is_available():
        return False
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if per_node > gpus:
        raise DistilkitError(
            f"{per_node} processes on this node but {gpus} visible GPU(s): start one process per GPU, "
            "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run the processes on the CPU (gloo)"
        )
    return True


def reset_accelerate_state() -> None:
    """Let several runs in one process use different Accelerate settings (e.g. distil in bf16, then fine-tune).

    Accelerate keeps its settings in a process-wide singleton that refuses changes; the distributed part
    (PartialState: process group, ranks) is kept, only the per-run part is cleared. Uses Accelerate's
    private `_reset_state`; tolerated missing on other versions.
    """
    from accelerate.state import AcceleratorState, GradientState

    with contextlib.suppress(AttributeError):
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
