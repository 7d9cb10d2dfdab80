#!/usr/bin/env python
"""Distillation throughput: a naive distillation step vs distilkit's step, and model-FLOPs utilisation (MFU).

    python benchmarks/distill_throughput.py --data-dir ../shared/data --rounds 5 --steps 5 \
        --out benchmarks/results/distill_throughput.json

Both steps train the same 3-layer student (`student_from_teacher(teacher, [0, 2, 4])`, each step its own
copy and optimizer) against the same frozen teacher (MiniLM by default: 6 layers, hidden 384; it has no
MLM head, so `load_teacher` attaches a fresh one, which is fine for timing) at batch 32, with the
released DistilBERT's loss weights (`DistillConfig()`), dynamic 15% masking, gradient clipping and AdamW.

* naive: what common implementations do. One WikiText-2 train line per sequence (non-empty lines,
  shuffled), padded to the longest in the batch (truncated at 128); `model(...).logits`, i.e. the
  vocabulary projection at every position of teacher and student; KL over every non-padding position,
  masked-LM cross-entropy, cosine of the last hidden states; PyTorch's default AdamW.
* distilkit: packed 128-token blocks of a prepared corpus (`corpus.prepare_corpus` on the same file,
  or `--corpus DIR`), read in `distill.epoch_order`; the loss is `losses.compute_losses` (vocabulary
  projection only at the masked positions, `kl_positions="masked"`, the default), AdamW over
  `distill.param_groups`, `--optimizer` implementation (default fused), `zero_grad(set_to_none=True)`.
* distilkit_kl_all (`--kl-all`, on by default): distilkit's step with `kl_positions="all"`, i.e. the
  same objective as the naive step (KL at every position); separates packing from partial projection.
* distilkit_attention_dropout (`--attention-dropout P`): distilkit's step with `attention_dropout=P`
  (0 lets the student's attention use the fused CPU kernel; a recipe change, opt-in in `distill`).
* distilkit_compiled (`--compile`): distilkit's step with the student's and the teacher's encoders through
  `torch.compile` (inductor, static shapes), compiled during the warm-up step.

Data preparation (tokenising lines, reading blocks) is done before a run is timed; masking, forward,
backward, clipping and the optimizer step are timed. Rounds alternate the order of the steps (swapped
every round), each round running `--steps` steps of every variant after one untimed warm-up step.

Tokens per second count real text tokens: non-padding tokens other than [CLS]/[SEP] (naive), block
tokens other than [CLS]/[SEP] (distilkit). MFU = model FLOPs per second / measured fp32 matmul peak
measured with the same thread count as the best of two `torch.matmul`s of `--block-peak-size` square fp32
matrices right before and right after every timed block (the higher of the two): on a shared machine the
steps and their peak then see the same contention. The overall best peak (also `--peak-size` matrices at
start and end) and the MFU against it are reported as well. Model FLOPs count
matmuls only (2*m*n*k each), see FLOPS_FORMULA; the naive step is credited with the same useful work
as distilkit's (real lengths, projection at the masked positions), its executed FLOPs (padding, full
projection) are reported beside.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import shlex
import statistics
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

from distilkit.bench import cpu_model
from distilkit import distill, losses, models
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
    "Naive 'model' FLOPs use the same formula and the same n as distilkit (masked positions); naive "
    "'executed' FLOPs use l_i = padded length and n = batch * padded length."
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


def matmul_peak(size: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """Best fp32 `torch.matmul` rate of two random size x size matrices, in GFLOP/s (current thread count)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return {"gflops": 2 * size**3 / min(times) / 1e9, "size": size, "repeats": repeats,
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


def block_batches(blocks: BlockCorpus, batch_size: int, pad_id: int, cls_id: int, sep_id: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of packed blocks in distill.train's order (epoch permutation, consecutive slices)."""
    epoch = 0
    while True:
        order = distill.epoch_order(len(blocks), seed, epoch)
        for micro in range(len(blocks) // batch_size):
            ids = blocks.batch(distill.rank_slice(order, micro, batch_size, 1, 0))
            yield make_batch(ids, (ids != pad_id).long(), cls_id, sep_id)
        epoch += 1


# =========================================================================== the naive loss


def naive_losses(student, teacher, batch: dict[str, torch.Tensor], cfg: Any) -> dict[str, Any]:
    """The triple loss as common implementations compute it: full logits at every position.

    KL(teacher || student) at temperature T over every non-padding position (batch mean, times T^2),
    cross-entropy at the masked positions, 1 - cosine of the last hidden states over non-padding positions.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits  # (batch, seq, vocab)
    valid = attention_mask.bool()
    T = cfg.temperature
    loss_ce = F.kl_div(F.log_softmax(s_logits[valid] / T, dim=-1), F.softmax(t_logits[valid] / T, dim=-1),
                       reduction="batchmean") * T**2
    loss_mlm = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), labels.view(-1), ignore_index=IGNORE_INDEX)
    s_h, t_h = s_out.hidden_states[-1][valid], t_out.hidden_states[-1][valid]
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

    def __init__(self, student, teacher, tokenizer, cfg: DistillConfig, batches: Iterator[Batch], seed: int,
                 optimizer: str = "default"):
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

    def loss(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def projected(self, inputs: dict[str, torch.Tensor], result: dict[str, Any]) -> int:
        raise NotImplementedError

    def step(self, batch: Batch) -> StepStats:
        """Mask, forward, backward, clip, optimizer step: one timed training step."""
        t = time.perf_counter()
        inputs = self.mask(batch)
        result = self.loss(inputs)
        result["loss"].backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        return StepStats(batch.text_tokens, batch.lengths, batch.input_ids.shape[1], result["n_masked"],
                         self.projected(inputs, result), float(result["loss"].detach()), seconds)


class NaiveStep(Variant):
    name = "naive"
    credit = "masked"  # useful work counted as distilkit's (the extra projections are overhead)

    def loss(self, inputs):
        return naive_losses(self.student, self.teacher, inputs, self.cfg)

    def projected(self, inputs, result):
        return inputs["input_ids"].numel()  # every position, padding included


class DistilkitStep(Variant):
    name = "distilkit"

    @property
    def credit(self) -> str:
        return self.cfg.kl_positions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.student_fwd = losses.MLMForward(self.student)  # as distill.train wraps them
        self.teacher_fwd = losses.MLMForward(self.teacher)

    def loss(self, inputs):
        return losses.compute_losses(self.student_fwd, self.teacher_fwd, inputs, distill.loss_config(self.cfg))

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


def tune_malloc() -> bool:
    """glibc only: serve every allocation from the heap and keep freed memory for reuse (mallopt
    M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB), so that large temporaries (e.g. logits of 600 x 30522 floats)
    stop costing an mmap, page faults on first touch and an munmap each. Process-wide; True if applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False



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


# =========================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="shared data folder (default ../shared/data)")
    p.add_argument("--text", help="text for the naive lines and the prepared corpus (default DATA/wikitext/wikitext-2-raw/wiki.train.raw.gz)")
    p.add_argument("--corpus", help="an already prepared corpus folder (default: prepare one from --text in a temp folder)")
    p.add_argument("--teacher", default="minilm", help="teacher alias or folder (default minilm)")
    p.add_argument("--layers", default="0,2,4", help="teacher layers copied into the student (default 0,2,4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="block size / naive truncation length")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--optimizer", choices=("default", "foreach", "fused"), default="fused",
                   help="AdamW implementation of the distilkit steps (naive: PyTorch's default)")
    p.add_argument("--kl-all", action=argparse.BooleanOptionalAction, default=True,
                   help="also time distilkit with kl_positions=all (the naive step's objective)")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--block-peak-size", type=int, default=3072,
                   help="matrix size of the short peak measurements before and after every timed block")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one distilkit and one naive step (tables next to --out)")
    p.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True,
                   help="time candidate changes: AdamW implementations, teacher under inference_mode")
    p.add_argument("--attention-dropout", type=float, default=None, metavar="P",
                   help="also time distilkit's step with the student's attention dropout set to P "
                        "(distill.attention_dropout; variant distilkit_attention_dropout)")
    p.add_argument("--compile", action="store_true",
                   help="also time distilkit's step with both encoders through torch.compile (variant distilkit_compiled)")
    p.add_argument("--micro-compile", action="store_true",
                   help="with --micro: also time the KL + CE terms through torch.compile (compiles for ~1 minute)")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="glibc mallopt: no mmap for large allocations, no trimming (whole process, both steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _data_dir(arg: str) -> Path:
    path = Path(arg)
    if not path.is_dir() and not path.is_absolute() and (REPO.parent / "shared" / "data").is_dir() and arg == "../shared/data":
        path = REPO.parent / "shared" / "data"  # run from another folder than the repository
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    quiet = args.quiet
    malloc_tuned = tune_malloc() if args.malloc_tuning else False
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = load_average()
    text = Path(args.text) if args.text else _data_dir(args.data_dir) / WIKI_TRAIN
    if not text.is_file():
        raise SystemExit(f"{text}: no such text file (give --data-dir or --text)")
    layers = [int(x) for x in args.layers.split(",")]

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
        data = {
            "text": str(text), "text_sha256": sha256_file(text), "naive_lines": len(lines),
            "corpus": str(args.corpus) if args.corpus else "prepared from --text in a temporary folder",
            "corpus_sha256": corpus_sha256(blocks), "corpus_sources": blocks.meta["sources"]["train"],
            "corpus_blocks": len(blocks), "corpus_tokens": blocks.num_tokens, "block_size": blocks.block_size,
        }

        # --- variants ---------------------------------------------------------------------------
        def blocks_iter():
            return block_batches(blocks, args.batch_size, pad, cls_id, sep_id, args.seed)

        variants: list[Variant] = [
            NaiveStep(student, teacher, tokenizer, cfg,
                      naive_batches(tokenizer, lines, args.batch_size, args.max_length, args.seed), args.seed, "default"),
            DistilkitStep(student, teacher, tokenizer, cfg, blocks_iter(), args.seed, args.optimizer),
        ]
        if args.kl_all:
            v = DistilkitStep(student, teacher, tokenizer, replace(cfg, kl_positions="all"), blocks_iter(), args.seed,
                              args.optimizer)
            v.name = "distilkit_kl_all"
            variants.append(v)
        if args.attention_dropout is not None:
            v = DistilkitStep(student, teacher, tokenizer, replace(cfg, attention_dropout=args.attention_dropout),
                              blocks_iter(), args.seed, args.optimizer)
            v.name = "distilkit_attention_dropout"
            variants.append(v)
        if args.compile:  # both encoders through torch.compile (inductor); compiled during the warm-up steps
            compiled_teacher = copy.deepcopy(teacher)
            v = DistilkitStep(student, compiled_teacher, tokenizer, cfg, blocks_iter(), args.seed, args.optimizer)
            v.name = "distilkit_compiled"
            v.student.distilbert.compile(dynamic=False)
            compiled_teacher.bert.compile(dynamic=False)
            variants.append(v)

        # --- peak, warm-up, rounds --------------------------------------------------------------
        _progress(f"matmul peak ({args.peak_size}^2 fp32, best of {args.peak_repeats})", quiet)
        peaks = [{**matmul_peak(args.peak_size, args.peak_repeats), "when": "start"}]
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
                before = matmul_peak(args.block_peak_size, 2)
                stats[v.name].append([v.step(b) for b in batches])
                after = matmul_peak(args.block_peak_size, 2)
                peaks += [{**before, "when": f"round {r + 1} before {v.name}"},
                          {**after, "when": f"round {r + 1} after {v.name}"}]
                block_peaks[v.name].append(max(before["gflops"], after["gflops"]))
                s = stats[v.name][-1]
                _progress(f"round {r + 1}/{args.rounds} {v.name}: "
                          f"{sum(x.text_tokens for x in s) / sum(x.seconds for x in s):.0f} tok/s", quiet)
            round_loads.append(load_average())
        peaks.append({**matmul_peak(args.peak_size, args.peak_repeats), "when": "end"})
        peak = max(p["gflops"] for p in peaks)

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
                "text_tokens_per_step": round(tokens / len(flat), 1),
                "positions_per_step": round(sum(sum(s.lengths) for s in flat) / len(flat), 1),
                "padded_positions_per_step": round(sum(s.padded_length * len(s.lengths) for s in flat) / len(flat), 1),
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
                "mfu_vs_best_peak": round(statistics.median(useful) / peak, 4),
                "executed_flops_utilisation": round(statistics.median(e / p for e, p in zip(execd, block_peaks[v.name])), 4),
                "optimizer": v.optimizer_impl,
                "kl_positions": v.cfg.kl_positions if isinstance(v, DistilkitStep) else "all (non-padding)",
                "last_loss": round(flat[-1].loss, 4),
            }
            if isinstance(v, NaiveStep):  # what its MFU would be if its KL at every position were all useful
                all_credit = [sum(model_flops(shape, s, "all") for s in rs) / sum(s.seconds for s in rs) / 1e9 for rs in rounds]
                results[v.name]["mfu_if_all_positions_credited"] = round(
                    statistics.median(u / p for u, p in zip(all_credit, block_peaks[v.name])), 4)
        base = results["naive"]["tokens_per_s"]
        speedups = {}
        for name in results:
            if name == "naive":
                continue
            per_round = [a / b for a, b in zip(results[name]["tokens_per_s"]["rounds"], base["rounds"])]
            speedups[f"{name}_vs_naive"] = {
                "ratio_of_medians": round(results[name]["tokens_per_s"]["median"] / base["median"], 3),
                "per_round": [round(x, 3) for x in per_round],
            }
        mfu = results["distilkit"]["mfu"]
        out: dict[str, Any] = {
            "benchmark": "distill_throughput",
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("distill_throughput.py") else None,
            "targets": {
                "speedup_min": 2.0, "speedup": speedups["distilkit_vs_naive"]["ratio_of_medians"],
                "speedup_met": speedups["distilkit_vs_naive"]["ratio_of_medians"] >= 2.0,
                "mfu_min": 0.70, "mfu": mfu, "mfu_met": mfu >= 0.70,
                "mfu_definition": "median over rounds of (model FLOPs/s of the round's distilkit steps) / (matmul peak "
                                  "measured right before and after those steps, the higher of the two)",
                "mfu_vs_best_peak": results["distilkit"]["mfu_vs_best_peak"],
            },
            "speedup": speedups,
            "results": results,
            "peak": {"gflops": round(peak, 2), "definition": "best torch.matmul rate, fp32 square matrices, same threads; "
                     f"{args.peak_size}^2 at start and end, {args.block_peak_size}^2 around every timed block",
                     "measurements": [{**p, "gflops": round(p["gflops"], 2)} for p in peaks]},
            "flops_formula": FLOPS_FORMULA,
            "model_shape": shape.__dict__,
            "protocol": {
                "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                "batch_size": args.batch_size, "max_length": args.max_length,
                "order": "variants alternate, order reversed every round; matmul peak measured around every block",
                "timed": "masking + forward + backward + grad clipping + AdamW step + zero_grad (data prepared before)",
                "tokens": "text tokens: non-padding, excluding [CLS]/[SEP]",
            },
            "machine": {
                "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "load_before": load_before,
                "malloc_tuning": malloc_tuned, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "load_after_each_round": round_loads, "load_note": "os.getloadavg() (1, 5, 15 min); the machine is shared",
                "python": platform.python_version(),
            },
            "teacher": {"name": args.teacher, "resolved": models.resolve_model(args.teacher), "had_mlm_head": had_head,
                        "fingerprint": model_fingerprint(teacher)},
            "student": {"layers": layers, "initial_fingerprint": model_fingerprint(student),
                        "params": models.count_parameters(student)},
            "data": data,
            "config": to_dict(cfg),
            "seed": args.seed,
            **provenance(),
        }

        # --- where the time goes, candidate changes -------------------------------------------
        out_path = Path(args.out)
        if args.profile:
            _progress("profiling one step of each; phase timings", quiet)
            profiles = {}
            for v in variants[:2]:
                table, summary = profile_step(v, next(v.batches), shape.vocab)
                name = out_path.with_name(f"distill_profile_{v.name}.txt")
                atomic_write_text(name, f"# torch.profiler, one {v.name} step, top ops by self CPU time\n"
                                        f"# command: {out['command']}\n{table}\n")
                profiles[v.name] = {"table": name.name, **summary,
                                    "phases": step_phases(v, next(v.batches), shape, repeats=1 if v.name == "naive" else 2)}
            out["profile"] = profiles
        if args.micro:
            _progress("micro-measurements", quiet)
            b = next(variants[1].batches)
            masked = variants[1].mask(b)
            positions = ((masked["labels"].reshape(-1) != IGNORE_INDEX)).nonzero().squeeze(1)
            out["micro"] = {
                "adamw_step_ms": optimizer_ms(student, cfg),
                "adamw_note": "default = foreach=False, the single-tensor loop torch.optim.AdamW picks on CPU; "
                              "distill.train and finetune use fused",
                "teacher_forward_ms": teacher_forward_ms(teacher, b, positions),
                "loss_terms": loss_terms_ms(variants[1].student, teacher, masked, cfg, compiled=args.micro_compile),
                "student_attention_dropout_step_s": attention_dropout_step_s(
                    variants[1], [next(variants[1].batches) for _ in range(4)]),
            }
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


if __name__ == "__main__":
    r = main()
    t = r["targets"]
    print(f"naive {r['results']['naive']['tokens_per_s']['median']:.0f} tok/s, "
          f"distilkit {r['results']['distilkit']['tokens_per_s']['median']:.0f} tok/s, "
          f"speedup {t['speedup']:.2f}x (target 2.0: {'met' if t['speedup_met'] else 'NOT met'}), "
          f"MFU {t['mfu']:.1%} of the matched peak, {t['mfu_vs_best_peak']:.1%} of the best peak {r['peak']['gflops']:.0f} "
          f"GFLOP/s (target 70%: {'met' if t['mfu_met'] else 'NOT met'})")
