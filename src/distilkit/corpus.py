"""Corpus preparation: stream text files into fixed-size token blocks on disk, read them back memory-mapped.

Packing (RoBERTa's FULL-SENTENCES style): all non-empty lines of all input files are tokenized
(no special tokens, no truncation) and concatenated into one continuous token stream, with no
separator between lines or documents. The stream is cut into bodies of `block_size - 2` tokens and
each block is stored as `[CLS] body [SEP]`, so blocks never contain padding. The final partial body
(< block_size - 2 tokens) is dropped and counted in `meta.json` as `tokens_dropped`.

Text: UTF-8 (a BOM on line 1 is ignored), plain or gzip-compressed (detected from the gzip magic
bytes, so `.gz` files and others work). Lines are stripped and empty lines skipped. WikiText
headings such as ` = = Gameplay = = ` are kept as their title text (`Gameplay`): the `=` markers go,
the words stay.

On disk (`out/`):
  `train-00000.bin`, ...    raw little-endian uint16 (uint32 when the vocabulary has > 65536 ids),
                            shape (blocks, block_size), at most `shard_blocks` blocks per shard
  `heldout-00000.bin`, ...  the held-out split, when requested
  `counts.npy`              int64 (vocab_size,) token counts over the train split's bodies (CLS/SEP
                            added by packing are not counted), for masking smoothing
  `meta.json`               tokenizer, vocabulary hash, sources with sha256, per-split token/block
                            counts and shard list, dtype, block_size, provenance

Memory stays flat: lines are streamed, tokenized `chunk_lines` at a time and appended to open shard
files; only one chunk and one partial block are held at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import families
from .sources import RecordSource, is_hub_id, is_record_source
from .utils import DistilkitError, atomic_dir, atomic_write_json, fail_at, provenance

FORMAT = "distilkit-block-corpus"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
DEFAULT_SHARD_BLOCKS = 1 << 20  # 1M blocks: 256 MiB per shard at block_size 128 in uint16
CHUNK_LINES = 1000  # lines tokenized per batch
CHUNK_CHARS = 1 << 22  # ... or fewer, when they reach this many characters

_HEADING = re.compile(r"^(=(?: =)*) (.*\S) \1$")  # WikiText: "= Title =", "= = Section = =", ...


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def vocab_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's sorted (token, id) items: identifies the id mapping a corpus was made with."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


# =========================================================================== reading text


class _CountingReader(io.RawIOBase):
    """Raw reader that hashes every byte it reads and reports byte counts (for the progress bar)."""

    def __init__(self, raw, on_bytes: Callable[[int], None] | None):
        self.raw, self.on_bytes = raw, on_bytes
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        if n:
            self.sha.update(memoryview(buf)[:n])
            self.nbytes += n
            if self.on_bytes is not None:
                self.on_bytes(n)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class TextSource:
    """One input file, streamed as (line_number, text) pairs of non-empty, stripped lines.

    After full iteration `sha256` (of the file's bytes on disk), `nbytes` and `lines` are set.
    """

    def __init__(self, path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None):
        self.path = Path(path)
        self.on_bytes = on_bytes
        self.sha256: str | None = None
        self.nbytes = 0
        self.lines = 0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for lineno, text in self.raw_lines():
            text = clean_line(text)
            if text:
                self.lines += 1
                yield lineno, text

    def raw_lines(self) -> Iterator[tuple[int, str]]:
        """Every line as (line_number, text with its line end), decoded as UTF-8 (a leading BOM dropped).

        A file that is not UTF-8, or a truncated/corrupt gzip stream, raises `FILE:LINE: expected ...`.
        """
        if not self.path.is_file():
            raise fail_at(self.path, None, _not_a_file(self.path))
        try:
            counting = _CountingReader(open(self.path, "rb", buffering=0), self.on_bytes)
        except OSError as exc:
            raise fail_at(self.path, None, f"expected a readable file ({exc.strerror or exc})") from None
        buffered = io.BufferedReader(counting, buffer_size=1 << 20)
        is_gzip = buffered.peek(2)[:2] == b"\x1f\x8b"
        stream = gzip.GzipFile(fileobj=buffered, mode="rb") if is_gzip else buffered
        lineno = 0
        try:
            with stream:
                while True:
                    try:
                        raw = stream.readline()
                    except (OSError, EOFError, zlib.error) as exc:
                        raise fail_at(self.path, lineno + 1, f"expected a readable gzip stream ({exc})") from None
                    if not raw:
                        break
                    lineno += 1
                    try:
                        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        raise fail_at(
                            self.path, lineno, f"expected UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                        ) from None
                    yield lineno, text
        finally:
            buffered.close()
        self.sha256 = counting.sha.hexdigest()
        self.nbytes = counting.nbytes


def _not_a_file(path: Path) -> str:
    return "expected a text file, got a folder" if path.is_dir() else "no such file"


def clean_line(line: str) -> str:
    """Strip whitespace; reduce a WikiText heading (` = = Title = = `) to its title text."""
    line = line.strip()
    m = _HEADING.match(line)
    return m.group(2).strip() if m else line


def load_text_lines(path: str | os.PathLike) -> Iterator[str]:
    """Yield the non-empty, stripped lines of a UTF-8 text file (gzip accepted), headings reduced to titles.

    These lines, tokenized and concatenated, are exactly the token stream that `prepare_corpus` packs.
    """
    for _, text in TextSource(path):
        yield text


def _chunks(lines: Iterator[tuple[int, str]], max_lines: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for _, text in lines:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= max_lines or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# =========================================================================== writing blocks


class _Packer:
    """Cuts a token stream into bodies of `body` tokens, keeping the remainder for the next call."""

    def __init__(self, body: int):
        self.body = body
        self.rest = np.empty(0, dtype=np.int64)
        self.tokens_in = 0

    def add(self, ids: np.ndarray) -> np.ndarray:
        self.tokens_in += len(ids)
        stream = np.concatenate([self.rest, ids])
        n = len(stream) // self.body
        bodies = stream[: n * self.body].reshape(n, self.body)
        self.rest = stream[n * self.body :].copy()
        return bodies


class _SplitWriter:
    """Appends `[CLS] body [SEP]` blocks to shard files `{split}-{k:05d}.bin`; a shard is created only when written to."""

    def __init__(self, folder: Path, split: str, block_size: int, dtype: np.dtype, shard_blocks: int, cls_id: int, sep_id: int):
        self.folder, self.split, self.block_size, self.dtype = folder, split, block_size, dtype
        self.shard_blocks, self.cls_id, self.sep_id = shard_blocks, cls_id, sep_id
        self.shards: list[dict] = []
        self.fh = None
        self.blocks = 0

    def write(self, bodies: np.ndarray) -> None:
        if len(bodies) == 0:
            return
        blocks = np.empty((len(bodies), self.block_size), dtype=self.dtype)
        if self.cls_id is None:  # causal-LM packing: bare bodies (families.packing)
            blocks[:] = bodies
        else:
            blocks[:, 0] = self.cls_id
            blocks[:, 1:-1] = bodies
            blocks[:, -1] = self.sep_id
        blocks = blocks.astype(self.dtype.newbyteorder("<"), copy=False)
        start = 0
        while start < len(blocks):
            if self.fh is None or self.shards[-1]["blocks"] == self.shard_blocks:
                self._open_next()
            take = min(len(blocks) - start, self.shard_blocks - self.shards[-1]["blocks"])
            self.fh.write(blocks[start : start + take].tobytes())
            self.shards[-1]["blocks"] += take
            self.blocks += take
            start += take

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.fh = open(self.folder / name, "wb")
        self.shards.append({"file": name, "blocks": 0})

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None


def _progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable`: off when asked or when DISTILKIT_NO_PROGRESS is set; None = only on a TTY."""
    if progress is False or os.environ.get("DISTILKIT_NO_PROGRESS"):
        return True
    return False if progress else None


# =========================================================================== prepare


def prepare_corpus(
    tokenizer: str,
    inputs: list[str],
    out: str,
    block_size: int = 128,
    heldout_fraction: float = 0.0,
    heldout_inputs: list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    *,
    shard_blocks: int = DEFAULT_SHARD_BLOCKS,
    chunk_lines: int = CHUNK_LINES,
    text_field: str | None = None,
) -> dict:
    """Tokenize `inputs` into `[CLS] ... [SEP]` blocks of `block_size` tokens under `out`; return the meta dict.

    Inputs are text files, or JSONL / CSV / Parquet files (and, with `text_field`, hub dataset ids) whose
    `text_field` (default "text") is read (sources.py). A GPT-2-style tokenizer packs bare blocks (families.packing).

    Held-out split: either `heldout_fraction` F (each block goes to `heldout` with probability F,
    decided by a numpy generator seeded with `seed`, in stream order) or `heldout_inputs` (separate
    files packed into their own stream). The folder appears atomically, complete, or not at all.
    """
    from .models import load_config, load_tokenizer, resolve_model

    started = time.time()
    inputs = [str(p) for p in inputs]
    heldout_inputs = [str(p) for p in heldout_inputs or []]
    if not inputs:
        raise DistilkitError("prepare-corpus: expected at least one input file")
    for path in inputs + heldout_inputs:
        if not Path(path).is_file() and not (text_field and is_hub_id(path)):
            raise fail_at(path, None, _not_a_file(Path(path)))
    from .utils import check_output_not_input  # an --out that is or holds an input would destroy it (--overwrite)
    check_output_not_input(out, tokenizer, *inputs, *heldout_inputs)
    if block_size < 3:
        raise DistilkitError(f"prepare-corpus: block_size must be >= 3 ([CLS] + tokens + [SEP]), got {block_size}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise DistilkitError(f"prepare-corpus: heldout fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction > 0 and heldout_inputs:
        raise DistilkitError("prepare-corpus: give either a heldout fraction or heldout files, not both")
    if shard_blocks < 1 or chunk_lines < 1:
        raise ValueError("shard_blocks and chunk_lines must be >= 1")

    tok = load_tokenizer(tokenizer)
    if not getattr(tok, "is_fast", False):
        raise DistilkitError(f"{tokenizer}: expected a fast (Rust) tokenizer with tokenizer.json or a WordPiece vocab")
    pack = families.packing(tok, block_size, str(tokenizer))  # [CLS] body [SEP], or GPT-2: body, end-of-text per line
    max_len = tok.model_max_length
    if max_len is not None and max_len < 1_000_000 and block_size > max_len:
        raise DistilkitError(f"prepare-corpus: block_size {block_size} exceeds the tokenizer's model_max_length {max_len}")
    positions = getattr(load_config(resolve_model(tokenizer)), "max_position_embeddings", None)
    if isinstance(positions, int) and block_size > positions:
        raise DistilkitError(f"prepare-corpus: block_size {block_size} exceeds the {positions} positions of the model "
                             f"{tokenizer} (config.json max_position_embeddings)")
    vocab_size = len(tok)
    dtype = dtype_for_vocab(vocab_size)
    body = pack.body

    def tokenize(lines: list[str]) -> np.ndarray:
        # verbose=False silences "sequence longer than max length": blocks are cut later
        ids = tok(lines, add_special_tokens=False, truncation=False, return_attention_mask=False,
                  return_token_type_ids=False, verbose=False)["input_ids"]
        if pack.eos_id is not None:
            ids = [line + [pack.eos_id] for line in ids]
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))

    total_bytes = sum(Path(p).stat().st_size for p in inputs + heldout_inputs if Path(p).is_file())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-corpus", disable=_progress_disabled(progress))

    def stream(paths: list[str], on_bodies: Callable[[np.ndarray], None]) -> tuple[list[dict], _Packer]:
        """Tokenize `paths` as one continuous stream, passing each batch of full bodies to `on_bodies`."""
        packer = _Packer(body)
        sources = []
        for path in paths:
            src = (RecordSource(path, text_field, bar.update) if is_record_source(path, text_field)
                   else TextSource(path, on_bytes=bar.update))  # JSONL / CSV / Parquet / hub: sources.py
            for lines in _chunks(iter(src), chunk_lines, CHUNK_CHARS):
                on_bodies(packer.add(tokenize(lines)))
            sources.append({"path": str(path), "sha256": src.sha256, "bytes": src.nbytes, "lines": src.lines})
        return sources, packer

    with atomic_dir(out, overwrite=overwrite) as tmp:
        writers = {
            split: _SplitWriter(tmp, split, block_size, dtype, shard_blocks, pack.cls_id, pack.sep_id)
            for split in SPLITS
        }
        counts = np.zeros(vocab_size, dtype=np.int64)
        rng = np.random.default_rng(seed)

        def to_train(bodies: np.ndarray) -> None:
            counts[:] += np.bincount(bodies.ravel(), minlength=vocab_size)
            writers["train"].write(bodies)

        def split_by_fraction(bodies: np.ndarray) -> None:
            held = rng.random(len(bodies)) < heldout_fraction
            to_train(bodies[~held])
            writers["heldout"].write(bodies[held])

        try:
            train_sources, train_packer = stream(inputs, split_by_fraction if heldout_fraction > 0 else to_train)
            heldout_sources, heldout_packer = [], None
            if heldout_inputs:
                heldout_sources, heldout_packer = stream(heldout_inputs, writers["heldout"].write)
        finally:
            bar.close()
            for w in writers.values():
                w.close()

        # --- refuse corpora that produced no block where one is needed
        names = ", ".join(inputs)
        if writers["train"].blocks == 0:
            raise DistilkitError(
                f"{names}: expected at least {body} tokens to fill one block of {block_size} "
                f"(got {train_packer.tokens_in} tokens and {writers['heldout'].blocks} held-out blocks)"
            )
        if heldout_inputs and writers["heldout"].blocks == 0:
            raise DistilkitError(
                f"{', '.join(heldout_inputs)}: expected at least {body} tokens to fill one held-out block "
                f"of {block_size} (got {heldout_packer.tokens_in} tokens)"
            )
        if heldout_fraction > 0 and writers["heldout"].blocks == 0:
            raise DistilkitError(
                f"{names}: heldout fraction {heldout_fraction} selected none of {writers['train'].blocks} blocks "
                "(use a larger corpus or fraction)"
            )
        np.save(tmp / "counts.npy", counts, allow_pickle=False)

        splits = {}
        for split, w in writers.items():
            if w.blocks:
                splits[split] = {"blocks": w.blocks, "tokens": w.blocks * body, "shards": w.shards}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": str(tokenizer),
            "tokenizer_path": resolve_model(tokenizer),
            "tokenizer_class": type(tok).__name__,
            "vocab_size": vocab_size,
            "vocab_sha256": vocab_sha256(tok),
            "special_ids": {
                "cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id,
                "mask": tok.mask_token_id, "unk": tok.unk_token_id,
                "all": sorted(set(int(i) for i in tok.all_special_ids)),
            },
            "block_size": block_size,
            "dtype": dtype.name,
            "byte_order": "little",
            "packing": pack.text,
            **({"text_field": text_field} if text_field else {}),
            "text": "UTF-8 lines, stripped, empty lines skipped, WikiText ' = Title = ' headings kept as their title text",
            "sources": {"train": train_sources, "heldout": heldout_sources},
            "heldout": {"fraction": heldout_fraction, "seed": seed, "files": heldout_inputs},
            "splits": splits,
            "tokens_dropped": {
                "train": len(train_packer.rest),
                **({"heldout": len(heldout_packer.rest)} if heldout_packer is not None else {}),
            },
            "counts": {"file": "counts.npy", "split": "train", "total": int(counts.sum())},
            "shard_blocks": shard_blocks,
            "seconds": round(time.time() - started, 3),
            "provenance": provenance(),
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta


