#!/usr/bin/env python
"""Peak memory of preparing and reading a corpus 1x and 8x the size of WikiText-2 train: it must stay flat.

    python benchmarks/corpus_memory.py --data-dir ../shared/data --out benchmarks/results/corpus_memory.json

For each size (`--copies 1,8`; the 8x input is the train file given 8 times to `prepare_corpus`, which
streams the files one after another, so no 8x text is written anywhere) in a fresh Python process each:

* prepare: `corpus.measure_prepare_memory` (tokenizer and imports loaded before measuring);
* read: open the prepared `BlockCorpus` and read every block once, `--batch-size` blocks at a time, in
  `distill.epoch_order` (the order training reads them), summing the ids so every block is touched.

Reported: RSS after imports (`rss_before_mib`), process peak RSS (`peak_rss_mib`, Linux ru_maxrss) and,
for reading, the peak of anonymous memory (`peak_rss_anon_mib`, RssAnon sampled every 64 batches) next to
the file-backed pages of the memory map (`rss_file_end_mib`): mapped shard pages count in RSS but are page
cache the kernel can drop, so growth of RssFile with corpus size is expected and not a leak.
Prepared corpora go to a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distilkit.bench import cpu_model

REPO = Path(__file__).resolve().parents[1]
WIKI_TRAIN = Path("wikitext") / "wikitext-2-raw" / "wiki.train.raw.gz"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "corpus_memory.json"

_READ_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from corpus_memory import measure_read_memory
print(json.dumps(measure_read_memory(**json.loads(sys.argv[2]), isolated=False)))
"""


