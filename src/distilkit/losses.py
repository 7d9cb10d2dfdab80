"""DistilBERT's triple loss (paper section 3): distillation KL + masked-LM cross-entropy + hidden-state cosine.

    loss = alpha_ce * T^2 * KL(softmax(t/T) || softmax(s/T))      (soft targets, summed over the vocabulary,
                                                                    averaged over positions)
         + alpha_mlm * CE(s, masked labels)                        (hard targets, masked positions only)
         + alpha_cos * (1 - cos(h_s, h_t))                         (last hidden layer, non-padding tokens)

The three term functions are pure functions of tensors. `compute_losses` runs the models and applies the
vocabulary projection only at the positions a term needs (by default the ~15% masked ones), which is
most of the speed of a training step for a 30k vocabulary. A term whose weight is 0 is not computed at
all (nor the projections it would need), so the paper's Table 4 ablations are just weights set to 0.

The vocabulary-sized part (projection + log-softmaxes + KL + CE) is fused by default (`fused_vocab_losses`):
rows are projected a chunk at a time (`chunk_rows`, sized so one chunk's logits stay in cache), the
teacher's logits of a chunk are computed right beside the student's, and the gradient w.r.t. the student's
transformed hidden rows and decoder weight/bias is accumulated chunk by chunk, so no (n, vocab) tensor is
ever kept for either model (which makes `kl_positions="all"` cheap in memory). `compute_losses(...,
fused=False)` keeps the plain path (full logits, the term functions below), equal to 1e-5 in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .config import DistillConfig

IGNORE_INDEX = -100
KL_POSITIONS = ("masked", "all")


# --------------------------------------------------------------------------- the three terms


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) for logits of shape (n, vocab): summed over vocab, mean over n."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # keeps the graph (and DDP) whole on a batch with nothing selected
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t**2


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (n, vocab) against labels (n,), ignoring IGNORE_INDEX; mean over the rest."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s, h_t) over rows of (n, dim) hidden states (CosineEmbeddingLoss with target 1)."""
    if student_hidden.shape[0] == 0:
        return student_hidden.sum() * 0.0
    target = student_hidden.new_ones(student_hidden.shape[0])
    return F.cosine_embedding_loss(student_hidden.float(), teacher_hidden.float(), target)


# --------------------------------------------------------------------------- fused vocabulary terms

#: Target size of one chunk's logits (rows x vocab fp32); ~1100 rows for BERT's 30522. Cache-sized chunks
#: (~30 rows) were 3x slower on a 2-core Zen 4 (CPU time, 600 rows): every chunk streams the 47 MB decoder
#: weight twice and its gradient once; 1024-row chunks are as fast as the unfused path at 600 rows and 25%
#: faster at 2048, while the largest temporaries stay at ~128 MiB whatever the number of rows.
CHUNK_BYTES = 128 << 20
MIN_CHUNK_ROWS = 16


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of the fused vocabulary loss for a vocabulary of `vocab` logits per row."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(1, vocab)))