# =========================================================================== reading blocks


class BlockCorpus:
    """Read side of a prepared corpus: one split's blocks, memory-mapped (opened lazily, safe to pickle)."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise fail_at(self.path, None, "expected a prepared corpus folder with meta.json (run distilkit prepare-corpus)")
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise fail_at(meta_path, getattr(exc, "lineno", None), "expected valid JSON") from None
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise fail_at(meta_path, None, f"expected {FORMAT} version {FORMAT_VERSION}")
        try:
            if split not in self.meta["splits"]:
                raise DistilkitError(f"{self.path}: no '{split}' split (have: {', '.join(self.meta['splits'])})")
            self.split = split
            self.block_size: int = int(self.meta["block_size"])
            self.vocab_size: int = int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            info = self.meta["splits"][split]
            self._shard_files = [s["file"] for s in info["shards"]]
            self._shard_blocks = [int(s["blocks"]) for s in info["shards"]]
            self.meta["special_ids"]["all"]
        except (KeyError, TypeError, ValueError) as exc:
            raise fail_at(meta_path, None, f"expected the fields distilkit prepare-corpus writes ({type(exc).__name__}: "
                                           f"{exc}); prepare the corpus again") from None
        self._offsets = np.cumsum([0] + self._shard_blocks)
        self._maps: list[np.memmap] | None = None
        for name, n in zip(self._shard_files, self._shard_blocks):
            f = self.path / name
            expected = n * self.block_size * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise fail_at(f, None, f"expected a shard of {expected} bytes ({n} blocks); the corpus is incomplete")

    @property
    def special_ids(self) -> list[int]:
        return list(self.meta["special_ids"]["all"])

    @property
    def num_tokens(self) -> int:
        """Tokens in this split's blocks, without the [CLS]/[SEP] added by packing."""
        return int(self.meta["splits"][self.split]["tokens"])

    def _shards(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(self.path / f, dtype=self.dtype, mode="r", shape=(n, self.block_size))
                for f, n in zip(self._shard_files, self._shard_blocks)
            ]
        return self._maps

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None  # reopened in the receiving process
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, idx: int) -> np.ndarray:
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {idx} out of range for {n} blocks")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return np.asarray(self._shards()[s][i - self._offsets[s]], dtype=np.int64)

    def batch(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """Blocks at `indices` as a (len(indices), block_size) int64 tensor."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        out = np.empty((idx.size, self.block_size), dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        maps = self._shards()
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = maps[s][idx[sel] - self._offsets[s]]
        return torch.from_numpy(out)

    def token_counts(self) -> np.ndarray:
        """(vocab_size,) int64 token counts over the train split (the same for every split's reader)."""
        path = self.path / "counts.npy"
        if not path.is_file():
            raise fail_at(path, None, "expected the token counts that masking smoothing needs (not found: prepare the "
                                      "corpus again, or set smoothing to null)")
        try:
            counts = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise fail_at(path, None, f"expected a .npy array of int64 token counts ({exc})") from None
        if counts.shape != (self.vocab_size,) or counts.dtype != np.int64:
            raise fail_at(self.path / "counts.npy", None, f"expected int64 counts of shape ({self.vocab_size},)")
        return counts


# =========================================================================== memory measurement

_MEASURE_SCRIPT = r"""
import json, sys
args = json.loads(sys.argv[1])
from distilkit.corpus import measure_prepare_memory
print(json.dumps(measure_prepare_memory(**args, isolated=False)))
"""


def _rss_mib() -> float | None:
    """Current resident set size (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_prepare_memory(
    tokenizer: str, inputs: list[str], out: str, *, tracemalloc: bool = False, isolated: bool = True, **kwargs
) -> dict:
    """Run `prepare_corpus` and report the memory it needed, for the flat-memory test and benchmarks.

    `isolated` runs it in a fresh Python process (so peak RSS means something). Imports and the
    tokenizer are loaded before measuring. Returns {"rss_before_mib" (RSS after imports),
    "peak_rss_mib" (process peak, Linux ru_maxrss), "python_peak_mib" (tracemalloc peak of
    Python/numpy allocations during preparation, when `tracemalloc`), "seconds", "tokens", "input_bytes"}.
    """
    if isolated:
        import subprocess

        args = {"tokenizer": str(tokenizer), "inputs": [str(p) for p in inputs], "out": str(out),
                "tracemalloc": tracemalloc, **kwargs}
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DISTILKIT_NO_PROGRESS": "1"}
        proc = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(args)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"prepare_corpus subprocess failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import resource
    import tracemalloc as tm

    from .models import load_tokenizer

    load_tokenizer(tokenizer)  # imports and lazy module loading happen before measuring
    provenance()
    rss_before = _rss_mib()
    if tracemalloc:
        tm.start()
    try:
        t = time.time()
        meta = prepare_corpus(tokenizer, inputs, out, progress=False, **kwargs)
        seconds = time.time() - t
        python_peak = tm.get_traced_memory()[1] / 2**20 if tracemalloc else None
    finally:
        if tracemalloc:
            tm.stop()
    return {
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # whole process: use isolated=True
        "python_peak_mib": python_peak,
        "seconds": seconds,
        "tokens": meta["splits"]["train"]["tokens"],
        "input_bytes": sum(s["bytes"] for s in meta["sources"]["train"]),
    }