def _status_mib() -> dict[str, float]:
    """RssAnon / RssFile / VmRSS of this process in MiB (Linux), empty elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def measure_read_memory(corpus: str, batch_size: int = 32, seed: int = 0, sample_every: int = 64,
                        isolated: bool = True) -> dict[str, Any]:
    """Read every block of a prepared corpus's train split once, in training order; report memory and time.

    `isolated` runs it in a fresh Python process, so that peak RSS means something.
    """
    if isolated:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DISTILKIT_NO_PROGRESS": "1"}
        args = {"corpus": str(corpus), "batch_size": batch_size, "seed": seed, "sample_every": sample_every}
        proc = subprocess.run([sys.executable, "-c", _READ_SCRIPT, str(Path(__file__).resolve().parent), json.dumps(args)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"read subprocess failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import resource

    import numpy as np
    import torch  # noqa: F401  (imported before measuring, as training would have it)

    from distilkit import distill
    from distilkit.corpus import BlockCorpus

    blocks = BlockCorpus(corpus, "train")
    before = _status_mib()
    peak_anon = before.get("RssAnon", 0.0)
    t = time.perf_counter()
    order = distill.epoch_order(len(blocks), seed, 0)
    checksum = 0
    n_batches = (len(blocks) + batch_size - 1) // batch_size
    for micro in range(n_batches):
        ids = blocks.batch(order[micro * batch_size : (micro + 1) * batch_size])
        checksum += int(ids.sum())
        if micro % sample_every == 0:
            peak_anon = max(peak_anon, _status_mib().get("RssAnon", 0.0))
    seconds = time.perf_counter() - t
    end = _status_mib()
    peak_anon = max(peak_anon, end.get("RssAnon", 0.0))
    return {
        "rss_before_mib": round(before.get("VmRSS", 0.0), 1),
        "rss_anon_before_mib": round(before.get("RssAnon", 0.0), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_anon_mib": round(peak_anon, 1),
        "rss_file_end_mib": round(end.get("RssFile", 0.0), 1),
        "seconds": round(seconds, 2),
        "blocks": len(blocks),
        "tokens": blocks.num_tokens,
        "shard_bytes": int(sum(np.prod(m.shape) * m.dtype.itemsize for m in blocks._shards())),
        "batches": n_batches,
        "checksum": checksum,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from distilkit.corpus import measure_prepare_memory
    from distilkit.utils import atomic_write_json, provenance, sha256_file

    started = time.time()
    text = Path(args.text) if args.text else _data_dir(args.data_dir) / WIKI_TRAIN
    if not text.is_file():
        raise SystemExit(f"{text}: no such text file (give --data-dir or --text)")
    copies = [int(c) for c in args.copies.split(",")]
    load_before = _load()
    runs = []
    with tempfile.TemporaryDirectory(prefix="distilkit-corpus-mem-", dir=args.tmp_dir) as tmp:
        for k in copies:
            out = Path(tmp) / f"corpus-x{k}"
            _say(f"prepare {k}x", args.quiet)
            prep = measure_prepare_memory(args.tokenizer, [str(text)] * k, str(out), block_size=args.block_size)
            _say(f"read {k}x", args.quiet)
            read = measure_read_memory(str(out), args.batch_size)
            runs.append({"copies": k, "prepare": {k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in prep.items()},
                         "read": read})
    base, big = runs[0], runs[-1]

    def growth(run: dict, part: str, peak: str, before: str) -> float:
        return run[part][peak] - run[part][before]

    flat = {
        "compared": f"{big['copies']}x vs {base['copies']}x",
        "token_ratio": round(big["prepare"]["tokens"] / base["prepare"]["tokens"], 3),
        "prepare_peak_growth_mib": round(growth(big, "prepare", "peak_rss_mib", "rss_before_mib")
                                         - growth(base, "prepare", "peak_rss_mib", "rss_before_mib"), 1),
        "read_anon_peak_growth_mib": round(growth(big, "read", "peak_rss_anon_mib", "rss_anon_before_mib")
                                           - growth(base, "read", "peak_rss_anon_mib", "rss_anon_before_mib"), 1),
        "read_peak_rss_growth_mib": round(growth(big, "read", "peak_rss_mib", "rss_before_mib")
                                          - growth(base, "read", "peak_rss_mib", "rss_before_mib"), 1),
        "extra_shard_mib": round((big["read"]["shard_bytes"] - base["read"]["shard_bytes"]) / 2**20, 1),
        "note": "growth = (peak - before) at the larger size minus the same at 1x. Reading's peak RSS includes "
                "the memory-mapped shard pages (page cache, up to the shard size); anonymous memory is what the "
                "reader itself holds (the epoch permutation is 8 bytes per block).",
    }
    flat["limit_mib"] = args.flat_limit_mib
    flat["is_flat"] = flat["prepare_peak_growth_mib"] < args.flat_limit_mib and flat["read_anon_peak_growth_mib"] < args.flat_limit_mib
    result = {
        "benchmark": "corpus_memory",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("corpus_memory.py") else None,
        "flat": flat,
        "runs": runs,
        "text": str(text),
        "text_sha256": sha256_file(text),
        "tokenizer": args.tokenizer,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": _load(),
                    "python": platform.python_version()},
        "seconds": round(time.time() - started, 1),
        **provenance(),
    }
    atomic_write_json(args.out, result)
    _say(f"wrote {args.out}", args.quiet)
    return result


def _data_dir(arg: str) -> Path:
    path = Path(arg)
    if not path.is_dir() and arg == "../shared/data" and (REPO.parent / "shared" / "data").is_dir():
        path = REPO.parent / "shared" / "data"
    return path


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="shared data folder (default ../shared/data)")
    p.add_argument("--text", help="text file (default DATA/wikitext/wikitext-2-raw/wiki.train.raw.gz)")
    p.add_argument("--tokenizer", default="minilm")
    p.add_argument("--copies", default="1,8", help="sizes to measure, as multiples of the text (default 1,8)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="blocks per read batch")
    p.add_argument("--flat-limit-mib", type=float, default=16.0,
                   help="growth (MiB) of peak memory from the smallest to the largest size still called flat")
    p.add_argument("--tmp-dir", default=None, help="where the prepared corpora go (default: the system temp folder)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    r = main()
    f = r["flat"]
    print(f"{f['compared']}: prepare peak growth {f['prepare_peak_growth_mib']} MiB, read anonymous peak growth "
          f"{f['read_anon_peak_growth_mib']} MiB, read peak RSS growth {f['read_peak_rss_growth_mib']} MiB "
          f"(mapped shards +{f['extra_shard_mib']} MiB) -> {'flat' if f['is_flat'] else 'NOT flat'}")