def _vocab_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, w_kl, w_ce, chunk, dtype, need_grad):
    """One pass over chunks of rows: (KL sum, CE sum, n labelled) and, when `need_grad`, the gradient of
    w_kl * KL_mean * T^2 + w_ce * CE_mean w.r.t. h_s, w_s, b_s (fp32 accumulators). KL rows = all n rows."""
    n, t = h_s.shape[0], float(temperature)
    kl_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    labelled = labels != IGNORE_INDEX if w_ce is not None else None
    n_lab = int(labelled.sum()) if labelled is not None else 0
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    ws, bs = cast(w_s), (cast(b_s) if b_s is not None else None)
    wt, bt = (cast(w_t), cast(b_t) if b_t is not None else None) if w_kl is not None else (None, None)
    grads = None
    if need_grad:
        grads = (torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device), torch.zeros(w_s.shape, dtype=torch.float32,
                 device=w_s.device), torch.zeros(w_s.shape[0], dtype=torch.float32, device=w_s.device))

    def project(h, w, b):
        return (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).float()

    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        hs = cast(h_s[rows])
        s = project(hs, ws, bs)
        g = None
        if w_kl is not None:
            with torch.no_grad():
                tl = project(cast(h_t[rows]), wt, bt)
            log_q = F.log_softmax(s / t, dim=-1)
            log_p = F.log_softmax(tl / t, dim=-1)
            kl_sum += F.kl_div(log_q, log_p, reduction="sum", log_target=True)
            if need_grad:  # d(T^2 * KL / n)/ds = T * (softmax(s/T) - softmax(t/T)) / n
                g = log_q.exp_().sub_(log_p.exp_()).mul_(w_kl * t / n)
            del log_q, log_p, tl
        if w_ce is not None and n_lab:
            lab = labels[rows]
            keep = labelled[rows]
            log_s = F.log_softmax(s, dim=-1)
            ce_sum += F.nll_loss(log_s, lab, ignore_index=IGNORE_INDEX, reduction="sum")
            if need_grad:  # d(CE mean)/ds = (softmax(s) - onehot) / n_labelled, labelled rows only
                d = log_s.exp_()
                d[keep.logical_not()] = 0.0
                d[keep.nonzero().squeeze(1), lab[keep]] -= 1.0
                d.mul_(w_ce / n_lab)
                g = d if g is None else g.add_(d)
            del log_s
        if need_grad and g is not None:
            gc = cast(g)
            grads[0][rows] = gc @ ws
            if dtype is None:
                torch.addmm(grads[1], g.t(), hs, out=grads[1])  # in place; counted by FlopCounterMode
            else:
                grads[1].add_(gc.t() @ hs)
            grads[2].add_(g.sum(0))
        elif need_grad:
            grads[0][rows] = 0.0
        del s, g
    return kl_sum, ce_sum, n_lab, grads


class _FusedVocabLoss(torch.autograd.Function):
    """(KL term, CE term) from transformed hidden rows, chunk by chunk; see `fused_vocab_losses`.

    The forward pass also computes the gradient of alpha_kl * KL + alpha_ce * CE (the weights the loss is
    built with) chunk by chunk; backward rescales it when the incoming gradients are in that ratio (always
    the case for a weighted total, also scaled by accumulation or a grad scaler), and otherwise recomputes
    the chunks with the incoming weights. Either way no (n, vocab) tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, alpha_kl, alpha_ce, chunk, dtype):
        need_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(h_s.device.type, enabled=False):
            kl_sum, ce_sum, n_lab, grads = _vocab_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature,
                                                       alpha_kl, alpha_ce, chunk, dtype, need_grad)
        n, t = h_s.shape[0], float(temperature)
        kl = kl_sum * (t * t / n) if n else kl_sum
        ce = ce_sum / n_lab if n_lab else ce_sum
        ctx.alphas = (alpha_kl, alpha_ce)
        ctx.args = (temperature, chunk, dtype)
        ctx.grads = grads
        ctx.b_s_none = b_s is None
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels)
        return kl, ce

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        a_kl, a_ce = ctx.alphas
        g_kl, g_ce = float(grad_kl), float(grad_ce)
        present = [(g, a) for g, a in ((g_kl, a_kl), (g_ce, a_ce)) if a is not None]
        scale = present[0][0] / present[0][1] if present[0][1] else None
        grads = ctx.grads
        if grads is None or scale is None or any(abs(g - scale * a) > 1e-6 * max(abs(g), 1e-30) for g, a in present):
            h_s, w_s, b_s, h_t, w_t, b_t, labels = ctx.saved_tensors
            temperature, chunk, dtype = ctx.args
            with torch.no_grad(), torch.autocast(h_s.device.type, enabled=False):
                grads = _vocab_pass(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature,
                                    g_kl if a_kl is not None else None, g_ce if a_ce is not None else None,
                                    chunk, dtype, True)[3]
            scale = 1.0
        ctx.grads = None
        h_s, w_s, b_s = ctx.saved_tensors[:3]
        dh, dw, db = (x * scale if scale != 1.0 else x for x in grads)
        return (dh.to(h_s.dtype), dw.to(w_s.dtype), None if ctx.b_s_none else db.to(b_s.dtype),
                None, None, None, None, None, None, None, None, None)


def fused_vocab_losses(
    student_rows: torch.Tensor, student_decoder: nn.Linear, labels: torch.Tensor | None, temperature: float,
    teacher_rows: torch.Tensor | None = None, teacher_decoder: nn.Linear | None = None,
    alpha_kl: float = 1.0, alpha_ce: float = 1.0, chunk: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`kl_distill` and `masked_lm_loss` of the logits `decoder(rows)` without materialising those logits.

    student_rows / teacher_rows: (n, dim) hidden rows after the head transform (`models.mlm_transform`);
    decoders: the vocabulary projections (`models.mlm_decoder`). KL is over all n rows (T^2-scaled, mean over
    rows), CE over the rows whose label is not IGNORE_INDEX. A term whose alpha is 0 (or whose teacher /
    labels are None) is not computed and comes back None; the alphas only choose which terms exist and the
    ratio in which the forward pass pre-computes their gradient (see _FusedVocabLoss). Under autocast the two
    projections run in the autocast dtype, softmaxes and losses in fp32, as the unfused path does.
    """
    do_kl = alpha_kl > 0 and teacher_rows is not None
    do_ce = alpha_ce > 0 and labels is not None
    if not (do_kl or do_ce):
        return None, None
    dev = student_rows.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    w_s = student_decoder.weight
    if labels is None:
        labels = torch.full((student_rows.shape[0],), IGNORE_INDEX, dtype=torch.long, device=student_rows.device)
    kl, ce = _FusedVocabLoss.apply(
        student_rows, w_s, student_decoder.bias,
        teacher_rows.detach() if do_kl else None, teacher_decoder.weight.detach() if do_kl else None,
        teacher_decoder.bias.detach() if do_kl and teacher_decoder.bias is not None else None,
        labels, float(temperature), float(alpha_kl) if do_kl else None, float(alpha_ce) if do_ce else None,
        int(chunk or chunk_rows(w_s.shape[0])), dtype,
    )
    return (kl if do_kl else None), (ce if do_ce else None)


