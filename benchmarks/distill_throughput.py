#!/usr/bin/env python
"""Distillation throughput: the paper's own training step (`reference`) vs distilkit's step, and MFU.

    python benchmarks/distill_throughput.py --data-dir ../shared/data --threads 2 --rounds 3 --steps 2 \
        --out benchmarks/results/distill_throughput.json

Every step trains the same 3-layer student (`student_from_teacher(teacher, [0, 2, 4])`, each variant its own
copy and optimizer) against the same frozen teacher (MiniLM by default: 6 layers, hidden 384; it has no
MLM head, so `load_teacher` attaches a fresh one, which is fine for timing) at batch 32, with the
released DistilBERT's loss weights (5/2/1, T=2), dynamic 15% masking, gradient clipping and AdamW.

* reference: the semantics of the paper's `distiller.py` step (HF research_projects/distillation; our own
  code): one WikiText-2 train line per sequence as `[CLS] line [SEP]`, lines longer than the max length
  split into pieces, sequences of 11 tokens or fewer dropped, batches grouped by length (its default
  `group_by_size`: length bins of width 4, random order inside), padded to the batch's longest;
  `model(...)` gives full logits for teacher and student; KL (T^2-scaled `KLDivLoss(batchmean)`) over all
  non-padding positions, masked-LM cross-entropy, `CosineEmbeddingLoss` of the last hidden states over
  non-padding positions; `torch.optim.AdamW` with its default implementation.
* reference_masked: the same with the paper code's `--restrict_ce_to_mask` (KL at the masked positions only;
  the logits are still computed everywhere, then selected).
* distilkit: packed 128-token blocks of a prepared corpus (`corpus.prepare_corpus` on the same file,
  or `--corpus DIR`), read in `distill.epoch_order`; the loss is `losses.compute_losses` (vocabulary
  projection only at the masked positions, fused chunked KL + CE), AdamW over `distill.param_groups`,
  `--optimizer` implementation (default fused), `zero_grad(set_to_none=True)`; fp32.
* distilkit_kl_all: distilkit's step with `kl_positions="all"` (the reference's objective).
* distilkit_bf16 / distilkit_kl_all_bf16: the same under bf16 autocast, i.e. what `distill` runs by default
  (`mixed_precision: auto`) on a CPU with avx512_bf16 / amx_bf16.
* distilkit_unfused / distilkit_kl_all_unfused: `compute_losses(fused=False)` (full logits at the selected rows).
* naive: common practice without length grouping: shuffled lines padded to the batch's longest (truncated).
* distilkit_attention_dropout (`--attention-dropout P`), distilkit_compiled (`--compile`): opt-in settings.

`--variants` picks the variants (default: reference, reference_masked, distilkit, distilkit_kl_all,
distilkit_bf16). Data preparation (tokenising lines, reading blocks) is done before a run is timed;
masking, forward, backward, clipping and the optimizer step are timed. Rounds alternate the order of the
variants (reversed every round), each round running `--steps` steps of every variant after one untimed
warm-up step; the allocator setting (hardware.tune_allocator: on unless DISTILKIT_MALLOC_TUNING=0) is the
same for all of them. `--allocator-rounds N` measures that setting side by side: N rounds of two fresh
processes (tuning on / off, order alternating) timing the distilkit step on the same corpus.

Tokens per second count real text tokens: non-padding tokens other than [CLS]/[SEP]. MFU = model FLOPs
per second / matmul peak of the variant's precision (fp32 or bf16 `torch.matmul` of square matrices, same
threads): against the best peak of the whole run (`mfu_vs_best_peak`, the target) and against the higher
of the two short peaks measured right before and after each timed block (`mfu`, same contention). Model
FLOPs count matmuls only (2*m*n*k each), see FLOPS_FORMULA, with the vocabulary projection credited at the
positions of the variant's objective; executed FLOPs (padding, full projection) are reported beside.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from distilkit import distill, hardware, losses, models
from distilkit.config import DistillConfig, to_dict
from distilkit.corpus import BlockCorpus, load_text_lines, prepare_corpus
from distilkit.masking import IGNORE_INDEX, mask_tokens, special_ids_of
from distilkit.student import student_from_teacher
from distilkit.utils import atomic_write_json, atomic_write_text, model_fingerprint, provenance, set_seed, sha256_file

REPO = Path(__file__).resolve().parents[1]
WIKI_TRAIN = Path("wikitext") / "wikitext-2-raw" / "wiki.train.raw.gz"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "distill_throughput.json"

FLOPS_FORMULA = (
    "matmul FLOPs (2*m*n*k per matmul) per step = "
    "teacher forward [Lt * E + H(n_t)] + student forward+backward 3 * [Ls * E + H(n_s)], "
    "E = sum over sequences i of (l_i * (8*d^2 + 4*d*f) + 4 * l_i^2 * d) "
    "(Q,K,V,O projections, two FFN matmuls, attention scores and context; l_i = the sequence's "
    "non-padding length incl. [CLS]/[SEP]), H(n) = n * (2*d^2 + 2*d*V) (MLM head transform + vocabulary "
    "projection at n positions); n_t = n_s = masked positions (kl_positions=masked) or all non-padding "
    "positions (kl_positions=all); embeddings, LayerNorm, softmax, losses and the optimizer are not counted. "
    "Reference/naive 'model' FLOPs use the same formula with n = the positions of their objective; their "
    "'executed' FLOPs use l_i = padded length and n = batch * padded length (full logits)."
)


# =========================================================================== model shape and FLOPs


@dataclass(frozen=True)
class Shape:
    """What the FLOPs formula needs to know about teacher and student."""

    teacher_layers: int
    student_layers: int
    d: int  # hidden size (teacher = student)
    f: int  # FFN size
    vocab: int

    @classmethod
    def of(cls, teacher, student) -> "Shape":
        tc, sc = teacher.config, student.config
        return cls(tc.num_hidden_layers, sc.n_layers, sc.dim, sc.hidden_dim, sc.vocab_size)


def encoder_layer_flops(lengths, d: int, f: int) -> float:
    """Forward matmul FLOPs of one encoder layer over sequences of the given lengths."""
    ell = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(ell * (8 * d * d + 4 * d * f) + 4 * ell * ell * d))


def head_flops(n_positions: int, d: int, vocab: int) -> float:
    """Forward matmul FLOPs of the MLM head (transform dense + vocabulary projection) at n positions."""
    return float(n_positions) * (2 * d * d + 2 * d * vocab)


def step_flops(shape: Shape, lengths, n_teacher: int, n_student: int, teacher_forward: bool = True) -> float:
    """Matmul FLOPs of one distillation step: teacher forward + 3x student forward (forward + backward)."""
    enc = encoder_layer_flops(lengths, shape.d, shape.f)
    teacher = shape.teacher_layers * enc + head_flops(n_teacher, shape.d, shape.vocab) if teacher_forward else 0.0
    student = 3 * (shape.student_layers * enc + head_flops(n_student, shape.d, shape.vocab))
    return teacher + student


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cpu_flash_flops(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul FLOPs executed by `fn()` as counted by torch's FlopCounterMode (CPU flash attention added)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(size: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Best `torch.matmul` rate of two random size x size matrices of `dtype`, in GFLOP/s (current thread count)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return {"gflops": 2 * size**3 / min(times) / 1e9, "size": size, "repeats": repeats, "dtype": str(dtype).split(".")[-1],
            "seconds": [round(x, 4) for x in times]}


# =========================================================================== data


@dataclass
class Batch:
    """One batch as fed to a step: token ids (padded with pad id), attention mask, and its token counts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_tokens: int  # non-padding tokens other than [CLS]/[SEP]
    lengths: list[int]  # non-padding length of each sequence (incl. [CLS]/[SEP])


