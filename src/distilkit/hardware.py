"""What this machine is, and the settings that follow from it: precision and the allocator.

* `cpu_info()`: model name, vendor family/model and SIMD flags from /proc/cpuinfo (recorded by every
  benchmark and run, since CPUs differ between machines: bf16 is ~2.5x faster than fp32 for matmuls on
  a CPU with avx512_bf16, and many times slower on an AVX2-only one).
* `resolve_mixed_precision("auto")`: bf16 autocast on a CUDA device with bf16, or on a CPU whose flags
  include avx512_bf16 or amx_bf16; "no" (fp32) elsewhere. Explicit "no" / "bf16" / "fp16" are kept.
* `tune_allocator()`: glibc only, serve large temporaries from the heap and never trim it (mallopt),
  which avoids re-faulting the vocabulary-sized buffers of every step (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from .utils import DistilkitError

PRECISIONS = ("auto", "no", "bf16", "fp16")
#: CPU flags that make bf16 autocast faster than fp32 on a CPU (native bf16 dot products / tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: SIMD flags worth recording next to any speed number.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")
#: Set to 0 / off to keep glibc's default allocator behaviour.
ALLOCATOR_ENV = "DISTILKIT_MALLOC_TUNING"


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"cpu_model", "vendor", "family", "model", "flags" (all), "simd_flags" (the SIMD ones present), "cores"}."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor is enough
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id"),
        "family": _int_or_none(fields.get("cpu family")),
        "model": _int_or_none(fields.get("model")),
        "flags": flags,
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "cores": os.cpu_count(),
    }


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    flags = set(cpu_info()["flags"])
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_mixed_precision(mode: str, cuda: bool | None = None) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively, else "no"; other modes are returned as given."""
    if mode not in PRECISIONS:
        raise DistilkitError(f"mixed_precision: expected one of {', '.join(PRECISIONS)}, got {mode!r}")
    if mode != "auto":
        return mode
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def machine_record() -> dict[str, Any]:
    """What a benchmark or a run records about the machine (flags: the SIMD ones only, to stay short)."""
    import torch

    info = cpu_info()
    return {
        "cpu_model": info["cpu_model"],
        "cpu_vendor": info["vendor"],
        "cpu_family": info["family"],
        "cpu_model_number": info["model"],
        "cpu_flags": info["simd_flags"],
        "cpu_bf16": cpu_has_bf16(),
        "cores": info["cores"],
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator_record(),
    }


# --------------------------------------------------------------------------- allocator

_TUNED: bool | None = None


def tune_allocator() -> bool:
    """glibc: no mmap for large allocations and no trimming (mallopt), once per process. Off with
    DISTILKIT_MALLOC_TUNING=0. Returns whether the tuning is in effect."""
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    _TUNED = False
    if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "off", "no", "false"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        _TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        _TUNED = False
    return _TUNED


def allocator_record() -> dict[str, Any]:
    return {
        "malloc_tuning": bool(_TUNED),
        "switch": f"{ALLOCATOR_ENV}={os.environ.get(ALLOCATOR_ENV, '1')}",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
