"""Dynamic masking for masked-language-model distillation (BERT's 15% / 80-10-10 recipe).

Called on every batch, so each pass over the corpus masks different positions (RoBERTa/DistilBERT
"dynamic masking"). Positions are *selected* among eligible tokens (not special, not padding):

* without smoothing: each eligible position independently with probability `mlm_prob`; a sequence
  that has eligible tokens but drew none gets one eligible position chosen uniformly, so every
  sequence contributes to the loss;
* with smoothing (XLM / DistilBERT `--mlm_smoothing 0.7`): exactly `round(mlm_prob * n_eligible)`
  positions of the whole batch, drawn without replacement with probability proportional to
  `weights[token] = count(token) ** -smoothing`, so rare tokens are predicted more often (the paper's
  code draws `ceil(mlm_prob * n_tokens)` with [CLS]/[SEP] counted: README, "distilkit vs the paper's code").

Selected positions become [MASK] with probability `mask_frac`, a random non-special token with
probability `random_frac` (the paper's code draws from the whole vocabulary), and stay unchanged otherwise. Labels hold the original id at selected
positions and -100 elsewhere. Everything is vectorised torch and reproducible given a `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .utils import DistilkitError

from .losses import IGNORE_INDEX  # noqa: F401  (one definition, in losses: the label value the losses skip)


@dataclass
class MaskingConfig:
    """The masking fields of a TrainConfig, with its defaults (stated once, in config.TrainConfig)."""

    mlm_prob: float = TrainConfig.mlm_prob  # fraction of eligible tokens selected for prediction
    mask_frac: float = TrainConfig.mask_frac  # of the selected: replaced by [MASK]
    random_frac: float = TrainConfig.random_frac  # of the selected: a random non-special token (rest kept)
    smoothing: float | None = TrainConfig.smoothing  # e.g. 0.7: selection weight count ** -0.7 (needs token counts)

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_prob <= 1.0:
            raise DistilkitError(f"masking: mlm_prob must be in (0, 1], got {self.mlm_prob}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0 + 1e-9:
            raise DistilkitError(
                f"masking: mask_frac and random_frac must be >= 0 with sum <= 1, got {self.mask_frac} and {self.random_frac}"
            )
        if self.smoothing is not None and self.smoothing < 0:
            raise DistilkitError(f"masking: smoothing must be >= 0 or None, got {self.smoothing}")


def special_ids_of(tokenizer) -> list[int]:
    """Ids that are never selected nor drawn as random replacements: the tokenizer's special tokens."""
    return sorted(set(int(i) for i in tokenizer.all_special_ids))


def token_weights(counts: np.ndarray, smoothing: float | None, special_ids: list[int]) -> torch.Tensor | None:
    """Per-vocabulary selection weights `max(count, 1) ** -smoothing`, 0 for special ids.

    Returns None when `smoothing` is None (uniform selection). `counts` is the (vocab_size,)
    array from `BlockCorpus.token_counts()`.
    """
    if smoothing is None:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (vocab_size,), got shape {counts.shape}")
    weights = np.maximum(counts, 1.0) ** -float(smoothing)
    weights[np.asarray(list(special_ids), dtype=np.int64)] = 0.0
    return torch.from_numpy(weights.astype(np.float32))


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int] | torch.Tensor,
    cfg: MaskingConfig,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch (batch, seq) of token ids. Returns (masked_input_ids, labels); the input is not modified.

    `weights` (from `token_weights`) switches on smoothed selection; it is required when
    `cfg.smoothing` is set. Random tensors are created on `input_ids.device` with `generator`
    (which must live on the same device).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if cfg.smoothing is not None and weights is None:
        raise ValueError("cfg.smoothing is set: pass weights=token_weights(counts, cfg.smoothing, special_ids)")
    device = input_ids.device
    special = torch.as_tensor(special_ids, dtype=torch.long, device=device)

    eligible = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        eligible &= attention_mask.to(device=device).bool()

    # --- choose the positions to predict
    if weights is not None:
        probs = weights.to(device=device, dtype=torch.float32)[input_ids] * eligible
        n_select = int(round(cfg.mlm_prob * int(eligible.sum())))
        n_select = min(n_select, int((probs > 0).sum()))
        selected = torch.zeros(input_ids.numel(), dtype=torch.bool, device=device)
        if n_select > 0:
            idx = torch.multinomial(probs.flatten(), n_select, replacement=False, generator=generator)
            selected[idx] = True
        selected = selected.view_as(input_ids)
    else:
        draw = torch.rand(input_ids.shape, generator=generator, device=device)
        selected = (draw < cfg.mlm_prob) & eligible
        # sequences with eligible tokens but no selection get one uniformly chosen eligible position
        fallback = torch.rand(input_ids.shape, generator=generator, device=device).masked_fill(~eligible, -1.0)
        need = eligible.any(dim=1) & ~selected.any(dim=1)
        rows = need.nonzero(as_tuple=True)[0]
        selected[rows, fallback.argmax(dim=1)[rows]] = True

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # --- decide what each selected position shows the model: [MASK] / random token / itself
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < cfg.mask_frac)
    to_random = selected & (action >= cfg.mask_frac) & (action < cfg.mask_frac + cfg.random_frac)

    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    allowed_ids = allowed.nonzero(as_tuple=True)[0]
    random_ids = allowed_ids[torch.randint(len(allowed_ids), input_ids.shape, generator=generator, device=device)]

    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random].to(masked.dtype)
    return masked, labels