def _unwrap_mlm(module: nn.Module) -> nn.Module:
    """The (Distil)BertForMaskedLM inside an MLMForward, possibly wrapped by DDP / torch.compile."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(module)
    return inner.model if isinstance(inner, MLMForward) else inner


# --------------------------------------------------------------------------- models -> losses


@dataclass
class LossConfig:
    """Weights of the three terms (0 switches a term off), softmax temperature, and where KL is taken."""

    alpha_ce: float = DistillConfig.alpha_ce  # defaults stated once, in config.DistillConfig
    alpha_mlm: float = DistillConfig.alpha_mlm
    alpha_cos: float = DistillConfig.alpha_cos
    temperature: float = DistillConfig.temperature
    kl_positions: str = DistillConfig.kl_positions  # "masked" or "all" (every non-padding position)


class MLMForward(nn.Module):
    """Wraps a BertForMaskedLM / DistilBertForMaskedLM: last hidden states, plus MLM logits at chosen positions.

    `forward(input_ids, attention_mask, positions)` returns `(hidden (b, s, d), logits (n, vocab) or None)`,
    where `positions` are flat indices into the (b*s) tokens. Being one module, it can be wrapped in DDP.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
        logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logits=False`: the rows stop before the vocabulary projection (head transform only, (n, dim))."""
        hidden = models.encoder_hidden(self.model, input_ids, attention_mask)
        rows = None
        if positions is not None:
            flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            rows = models.mlm_logits(self.model, flat) if logits else models.mlm_transform(self.model, flat)
        return hidden, rows


def as_mlm_forward(model: nn.Module) -> nn.Module:
    """A plain (Distil)BertForMaskedLM gets wrapped in MLMForward; an MLMForward (or DDP of one) is kept."""
    if isinstance(model, models.PreTrainedModel):  # any family's LM (families.py)
        return MLMForward(model)
    return model


def compute_losses(
    student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], cfg: Any, *,
    fused: bool = True, chunk: int | None = None,
) -> dict[str, Any]:
    """Run student (and teacher, without gradients) on a masked batch and return the weighted triple loss.

    `batch`: input_ids (already masked), attention_mask, labels (IGNORE_INDEX where not selected for MLM).
    `cfg`: anything with alpha_ce, alpha_mlm, alpha_cos, temperature, kl_positions (LossConfig, DistillConfig).
    `fused`: KL + CE through `fused_vocab_losses` (chunks of `chunk` rows, default `chunk_rows(vocab)`);
    False: full logits at the selected rows and the term functions `kl_distill` / `masked_lm_loss`.
    Returns {"loss", "loss_ce", "loss_mlm", "loss_cos"} (a switched-off term is None), "n_masked", "n_tokens".
    """
    a_ce, a_mlm, a_cos = float(cfg.alpha_ce), float(cfg.alpha_mlm), float(cfg.alpha_cos)
    if getattr(cfg, "kl_positions", "masked") not in KL_POSITIONS:
        raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {cfg.kl_positions!r}")
    if (a_ce > 0 or a_cos > 0) and teacher is None:
        raise ValueError("alpha_ce or alpha_cos > 0 needs a teacher")
    student, teacher = as_mlm_forward(student), (as_mlm_forward(teacher) if teacher is not None else None)
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    valid = attention_mask.reshape(-1).bool()
    flat_labels = labels.reshape(-1)
    masked = (flat_labels != IGNORE_INDEX) & valid
    need_logits = a_ce > 0 or a_mlm > 0
    positions = None
    if need_logits:
        where = valid if (a_ce > 0 and cfg.kl_positions == "all") else masked
        positions = where.nonzero().squeeze(1)

    logits = not (fused and need_logits)  # fused: the models stop at the head transform
    s_hidden, s_rows = student(input_ids, attention_mask, positions, logits)
    t_hidden = t_rows = None
    if a_ce > 0 or a_cos > 0:
        with torch.no_grad():
            t_hidden, t_rows = teacher(input_ids, attention_mask, positions if a_ce > 0 else None, logits)
            t_hidden = t_hidden.detach()

    out: dict[str, Any] = {"loss_ce": None, "loss_mlm": None, "loss_cos": None}
    total = s_hidden.new_zeros((), dtype=torch.float32)
    sel_labels = flat_labels.index_select(0, positions) if need_logits else None
    if need_logits and not logits:
        out["loss_ce"], out["loss_mlm"] = fused_vocab_losses(
            s_rows, models.mlm_decoder(_unwrap_mlm(student)), sel_labels if a_mlm > 0 else None, cfg.temperature,
            t_rows, models.mlm_decoder(_unwrap_mlm(teacher)) if a_ce > 0 else None, a_ce, a_mlm, chunk)
    elif need_logits:
        if a_ce > 0:
            out["loss_ce"] = kl_distill(s_rows, t_rows, cfg.temperature)
        if a_mlm > 0:
            out["loss_mlm"] = masked_lm_loss(s_rows, sel_labels)
    if a_ce > 0:
        total = total + a_ce * out["loss_ce"]
    if a_mlm > 0:
        total = total + a_mlm * out["loss_mlm"]
    if a_cos > 0:
        dim = s_hidden.shape[-1]
        out["loss_cos"] = cosine_loss(s_hidden.reshape(-1, dim)[valid], t_hidden.reshape(-1, dim)[valid])
        total = total + a_cos * out["loss_cos"]
    out["loss"] = total
    out["n_masked"] = int(masked.sum())
    out["n_tokens"] = int(valid.sum())
    return out


class TripleLoss(nn.Module):
    """`compute_losses` bound to a loss configuration: `TripleLoss(cfg)(student, teacher, batch)`."""

    def __init__(self, cfg: Any = None, fused: bool = True):
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        self.fused = fused

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return compute_losses(student, teacher, batch, self.cfg, fused=self.fused)
