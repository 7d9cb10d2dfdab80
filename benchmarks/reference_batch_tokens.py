#!/usr/bin/env python
"""Tokens per optimizer update of the paper's code, estimated on a proxy corpus (for the `paper` preset).

    python benchmarks/reference_batch_tokens.py --data-dir ../shared/data \
        --out benchmarks/results/reference_batch_tokens.json

The reference (transformers' research_projects/distillation, read, not copied) trains on one text line
per sequence: `[CLS] line [SEP]` tokenized with bert-base-uncased's WordPiece (scripts/binarized_data.py);
sequences over 512 tokens are cut into pieces of 510 with [CLS]/[SEP] added back, sequences of 11 tokens
or fewer are dropped, and so are those that are half [UNK] or more (lm_seqs_dataset.py). An update is
5 sequences per GPU x 8 GPUs x 50 accumulation steps = 2,000 sequences, padded only to the longest of
each (length-grouped) batch, so its real tokens are 2,000 x the mean sequence length.

We do not have its corpus (English Wikipedia + Toronto BookCorpus, one paragraph per line). The proxy is
WikiText-2 train, its paragraph lines (non-empty lines that are not ` = Heading = ` lines), tokenized
with the teacher's tokenizer: `minilm` (all-MiniLM-L6-v2) ships bert-base-uncased's uncased WordPiece
vocabulary. Wikipedia paragraphs are the half of the reference corpus it resembles; BookCorpus lines are
sentences, far shorter, so the estimate is an upper end for the mixture. The script prints and writes the
length distribution and `effective_tokens = 2000 x mean`, the value the `paper` preset uses.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging

from distilkit.models import load_tokenizer
from distilkit.utils import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
WIKI_TRAIN = Path("wikitext") / "wikitext-2-raw" / "wiki.train.raw.gz"
HEADING = re.compile(r"^\s*(=\s*)+[^=].*?(\s*=)+\s*$")
SEQUENCES_PER_UPDATE = 5 * 8 * 50  # --batch_size 5 per GPU, 8 GPUs, --gradient_accumulation_steps 50


def reference_sequences(ids: list[int], cls_id: int, sep_id: int, max_len: int) -> list[list[int]]:
    """One line's sequences as the reference builds them: [CLS] ids [SEP], cut into max_len - 2 pieces."""
    seq = [cls_id, *ids, sep_id]
    if len(seq) <= max_len:
        return [seq]
    pieces = []
    for i in range(0, len(seq), max_len - 2):
        piece = seq[i:i + max_len - 2]
        piece = ([cls_id] if piece[0] != cls_id else []) + piece + ([sep_id] if piece[-1] != sep_id else [])
        pieces.append(piece)
    return pieces


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tokenizer", default="minilm", help="bert-base-uncased's WordPiece (default: minilm)")
    ap.add_argument("--max-len", type=int, default=512, help="the reference's max_model_input_size")
    ap.add_argument("--min-len", type=int, default=11, help="sequences of this many tokens or fewer are dropped")
    ap.add_argument("--out", help="write the distribution as JSON here")
    args = ap.parse_args(argv)

    src = Path(args.data_dir) / WIKI_TRAIN
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        lines = [line.strip() for line in fh]
    paragraphs = [line for line in lines if line and not HEADING.match(line)]
    headings = sum(1 for line in lines if line and HEADING.match(line))

    t0 = time.perf_counter()
    hf_logging.set_verbosity_error()  # "sequence longer than 512": expected, the lines are cut below
    tok = load_tokenizer(args.tokenizer)
    ids = tok(paragraphs, add_special_tokens=False)["input_ids"]
    seqs = [s for line_ids in ids for s in reference_sequences(line_ids, tok.cls_token_id, tok.sep_token_id, args.max_len)]
    lengths = np.array([len(s) for s in seqs])
    unk_share = np.array([s.count(tok.unk_token_id) / len(s) for s in seqs])
    keep = (lengths > args.min_len) & (unk_share < 0.5)
    kept = lengths[keep]
    mean = float(kept.mean())
    result = {
        "corpus": str(WIKI_TRAIN), "tokenizer": args.tokenizer, "vocab_size": len(tok),
        "lines": len(lines), "heading_lines": headings, "paragraph_lines": len(paragraphs),
        "sequences_before_filter": int(len(lengths)), "split_lines": int(sum(len(x) + 2 > args.max_len for x in ids)),
        "dropped_short": int((lengths <= args.min_len).sum()), "dropped_unknown": int(((unk_share >= 0.5) & (lengths > args.min_len)).sum()),
        "sequences": int(keep.sum()), "tokens": int(kept.sum()),
        "mean_tokens": round(mean, 3), "median_tokens": float(np.median(kept)),
        "percentiles": {str(q): float(np.percentile(kept, q)) for q in (5, 10, 25, 50, 75, 90, 95, 99)},
        "max_tokens": int(kept.max()),
        "histogram": {f"{lo}-{hi - 1}": int(((kept >= lo) & (kept < hi)).sum())
                      for lo, hi in [(12, 32), (32, 64), (64, 128), (128, 192), (192, 256), (256, 384), (384, 513)]},
        "sequences_per_update": SEQUENCES_PER_UPDATE,
        "tokens_per_update": round(SEQUENCES_PER_UPDATE * mean),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{src}: {len(paragraphs)} paragraph lines ({headings} headings left out) -> {result['sequences']} sequences "
          f"({result['split_lines']} lines split at {args.max_len}, {result['dropped_short']} of <= {args.min_len} tokens "
          f"and {result['dropped_unknown']} half-[UNK] dropped)")
    print("tokens per sequence: mean {mean_tokens}, median {median_tokens}, p10 {p10}, p90 {p90}, max {max_tokens}".format(
        p10=result["percentiles"]["10"], p90=result["percentiles"]["90"], **result))
    print("histogram: " + ", ".join(f"{k}: {v}" for k, v in result["histogram"].items()))
    print(f"tokens per update: {SEQUENCES_PER_UPDATE} x {mean:.3f} = {result['tokens_per_update']:,} "
          f"(the paper preset's distill.effective_tokens)")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