def make_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_id: int, sep_id: int) -> Batch:
    real = attention_mask.bool() & (input_ids != cls_id) & (input_ids != sep_id)
    return Batch(input_ids, attention_mask, int(real.sum()), attention_mask.sum(1).tolist())


def naive_batches(tokenizer, lines: list[str], batch_size: int, max_length: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of shuffled text lines, one line per sequence, padded to the batch's longest (truncated at max_length)."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(lines))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            enc = tokenizer([lines[i] for i in order[start : start + batch_size]], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt", return_token_type_ids=False)
            yield make_batch(enc["input_ids"], enc["attention_mask"], tokenizer.cls_token_id, tokenizer.sep_token_id)
        epoch += 1


#: The paper's code drops sequences of this many tokens or fewer ([CLS]/[SEP] included) and groups
#: batches by length in bins of this width (its `group_by_size` default, `create_lengths_groups`).
REFERENCE_MIN_TOKENS = 11
REFERENCE_BIN_WIDTH = 4


def reference_sequences(tokenizer, lines: list[str], max_length: int) -> list[list[int]]:
    """`[CLS] line [SEP]` per text line; longer ones split into pieces of max_length - 2 tokens (each wrapped
    in [CLS]/[SEP]); sequences of REFERENCE_MIN_TOKENS tokens or fewer dropped (the paper's data rules)."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = max_length - 2
    out = []
    for ids in tokenizer(lines, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False, verbose=False)["input_ids"]:
        for start in range(0, max(len(ids), 1), body):
            seq = [cls_id, *ids[start : start + body], sep_id]
            if len(seq) > REFERENCE_MIN_TOKENS:
                out.append(seq)
    return out


def reference_batches(sequences: list[list[int]], batch_size: int, pad_id: int, cls_id: int, sep_id: int,
                      seed: int = 0) -> Iterator[Batch]:
    """Batches as the paper's GroupedBatchSampler draws them: walk a random permutation, put each sequence in
    the buffer of its length bin, emit a buffer when it holds batch_size sequences; pad to the longest."""
    lengths = np.array([len(x) for x in sequences])
    groups = lengths // REFERENCE_BIN_WIDTH
    epoch = 0
    while True:
        buffers: dict[int, list[int]] = {}
        for i in np.random.default_rng([seed, epoch]).permutation(len(sequences)):
            buf = buffers.setdefault(int(groups[i]), [])
            buf.append(int(i))
            if len(buf) == batch_size:
                del buffers[int(groups[i])]
                width = int(lengths[buf].max())
                ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
                for row, j in enumerate(buf):
                    ids[row, : lengths[j]] = torch.tensor(sequences[j])
                attention = (torch.arange(width)[None, :] < torch.as_tensor(lengths[buf])[:, None]).long()
                yield make_batch(ids, attention, cls_id, sep_id)
        epoch += 1


def block_batches(blocks: BlockCorpus, batch_size: int, pad_id: int, cls_id: int, sep_id: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of packed blocks in distill.train's order (epoch permutation, consecutive slices)."""
    epoch = 0
    while True:
        order = distill.epoch_order(len(blocks), seed, epoch)
        for micro in range(len(blocks) // batch_size):
            ids = blocks.batch(distill.rank_slice(order, micro, batch_size, 1, 0))
            yield make_batch(ids, (ids != pad_id).long(), cls_id, sep_id)
        epoch += 1


# =========================================================================== the reference loss


def reference_losses(student, teacher, batch: dict[str, torch.Tensor], cfg: Any, kl_positions: str = "all") -> dict[str, Any]:
    """The triple loss as the paper's `distiller.py` computes it: full logits at every position.

    KL(teacher || student) at temperature T (`KLDivLoss(batchmean)` times T^2) over every non-padding
    position (`kl_positions="all"`) or the masked ones (`"masked"`, its `--restrict_ce_to_mask`),
    cross-entropy at the masked positions, 1 - cosine of the last hidden states over non-padding positions.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_logits, t_logits = s_out.logits.float(), t_out.logits.float()  # (batch, seq, vocab)
    valid = attention_mask.bool()
    sel = valid if kl_positions == "all" else (labels != IGNORE_INDEX) & valid
    T = cfg.temperature
    loss_ce = F.kl_div(F.log_softmax(s_logits[sel] / T, dim=-1), F.softmax(t_logits[sel] / T, dim=-1),
                       reduction="batchmean") * T**2
    loss_mlm = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), labels.view(-1), ignore_index=IGNORE_INDEX)
    s_h, t_h = s_out.hidden_states[-1][valid].float(), t_out.hidden_states[-1][valid].float()
    loss_cos = F.cosine_embedding_loss(s_h, t_h, s_h.new_ones(s_h.size(0)))
    loss = cfg.alpha_ce * loss_ce + cfg.alpha_mlm * loss_mlm + cfg.alpha_cos * loss_cos
    return {"loss": loss, "loss_ce": loss_ce, "loss_mlm": loss_mlm, "loss_cos": loss_cos,
            "n_masked": int((labels != IGNORE_INDEX).sum()), "n_tokens": int(valid.sum())}


# =========================================================================== the steps


@dataclass
class StepStats:
    text_tokens: int
    lengths: list[int]
    padded_length: int
    n_masked: int
    n_projected: int  # positions where the vocabulary projection ran (per model)
    loss: float
    seconds: float = 0.0


class Variant:
    """A training step over its own copy of the student, with its own optimizer, data and masking stream."""

    name = "variant"

    precision = "fp32"

    def __init__(self, student, teacher, tokenizer, cfg: DistillConfig, batches: Iterator[Batch], seed: int,
                 optimizer: str = "default", precision: str = "fp32"):
        self.precision = precision
        self.student = copy.deepcopy(student).train()
        if getattr(cfg, "attention_dropout", None) is not None:  # as distill.train applies it
            models.set_attention_dropout(self.student, cfg.attention_dropout)
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.batches = batches
        self.generator = torch.Generator().manual_seed(seed)
        self.special = special_ids_of(tokenizer)
        self.mcfg = distill.masking_config(cfg)
        kwargs = {"fused": True} if optimizer == "fused" else {"foreach": True} if optimizer == "foreach" else {}
        self.optimizer_impl = optimizer
        self.optimizer = torch.optim.AdamW(distill.param_groups(self.student, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)

    def mask(self, batch: Batch) -> dict[str, torch.Tensor]:
        masked, labels = mask_tokens(
            batch.input_ids, mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
            special_ids=self.special, cfg=self.mcfg, attention_mask=batch.attention_mask, generator=self.generator,
        )
        return {"input_ids": masked, "attention_mask": batch.attention_mask, "labels": labels}

    def autocast(self):
        """bf16 autocast around the forward pass and the losses (as `distill` under mixed_precision bf16)."""
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def projected(self, inputs: dict[str, torch.Tensor], result: dict[str, Any]) -> int:
        raise NotImplementedError

    def step(self, batch: Batch) -> StepStats:
        """Mask, forward, backward, clip, optimizer step: one timed training step."""
        t = time.perf_counter()
        inputs = self.mask(batch)
        with self.autocast():
            result = self.loss(inputs)
        result["loss"].backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        return StepStats(batch.text_tokens, batch.lengths, batch.input_ids.shape[1], result["n_masked"],
                         self.projected(inputs, result), float(result["loss"].detach()), seconds)


class ReferenceStep(Variant):
    """The paper's step (`reference`, KL at all positions) or its `--restrict_ce_to_mask` (`reference_masked`)."""

    name = "reference"

    @property
    def credit(self) -> str:  # useful work: the projection at the positions its objective needs
        return self.cfg.kl_positions

    def loss(self, inputs):
        return reference_losses(self.student, self.teacher, inputs, self.cfg, self.cfg.kl_positions)

    def projected(self, inputs, result):
        return inputs["input_ids"].numel()  # every position, padding included


class NaiveStep(ReferenceStep):
    """Shuffled lines padded to the batch's longest, no length grouping (variant `naive`)."""

    name = "naive"


class DistilkitStep(Variant):
    name = "distilkit"

    @property
    def credit(self) -> str:
        return self.cfg.kl_positions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.student_fwd = losses.MLMForward(self.student)  # as distill.train wraps them
        self.teacher_fwd = losses.MLMForward(self.teacher)

    fused = True

    def loss(self, inputs):
        return losses.compute_losses(self.student_fwd, self.teacher_fwd, inputs, distill.loss_config(self.cfg),
                                     fused=self.fused)

    def projected(self, inputs, result):
        return result["n_tokens"] if self.cfg.kl_positions == "all" else result["n_masked"]


def model_flops(shape: Shape, s: StepStats, credit: str = "masked") -> float:
    """Useful matmul FLOPs of a step: real lengths; vocabulary projection credited at the masked positions
    (`credit="masked"`, distilkit's default objective) or at every non-padding position (`"all"`)."""
    n = s.n_masked if credit == "masked" else sum(s.lengths)
    return step_flops(shape, s.lengths, n, n)


def executed_flops(shape: Shape, s: StepStats) -> float:
    """Matmul FLOPs the step really ran: padded lengths, projection where it ran."""
    return step_flops(shape, [s.padded_length] * len(s.lengths), s.n_projected, s.n_projected)


# =========================================================================== profiling

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def _category(key: str, shapes: list, vocab: int) -> str:
    if key in MATMUL_OPS:
        return "matmul"
    dims = [sh for sh in shapes if isinstance(sh, (list, tuple)) and sh]
    if any(sh[-1] == vocab for sh in dims):
        return "vocabulary-sized (softmaxes, losses, head)"
    if any(len(sh) == 4 and sh[-1] == sh[-2] and sh[-1] > 1 for sh in dims):
        return "attention matrices (softmax, dropout)"
    if key == "aten::bernoulli_":
        return "dropout masks (hidden)"
    return "other (layer norm, GELU, adds, copies, optimizer, ...)"


def profile_step(variant: Variant, batch: Batch, vocab: int, rows: int = 30) -> tuple[str, dict[str, Any]]:
    """Profile one step: (table of the top ops by self CPU time, summary with shares by kind of op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        stats = variant.step(batch)
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    by_shape = prof.key_averages(group_by_input_shape=True)
    table_shapes = by_shape.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50,
                                  max_shapes_column_width=80)
    total = sum(e.self_cpu_time_total for e in events)
    categories: dict[str, float] = {}
    for e in by_shape:
        cat = _category(e.key, e.input_shapes or [], vocab)
        categories[cat] = categories.get(cat, 0.0) + e.self_cpu_time_total
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    summary = {
        "step_seconds_under_profiler": round(stats.seconds, 3),
        "self_cpu_ms_total": round(total / 1e3, 1),
        "self_cpu_share_by_kind": {k: round(v / total, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "optimizer_step_share": round(optimizer / total, 4),
        "top_ops": [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
                     "share": round(e.self_cpu_time_total / total, 4)} for e in top],
    }
    return table + "\n\n# the same, grouped by input shapes\n" + table_shapes, summary


def step_phases(variant: Variant, batch: Batch, shape: Shape, repeats: int = 2) -> dict[str, Any]:
    """Seconds (median of `repeats`) of each phase of a step, and the matmul GFLOP/s of forward and backward."""
    names = ("mask", "forward (teacher + student + losses)", "backward", "clip", "optimizer step + zero_grad")
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeats):
        marks = [time.perf_counter()]
        inputs = variant.mask(batch)
        marks.append(time.perf_counter())
        result = variant.loss(inputs)
        marks.append(time.perf_counter())
        result["loss"].backward()
        marks.append(time.perf_counter())
        if variant.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(variant.student.parameters(), variant.cfg.grad_clip)
        marks.append(time.perf_counter())
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for k, a, b in zip(names, marks, marks[1:]):
            times[k].append(b - a)
    n_proj = variant.projected(inputs, result)
    lengths = [batch.input_ids.shape[1]] * len(batch.lengths)  # executed work: padded lengths
    enc = encoder_layer_flops(lengths, shape.d, shape.f)
    fwd = shape.teacher_layers * enc + shape.student_layers * enc + 2 * head_flops(n_proj, shape.d, shape.vocab)
    bwd = 2 * (shape.student_layers * enc + head_flops(n_proj, shape.d, shape.vocab))
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    return {
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "share": {k: round(v / total, 4) for k, v in med.items()},
        "forward_gflops_per_s": round(fwd / med[names[1]] / 1e9, 2),
        "backward_gflops_per_s": round(bwd / med[names[2]] / 1e9, 2),
        "repeats": repeats,
    }


# =========================================================================== micro-measurements of candidate changes


def optimizer_ms(student, cfg: DistillConfig, impls=("default", "foreach", "fused"), repeats: int = 5) -> dict[str, float]:
    """Milliseconds per AdamW step on the student's parameters (random gradients), per implementation."""
    out = {}
    for impl in impls:
        model = copy.deepcopy(student)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        kwargs = {"fused": True} if impl == "fused" else {"foreach": True} if impl == "foreach" else {"foreach": False}
        opt = torch.optim.AdamW(distill.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                eps=cfg.eps, **kwargs)
        opt.step()  # state allocation
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        out[impl] = round(statistics.median(times) * 1e3, 2)
    return out


def teacher_forward_ms(teacher, batch: Batch, positions: torch.Tensor, repeats: int = 2) -> dict[str, float]:
    """Milliseconds per teacher forward (hidden + logits at `positions`) under no_grad vs inference_mode."""
    fwd = losses.MLMForward(teacher)
    out = {}
    for name, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            with ctx():
                fwd(batch.input_ids, batch.attention_mask, positions)
            times.append(time.perf_counter() - t)
        out[name] = round(statistics.median(times[1:]) * 1e3, 1)
    return out


def attention_dropout_step_s(variant: "DistilkitStep", batches: list[Batch]) -> dict[str, Any]:
    """Seconds per step of `variant` with the student's attention dropout as configured vs switched off.

    With attention dropout, SDPA on CPU takes its math path (explicit score matrices, softmax, dropout
    masks); without, the fused flash kernel the (eval-mode) teacher already uses. Steps alternate.
    """
    p0 = variant.student.distilbert.transformer.layer[0].attention.dropout.p
    times: dict[str, list[float]] = {f"p={p0}": [], "p=0": []}
    try:
        for i, batch in enumerate(batches):
            models.set_attention_dropout(variant.student, p0 if i % 2 == 0 else 0.0)
            times[f"p={p0}" if i % 2 == 0 else "p=0"].append(variant.step(batch).seconds)
    finally:
        models.set_attention_dropout(variant.student, p0)
    return {k: round(statistics.median(v), 3) for k, v in times.items() if v}


def loss_terms_ms(student, teacher, inputs: dict[str, torch.Tensor], cfg: DistillConfig, compiled: bool = False,
                  repeats: int = 3) -> dict[str, float]:
    """Milliseconds for KL + masked-LM CE (forward + backward) on real logits at the masked positions,
    eager and (when `compiled`) through torch.compile, plus the one-off compile time."""
    positions = (inputs["labels"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    with torch.no_grad():
        _, s_logits = losses.MLMForward(student)(inputs["input_ids"], inputs["attention_mask"], positions)
        _, t_logits = losses.MLMForward(teacher)(inputs["input_ids"], inputs["attention_mask"], positions)
    labels = inputs["labels"].reshape(-1).index_select(0, positions)

    def terms(s, t, y):
        return cfg.alpha_ce * losses.kl_distill(s, t, cfg.temperature) + cfg.alpha_mlm * losses.masked_lm_loss(s, y)

    def run(fn):
        s = s_logits.clone().requires_grad_(True)
        fn(s, t_logits, labels).backward()

    out = {"positions": int(positions.numel())}
    fns = {"eager": terms}
    if compiled:
        fns["compiled"] = torch.compile(terms, dynamic=True)
        t = time.perf_counter()
        run(fns["compiled"])
        out["compile_seconds"] = round(time.perf_counter() - t, 1)
    for name, fn in fns.items():
        run(fn)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(fn)
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = round(statistics.median(times) * 1e3, 1)
    return out


# =========================================================================== environment


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def corpus_sha256(blocks: BlockCorpus) -> str:
    """sha256 of the split's shard files, concatenated in order (the exact token blocks read)."""
    h = hashlib.sha256()
    for name in blocks._shard_files:
        with open(blocks.path / name, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "rounds": [round(v, digits) for v in values]}


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =========================================================================== variants and comparisons

#: name -> (step class, kl_positions, precision, fused); the data follow the class (reference/naive: lines).
VARIANTS: dict[str, tuple[type, str, str, bool]] = {
    "reference": (ReferenceStep, "all", "fp32", False),
    "reference_masked": (ReferenceStep, "masked", "fp32", False),
    "naive": (NaiveStep, "all", "fp32", False),
    "distilkit": (DistilkitStep, "masked", "fp32", True),
    "distilkit_kl_all": (DistilkitStep, "all", "fp32", True),
    "distilkit_bf16": (DistilkitStep, "masked", "bf16", True),
    "distilkit_kl_all_bf16": (DistilkitStep, "all", "bf16", True),
    "distilkit_unfused": (DistilkitStep, "masked", "fp32", False),
    "distilkit_kl_all_unfused": (DistilkitStep, "all", "fp32", False),
}
DEFAULT_VARIANTS = "reference,reference_masked,distilkit,distilkit_kl_all,distilkit_bf16"
OBJECTIVE = {"masked": "KL at the masked positions + masked-LM CE + cosine (non-padding)",
             "all": "KL at every non-padding position + masked-LM CE + cosine (non-padding)"}
#: (speedup key, numerator variant, denominator variant, what it compares)
COMPARISONS = (
    ("distilkit_vs_reference", "distilkit", "reference_masked",
     "headline: same objective (KL at masked positions), both fp32: distilkit's step vs the paper's step with "
     "--restrict_ce_to_mask"),
    ("distilkit_kl_all_vs_reference", "distilkit_kl_all", "reference",
     "same objective (KL at every position, the paper code's default), both fp32"),
    ("distilkit_default_bf16_vs_reference", "distilkit_bf16", "reference",
     "what each user runs by default on this CPU: distilkit (mixed_precision auto = bf16, KL at masked positions) "
     "vs the paper's code (fp32, KL at every position)"),
    ("distilkit_bf16_vs_reference_same_objective", "distilkit_bf16", "reference_masked",
     "KL at masked positions; distilkit bf16 vs the paper's step fp32"),
    ("distilkit_kl_all_bf16_vs_reference", "distilkit_kl_all_bf16", "reference",
     "KL at every position; distilkit bf16 vs the paper's step fp32"),
    ("bf16_vs_fp32", "distilkit_bf16", "distilkit", "distilkit's step under bf16 autocast vs fp32"),
    ("bf16_vs_fp32_kl_all", "distilkit_kl_all_bf16", "distilkit_kl_all", "the same with KL at every position"),
    ("fused_vs_unfused", "distilkit", "distilkit_unfused", "fused chunked KL + CE vs full logits at the masked rows"),
    ("fused_vs_unfused_kl_all", "distilkit_kl_all", "distilkit_kl_all_unfused",
     "fused chunked KL + CE vs full logits at every position"),
    ("distilkit_vs_naive", "distilkit", "naive", "distilkit vs shuffled padded lines (no length grouping)"),
)
SPEEDUP_MIN, MFU_MIN, BF16_MIN = 2.5, 0.70, 1.6


def _ratio(num: dict[str, Any], den: dict[str, Any]) -> dict[str, Any]:
    return {"ratio_of_medians": round(num["tokens_per_s"]["median"] / den["tokens_per_s"]["median"], 3),
            "per_round": [round(a / b, 3) for a, b in zip(num["tokens_per_s"]["rounds"], den["tokens_per_s"]["rounds"])]}


def speedups(results: dict[str, Any]) -> dict[str, Any]:
    """Every comparison of COMPARISONS whose two variants ran, with the objective and precision of each side."""
    out = {}
    for key, num, den, what in COMPARISONS:
        if num in results and den in results:
            out[key] = {**_ratio(results[num], results[den]), "numerator": num, "denominator": den, "compares": what,
                        "objective": {v: OBJECTIVE[results[v]["kl_positions"]] for v in (num, den)},
                        "precision": {v: results[v]["precision"] for v in (num, den)},
                        "mfu_vs_best_peak_of_its_precision": {v: results[v]["mfu_vs_best_peak"] for v in (num, den)}}
    return out


def targets(results: dict[str, Any], speed: dict[str, Any], bf16_cpu: bool) -> dict[str, Any]:
    """The issue's targets, each with its value, threshold and whether it is met (None: not measured)."""
    def met(value, threshold):
        return None if value is None else value >= threshold

    headline = speed.get("distilkit_vs_reference", {}).get("ratio_of_medians")
    mfu = results.get("distilkit", {}).get("mfu_vs_best_peak")
    bf16 = speed.get("bf16_vs_fp32", {}).get("ratio_of_medians") if bf16_cpu else None
    return {
        "speedup_min": SPEEDUP_MIN, "speedup": headline, "speedup_met": met(headline, SPEEDUP_MIN),
        "speedup_definition": "distilkit (fp32, KL at masked positions) tokens/s over reference_masked (the paper's step, "
                              "fp32, --restrict_ce_to_mask), ratio of the medians over rounds",
        "speedup_default_bf16_vs_reference": speed.get("distilkit_default_bf16_vs_reference", {}).get("ratio_of_medians"),
        "mfu_min": MFU_MIN, "mfu_vs_best_peak": mfu, "mfu_met": met(mfu, MFU_MIN),
        "mfu_definition": "distilkit fp32 step: median over rounds of model FLOPs/s over the best fp32 matmul peak of the run",
        "mfu_vs_matched_peak": results.get("distilkit", {}).get("mfu"),
        "bf16_speedup_min": BF16_MIN, "bf16_speedup": bf16, "bf16_speedup_met": met(bf16, BF16_MIN),
        "bf16_mfu_vs_bf16_peak": results.get("distilkit_bf16", {}).get("mfu_vs_best_peak") if bf16_cpu else None,
        "bf16_note": None if bf16_cpu else "this CPU has no avx512_bf16 / amx_bf16: bf16 target not applicable",
    }


# =========================================================================== the allocator side by side


def allocator_side_by_side(args: argparse.Namespace, corpus_dir: Path, text: Path, quiet: bool) -> dict[str, Any]:
    """Rounds of two fresh processes timing the distilkit step, DISTILKIT_MALLOC_TUNING=1 and =0 (order
    alternating): the glibc setting is process-wide, so each side is its own process on the same workload."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    applied: dict[str, list[bool]] = {"on": [], "off": []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="distilkit-alloc-") as tmp:
        for r in range(args.allocator_rounds):
            for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                out = Path(tmp) / f"{setting}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--text", str(text), "--corpus", str(corpus_dir),
                       "--teacher", args.teacher, "--layers", args.layers, "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--variants", args.allocator_variant, "--rounds", "1",
                       "--steps", str(args.allocator_steps), "--no-profile", "--no-micro", "--allocator-rounds", "0",
                       "--peak-size", "1024", "--peak-repeats", "2", "--block-peak-size", "512",
                       "--seed", str(args.seed), "--out", str(out), "--quiet"]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                env = {**os.environ, hardware.ALLOCATOR_ENV: "1" if setting == "on" else "0"}
                subprocess.run(cmd, env=env, check=True)
                res = json.loads(out.read_text())
                rates[setting].append(res["results"][args.allocator_variant]["tokens_per_s"]["median"])
                applied[setting].append(bool(res["machine"]["allocator"]["malloc_tuning"]))
                _progress(f"allocator round {r + 1}/{args.allocator_rounds} tuning {setting}: {rates[setting][-1]:.0f} tok/s", quiet)
            loads.append(load_average())
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {
        "variant": args.allocator_variant, "steps_per_process": args.allocator_steps, "rounds": args.allocator_rounds,
        "tokens_per_s": {k: _spread(v) for k, v in rates.items()},
        "tuning_applied": applied,
        "ratio_on_vs_off": {"ratio_of_medians": round(on / off, 3),
                            "per_round": [round(a / b, 3) for a, b in zip(rates["on"], rates["off"])]},
        "load_after_each_round": loads,
        "protocol": f"each round: two fresh processes ({hardware.ALLOCATOR_ENV}=1 and =0, order alternating), "
                    "each one warm-up step then the timed steps of the variant on the same corpus and seed",
    }


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="shared data folder (default ../shared/data)")
    p.add_argument("--text", help="text for the reference lines and the prepared corpus (default DATA/wikitext/wikitext-2-raw/wiki.train.raw.gz)")
    p.add_argument("--corpus", help="an already prepared corpus folder (default: prepare one from --text in a temp folder)")
    p.add_argument("--teacher", default="minilm", help="teacher alias or folder (default minilm)")
    p.add_argument("--layers", default="0,2,4", help="teacher layers copied into the student (default 0,2,4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="block size / reference split length")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--optimizer", choices=("default", "foreach", "fused"), default="fused",
                   help="AdamW implementation of the distilkit steps (reference: PyTorch's default)")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--block-peak-size", type=int, default=3072,
                   help="matrix size of the short peak measurements before and after every timed block")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                   help="profile one step of the first two variants (tables next to --out)")
    p.add_argument("--micro", action=argparse.BooleanOptionalAction, default=False,
                   help="time candidate changes: AdamW implementations, teacher under inference_mode")
    p.add_argument("--attention-dropout", type=float, default=None, metavar="P",
                   help="also time distilkit's step with the student's attention dropout set to P "
                        "(distill.attention_dropout; variant distilkit_attention_dropout)")
    p.add_argument("--compile", action="store_true",
                   help="also time distilkit's step with both encoders through torch.compile (variant distilkit_compiled)")
    p.add_argument("--micro-compile", action="store_true",
                   help="with --micro: also time the KL + CE terms through torch.compile (compiles for ~1 minute)")
    p.add_argument("--allocator-rounds", type=int, default=0,
                   help="also measure the allocator tuning side by side: N rounds of two fresh processes (on / off)")
    p.add_argument("--allocator-steps", type=int, default=3, help="timed steps per allocator process")
    p.add_argument("--allocator-variant", default="distilkit", choices=tuple(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    return args


def _data_dir(arg: str) -> Path:
    path = Path(arg)
    if not path.is_dir() and not path.is_absolute() and (REPO.parent / "shared" / "data").is_dir() and arg == "../shared/data":
        path = REPO.parent / "shared" / "data"  # run from another folder than the repository
    return path




def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    quiet = args.quiet
    hardware.tune_allocator()  # as the CLI does at start (off with DISTILKIT_MALLOC_TUNING=0); recorded below
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = load_average()
    text = Path(args.text) if args.text else _data_dir(args.data_dir) / WIKI_TRAIN
    if not text.is_file():
        raise SystemExit(f"{text}: no such text file (give --data-dir or --text)")
    layers = [int(x) for x in args.layers.split(",")]
    bf16_cpu = hardware.cpu_has_bf16()

    # --- models ---------------------------------------------------------------------------------
    set_seed(args.seed)  # the fresh MLM head of a head-less teacher is drawn from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher, had_head = models.load_teacher(args.teacher, warn_missing_head=False)
    teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, layers)
    tokenizer = models.load_tokenizer(args.teacher)
    shape = Shape.of(teacher, student)
    cfg = DistillConfig(batch_size=args.batch_size, seed=args.seed, smoothing=None)
    pad, cls_id, sep_id = tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id

    # --- data -----------------------------------------------------------------------------------
    tmp = None
    if args.corpus:
        corpus_dir = Path(args.corpus)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="distilkit-bench-")
        corpus_dir = Path(tmp.name) / "corpus"
        _progress(f"preparing a corpus from {text}", quiet)
        prepare_corpus(args.teacher, [str(text)], str(corpus_dir), block_size=args.max_length, progress=False)
    try:
        blocks = BlockCorpus(corpus_dir, "train")
        distill.check_corpus_tokenizer(blocks, tokenizer, student, corpus_dir)
        if blocks.block_size != args.max_length:
            raise SystemExit(f"{corpus_dir}: block size {blocks.block_size}, expected --max-length {args.max_length}")
        lines = list(load_text_lines(text))
        names = args.variant_list
        sequences = None
        if any(VARIANTS[n][0] is ReferenceStep for n in names):
            sequences = reference_sequences(tokenizer, lines, args.max_length)
        data = {
            "text": str(text), "text_sha256": sha256_file(text), "lines": len(lines),
            "reference_sequences": len(sequences) if sequences is not None else None,
            "reference_rules": f"[CLS] line [SEP], split at {args.max_length}, sequences of <= {REFERENCE_MIN_TOKENS} "
                               f"tokens dropped, length bins of {REFERENCE_BIN_WIDTH}",
            "corpus": str(args.corpus) if args.corpus else "prepared from --text in a temporary folder",
            "corpus_sha256": corpus_sha256(blocks), "corpus_sources": blocks.meta["sources"]["train"],
            "corpus_blocks": len(blocks), "corpus_tokens": blocks.num_tokens, "block_size": blocks.block_size,
        }

        # --- variants ---------------------------------------------------------------------------
        def batches_for(cls):
            if cls is ReferenceStep:
                return reference_batches(sequences, args.batch_size, pad, cls_id, sep_id, args.seed)
            if cls is NaiveStep:
                return naive_batches(tokenizer, lines, args.batch_size, args.max_length, args.seed)
            return block_batches(blocks, args.batch_size, pad, cls_id, sep_id, args.seed)

        variants: list[Variant] = []
        for name in names:
            cls, kl, precision, fused = VARIANTS[name]
            v = cls(student, teacher, tokenizer, replace(cfg, kl_positions=kl), batches_for(cls), args.seed,
                    args.optimizer if cls is DistilkitStep else "default", precision)
            v.name, v.fused = name, fused
            variants.append(v)
        if args.attention_dropout is not None:
            v = DistilkitStep(student, teacher, tokenizer, replace(cfg, attention_dropout=args.attention_dropout),
                              batches_for(DistilkitStep), args.seed, args.optimizer)
            v.name = "distilkit_attention_dropout"
            variants.append(v)
        if args.compile:  # both encoders through torch.compile (inductor); compiled during the warm-up steps
            compiled_teacher = copy.deepcopy(teacher)
            v = DistilkitStep(student, compiled_teacher, tokenizer, cfg, batches_for(DistilkitStep), args.seed, args.optimizer)
            v.name = "distilkit_compiled"
            v.student.distilbert.compile(dynamic=False)
            compiled_teacher.bert.compile(dynamic=False)
            variants.append(v)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        precisions = sorted({v.precision for v in variants})

        # --- peak, warm-up, rounds --------------------------------------------------------------
        _progress(f"matmul peaks ({args.peak_size}^2 {'/'.join(precisions)}, best of {args.peak_repeats})", quiet)
        peaks = [{**matmul_peak(args.peak_size, args.peak_repeats, dtypes[p]), "when": "start"} for p in precisions]
        for v in variants:
            for _ in range(args.warmup):
                v.step(next(v.batches))
        stats: dict[str, list[list[StepStats]]] = {v.name: [] for v in variants}
        block_peaks: dict[str, list[float]] = {v.name: [] for v in variants}  # matched peak of each timed block
        round_loads = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                batches = [next(v.batches) for _ in range(args.steps)]
                before = matmul_peak(args.block_peak_size, 2, dtypes[v.precision])
                stats[v.name].append([v.step(b) for b in batches])
                after = matmul_peak(args.block_peak_size, 2, dtypes[v.precision])
                peaks += [{**before, "when": f"round {r + 1} before {v.name}"},
                          {**after, "when": f"round {r + 1} after {v.name}"}]
                block_peaks[v.name].append(max(before["gflops"], after["gflops"]))
                s = stats[v.name][-1]
                _progress(f"round {r + 1}/{args.rounds} {v.name}: "
                          f"{sum(x.text_tokens for x in s) / sum(x.seconds for x in s):.0f} tok/s", quiet)
            round_loads.append(load_average())
        peaks += [{**matmul_peak(args.peak_size, args.peak_repeats, dtypes[p]), "when": "end"} for p in precisions]
        best_peak = {p: max(m["gflops"] for m in peaks if m["dtype"] == str(dtypes[p]).split(".")[-1]) for p in precisions}

        # --- per-variant results ----------------------------------------------------------------
        results: dict[str, Any] = {}
        for v in variants:
            rounds = stats[v.name]
            rate = [sum(s.text_tokens for s in rs) / sum(s.seconds for s in rs) for rs in rounds]
            useful = [sum(model_flops(shape, s, v.credit) for s in rs) / sum(s.seconds for s in rs) / 1e9 for rs in rounds]
            execd = [sum(executed_flops(shape, s) for s in rs) / sum(s.seconds for s in rs) / 1e9 for rs in rounds]
            flat = [s for rs in rounds for s in rs]
            tokens = sum(s.text_tokens for s in flat)
            results[v.name] = {
                "tokens_per_s": _spread(rate),
                "step_seconds": _spread([s.seconds for s in flat], 3),
                "step_seconds_per_round": [[round(s.seconds, 3) for s in rs] for rs in rounds],
                "precision": v.precision,
                "kl_positions": v.cfg.kl_positions,
                "objective": OBJECTIVE[v.cfg.kl_positions],
                "fused_vocab_loss": bool(getattr(v, "fused", False)) if isinstance(v, DistilkitStep) else None,
                "text_tokens_per_step": round(tokens / len(flat), 1),
                "positions_per_step": round(sum(sum(s.lengths) for s in flat) / len(flat), 1),
                "padded_positions_per_step": round(sum(s.padded_length * len(s.lengths) for s in flat) / len(flat), 1),
                "padding_share": round(1 - sum(sum(s.lengths) for s in flat) / sum(s.padded_length * len(s.lengths) for s in flat), 4),
                "masked_per_step": round(sum(s.n_masked for s in flat) / len(flat), 1),
                "projected_per_step": round(sum(s.n_projected for s in flat) / len(flat), 1),
                "flops_credit": v.credit,
                "model_flops_per_text_token": round(sum(model_flops(shape, s, v.credit) for s in flat) / tokens),
                "executed_flops_per_text_token": round(sum(executed_flops(shape, s) for s in flat) / tokens),
                "model_gflops_per_s": _spread(useful, 2),
                "executed_gflops_per_s": _spread(execd, 2),
                "mfu": round(statistics.median(u / p for u, p in zip(useful, block_peaks[v.name])), 4),
                "mfu_rounds": [round(u / p, 4) for u, p in zip(useful, block_peaks[v.name])],
                "matched_peak_gflops_rounds": [round(p, 1) for p in block_peaks[v.name]],
                "mfu_vs_best_peak": round(statistics.median(useful) / best_peak[v.precision], 4),
                "best_peak_gflops": round(best_peak[v.precision], 1),
                "executed_flops_utilisation": round(statistics.median(e / p for e, p in zip(execd, block_peaks[v.name])), 4),
                "optimizer": v.optimizer_impl,
                "last_loss": round(flat[-1].loss, 4),
            }
        speed = speedups(results)
        out: dict[str, Any] = {
            "benchmark": "distill_throughput",
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("distill_throughput.py") else None,
            "targets": targets(results, speed, bf16_cpu),
            "speedup": speed,
            "results": results,
            "peak": {"gflops": {p: round(g, 2) for p, g in best_peak.items()},
                     "definition": "best torch.matmul rate of square matrices per precision, same threads; "
                     f"{args.peak_size}^2 at start and end, {args.block_peak_size}^2 around every timed block",
                     "measurements": [{**m, "gflops": round(m["gflops"], 2)} for m in peaks]},
            "flops_formula": FLOPS_FORMULA,
            "model_shape": shape.__dict__,
            "protocol": {
                "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                "batch_size": args.batch_size, "max_length": args.max_length, "variants": [v.name for v in variants],
                "order": "variants alternate, order reversed every round; matmul peak measured around every block",
                "timed": "masking + forward + backward + grad clipping + AdamW step + zero_grad (data prepared before)",
                "tokens": "text tokens: non-padding, excluding [CLS]/[SEP]",
                "masking": "distilkit.masking.mask_tokens, 15% (80/10/10), no frequency smoothing, for every variant",
            },
            "machine": {
                **hardware.machine_record(), "interop_threads": torch.get_num_interop_threads(),
                "load_before": load_before, "load_after_each_round": round_loads,
                "load_note": "os.getloadavg() (1, 5, 15 min); the machine is shared", "python": platform.python_version(),
            },
            "teacher": {"name": args.teacher, "resolved": models.resolve_model(args.teacher), "had_mlm_head": had_head,
                        "fingerprint": model_fingerprint(teacher)},
            "student": {"layers": layers, "initial_fingerprint": model_fingerprint(student),
                        "params": models.count_parameters(student)},
            "data": data,
            "config": to_dict(cfg),
            "seed": args.seed,
        }
        out = {**provenance(), **out}  # its machine record is extended above: ours wins

        # --- where the time goes, candidate changes -------------------------------------------
        out_path = Path(args.out)
        if args.profile:
            _progress("profiling one step of the first two variants; phase timings", quiet)
            profiles = {}
            for v in variants[:2]:
                table, summary = profile_step(v, next(v.batches), shape.vocab)
                name = out_path.with_name(f"distill_profile_{v.name}.txt")
                atomic_write_text(name, f"# torch.profiler, one {v.name} step, top ops by self CPU time\n"
                                        f"# command: {out['command']}\n{table}\n")
                profiles[v.name] = {"table": name.name, **summary,
                                    "phases": step_phases(v, next(v.batches), shape, repeats=1)}
            out["profile"] = profiles
        dk = next((v for v in variants if isinstance(v, DistilkitStep)), None)
        if args.micro and dk is not None:
            _progress("micro-measurements", quiet)
            b = next(dk.batches)
            masked = dk.mask(b)
            positions = ((masked["labels"].reshape(-1) != IGNORE_INDEX)).nonzero().squeeze(1)
            out["micro"] = {
                "adamw_step_ms": optimizer_ms(student, cfg),
                "adamw_note": "default = foreach=False, the single-tensor loop torch.optim.AdamW picks on CPU; "
                              "distill.train and finetune use fused",
                "teacher_forward_ms": teacher_forward_ms(teacher, b, positions),
                "loss_terms": loss_terms_ms(dk.student, teacher, masked, cfg, compiled=args.micro_compile),
                "student_attention_dropout_step_s": attention_dropout_step_s(dk, [next(dk.batches) for _ in range(4)]),
            }
        if args.allocator_rounds > 0:
            _progress(f"allocator side by side, {args.allocator_rounds} rounds", quiet)
            out["allocator"] = allocator_side_by_side(args, corpus_dir, text, quiet)
        out["seconds"] = round(time.time() - started, 1)
        out["load_after"] = load_average()
        atomic_write_json(out_path, out)
        _progress(f"wrote {out_path}", quiet)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


def summary(r: dict[str, Any]) -> str:
    t, res = r["targets"], r["results"]
    parts = [f"{name} {v['tokens_per_s']['median']:.0f} tok/s ({v['precision']}, KL {v['kl_positions']}, "
             f"MFU {v['mfu_vs_best_peak']:.1%} of the best {v['precision']} peak)" for name, v in res.items()]
    for key, label in (("speedup", f"distilkit vs reference, same objective, fp32 (target {SPEEDUP_MIN})"),
                       ("speedup_default_bf16_vs_reference", "distilkit default (bf16) vs reference (fp32)"),
                       ("mfu_vs_best_peak", f"distilkit fp32 MFU (target {MFU_MIN})"),
                       ("bf16_speedup", f"bf16 vs fp32 (target {BF16_MIN})")):
        if t.get(key) is not None:
            parts.append(f"{label}: {t[key]}")
    if "allocator" in r:
        parts.append(f"allocator tuning on/off: {r['allocator']['ratio_on_vs_off']['ratio_of_medians']}")
    return "\n".join(parts)


if __name__ == "__main__":
    print(summary(main()))
