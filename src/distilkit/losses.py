"""DistilBERT's triple loss (paper section 3): distillation KL + masked-LM cross-entropy + hidden-state cosine.

    loss = alpha_ce * T^2 * KL(softmax(t/T) || softmax(s/T))      (soft targets, summed over the vocabulary,
                                                                    averaged over positions)
         + alpha_mlm * CE(s, masked labels)                        (hard targets, masked positions only)
         + alpha_cos * (1 - cos(h_s, h_t))                         (last hidden layer, non-padding tokens)

The three term functions are pure functions of tensors. `compute_losses` runs the models and applies the
vocabulary projection only at the positions a term needs (by default the ~15% masked ones), which is
most of the speed of a training step for a 30k vocabulary. A term whose weight is 0 is not computed at
all (nor the projections it would need), so the paper's Table 4 ablations are just weights set to 0.
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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = models.encoder_hidden(self.model, input_ids, attention_mask)
        logits = None
        if positions is not None:
            flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            logits = models.mlm_logits(self.model, flat)
        return hidden, logits


def as_mlm_forward(model: nn.Module) -> nn.Module:
    """A plain (Distil)BertForMaskedLM gets wrapped in MLMForward; an MLMForward (or DDP of one) is kept."""
    if isinstance(model, models.PreTrainedModel):  # any family's LM (families.py)
        return MLMForward(model)
    return model


def compute_losses(
    student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], cfg: Any
) -> dict[str, Any]:
    """Run student (and teacher, without gradients) on a masked batch and return the weighted triple loss.

    `batch`: input_ids (already masked), attention_mask, labels (IGNORE_INDEX where not selected for MLM).
    `cfg`: anything with alpha_ce, alpha_mlm, alpha_cos, temperature, kl_positions (LossConfig, DistillConfig).
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

    s_hidden, s_logits = student(input_ids, attention_mask, positions)
    t_hidden = t_logits = None
    if a_ce > 0 or a_cos > 0:
        with torch.no_grad():
            t_hidden, t_logits = teacher(input_ids, attention_mask, positions if a_ce > 0 else None)
            t_hidden = t_hidden.detach()

    out: dict[str, Any] = {"loss_ce": None, "loss_mlm": None, "loss_cos": None}
    total = s_hidden.new_zeros((), dtype=torch.float32)
    if a_ce > 0:
        out["loss_ce"] = kl_distill(s_logits, t_logits, cfg.temperature)
        total = total + a_ce * out["loss_ce"]
    if a_mlm > 0:
        out["loss_mlm"] = masked_lm_loss(s_logits, flat_labels.index_select(0, positions))
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

    def __init__(self, cfg: Any = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return compute_losses(student, teacher, batch, self.cfg)
