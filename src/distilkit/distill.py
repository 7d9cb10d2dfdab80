"""Pre-training distillation (`distilkit distill`) and the masked-LM training loop it shares with `adapt-teacher`.

`train()` is the one loop: a trainable model, an optional frozen teacher, and the triple loss of
`losses.compute_losses`. Distillation is "student + teacher + alpha_ce/alpha_mlm/alpha_cos";
teacher adaptation (adapt.py) is "one model + MLM loss only". The loop:

* runs under Hugging Face Accelerate: plain `python`, `torchrun --standalone --nproc_per_node N`, or
  `accelerate launch --multi_gpu --num_processes N` (DDP; gloo on CPU), with optional mixed precision;
* reads a prepared `corpus.BlockCorpus`; each epoch is a seeded permutation of the blocks, and rank r
  takes a disjoint slice of every micro-batch, so the data position is just (epoch, micro-step);
* masks every batch afresh (`masking.mask_tokens`, optional count^-s smoothing);
* steps AdamW (no decay on biases / LayerNorms) with linear warm-up and decay, gradient clipping and
  accumulation up to an effective batch in sequences or tokens;
* writes atomic, manifest-verified checkpoints (checkpoint.py: safetensors weights, optimizer / scheduler
  tensors, RNG states, data position, the run's inputs) from which `resume=True` continues bit-exactly,
  only with the same inputs and settings (else `checkpoint.InputsChanged`), past a broken newest one;
  metrics as JSONL; stops with a DistilkitError on a non-finite loss, keeping the last good checkpoint;
* prints the resolved mixed precision ("auto" -> bf16 / no) and records it in results and metrics;
  optionally freezes the position embeddings (`freeze_position_embeddings`, the paper's code);
* scores held-out masked-LM accuracy / perplexity with a fixed masking seed before and after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, families, losses, models
from .checkpoint import CHECKPOINTS, RESUMABLE_CHANGES, InputsChanged, latest_checkpoint, list_checkpoints  # noqa: F401
from .config import DistillConfig, TrainConfig, to_dict
from .hardware import PRECISIONS, resolve_mixed_precision
from .masking import MaskingConfig, mask_tokens, special_ids_of, token_weights
from .utils import (
    DistilkitError,
    atomic_write_json,
    atomic_write_text,
    check_output_not_input,
    model_fingerprint,
    output_occupied,
    progress as progress_bar,
    provenance,
    reset_accelerate_state,
    set_seed,
    temp_sibling,
    use_gpu,
)

METRICS = "metrics.jsonl"


# =========================================================================== configuration checks


def check_config(cfg: TrainConfig) -> None:
    """Raise DistilkitError on values the loop cannot run with."""

    def bad(key: str, expected: str) -> DistilkitError:
        return DistilkitError(f"config: {key}: expected {expected}, got {getattr(cfg, key)!r}")

    if cfg.steps is not None and cfg.steps < 1:
        raise bad("steps", "a positive number of optimizer steps (or none, to use epochs)")
    if cfg.steps is None and not cfg.epochs > 0:
        raise bad("epochs", "a positive number of passes over the corpus")
    if cfg.batch_size < 1:
        raise bad("batch_size", "a positive integer")
    if cfg.effective_batch is not None and cfg.effective_tokens is not None:
        raise DistilkitError("config: set effective_batch (sequences) or effective_tokens, not both")
    for key in ("effective_batch", "effective_tokens"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise bad(key, "a positive integer")
    if not cfg.lr > 0:
        raise bad("lr", "a positive learning rate")
    if not 0 <= cfg.warmup_ratio < 1:
        raise bad("warmup_ratio", "a share in [0, 1)")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.eps <= 0:
        raise DistilkitError("config: weight_decay and grad_clip must be >= 0 and eps > 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise bad("betas", "two numbers in [0, 1), e.g. [0.9, 0.98]")
    if cfg.save_every < 1 or cfg.keep_checkpoints < 1 or cfg.log_every < 1:
        raise DistilkitError("config: save_every, keep_checkpoints and log_every must be >= 1")
    if cfg.mixed_precision not in PRECISIONS:
        raise bad("mixed_precision", "auto, no, bf16 or fp16")
    if cfg.eval_batches is not None and cfg.eval_batches < 1:
        raise bad("eval_batches", "a positive integer or none (whole held-out split)")
    if cfg.attention_dropout is not None and not 0 <= cfg.attention_dropout < 1:
        raise bad("attention_dropout", "a probability in [0, 1) or none (the model's own)")
    masking_config(cfg)  # validates the masking fields
    if isinstance(cfg, DistillConfig):
        if min(cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_clm, cfg.alpha_cos) < 0 or cfg.alpha_ce + cfg.alpha_mlm + cfg.alpha_cos <= 0:
            raise DistilkitError("config: alpha_ce, alpha_mlm, alpha_clm, alpha_cos must be >= 0 and not all 0")
        if not cfg.temperature > 0:
            raise bad("temperature", "a positive softmax temperature")
        if cfg.kl_positions not in losses.KL_POSITIONS:
            raise bad("kl_positions", "masked or all")


def masking_config(cfg: TrainConfig) -> MaskingConfig:
    return MaskingConfig(mlm_prob=cfg.mlm_prob, mask_frac=cfg.mask_frac, random_frac=cfg.random_frac, smoothing=cfg.smoothing)


def loss_config(cfg: DistillConfig, family: families.Family | None = None) -> losses.LossConfig:
    weights = families.loss_weights(family or families.FAMILIES["bert"], cfg)  # GPT-2: alpha_clm, KL everywhere
    return losses.LossConfig(cfg.alpha_ce, weights["alpha_mlm"], cfg.alpha_cos, cfg.temperature, weights["kl_positions"])


# =========================================================================== corpus access


def open_split(corpus: str | os.PathLike, split: str):
    """A `BlockCorpus` split, or None when the prepared corpus has no such split (or it is empty)."""
    from .corpus import BlockCorpus

    try:
        blocks = BlockCorpus(str(corpus), split)
    except (DistilkitError, FileNotFoundError, KeyError):
        if split == "train":
            raise
        return None
    return blocks if len(blocks) > 0 or split == "train" else None


def check_corpus_tokenizer(blocks: Any, tokenizer: Any, model: Any, where: str | os.PathLike) -> None:
    """The corpus must have been tokenized with the model's tokenizer (same id mapping)."""
    from .corpus import vocab_sha256

    expected = blocks.meta.get("vocab_sha256")
    if expected is not None and expected != vocab_sha256(tokenizer):
        raise DistilkitError(f"{where}: corpus was tokenized with another vocabulary ({blocks.meta.get('tokenizer')}): "
                             "prepare it with the teacher's tokenizer")
    if blocks.vocab_size > model.config.vocab_size:
        raise DistilkitError(f"{where}: corpus vocabulary ({blocks.vocab_size}) is larger than the model's "
                             f"({model.config.vocab_size})")
    if blocks.block_size > getattr(model.config, "max_position_embeddings", blocks.block_size):
        raise DistilkitError(f"{where}: blocks of {blocks.block_size} tokens exceed the model's "
                             f"{model.config.max_position_embeddings} positions: prepare the corpus with a smaller --block-size")


# =========================================================================== held-out evaluation


_EVAL_CHUNK = 4096  # positions scored at a time


@torch.no_grad()
def evaluate_mlm(
    model: torch.nn.Module,
    corpus: Any,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_batches: int | None = None,
    seed: int = 1234,
    masking: MaskingConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Masked-LM top-1 accuracy and perplexity of a (Distil)BertForMaskedLM on held-out blocks.

    Blocks are read in order and masked with a generator seeded by `seed` (uniform 15%/80-10-10 unless
    `masking` says otherwise), so two models evaluated with the same arguments see identical masks.
    Returns {"mlm_accuracy", "perplexity", "loss", "n_masked", "n_blocks", "seed"}; for a causal-LM family
    (GPT-2, families.py) no masking: every next token, {"next_token_accuracy", ..., "n_predicted", ...}.
    """
    family = families.family_of(model)
    masking = masking or MaskingConfig()
    if masking.smoothing is not None:
        masking = dataclasses.replace(masking, smoothing=None)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    special = special_ids_of(tokenizer)
    n = len(corpus)
    n_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    nll = 0.0
    correct = count = blocks = 0
    for b in progress_bar(range(n_batches), desc="eval", enabled=progress is not False):
        ids = corpus.batch(np.arange(b * batch_size, min(n, (b + 1) * batch_size)))
        if family.causal:
            masked, attention, labels = families.causal_batch(ids, tokenizer, family)
        else:
            attention = (ids != tokenizer.pad_token_id).long()
            masked, labels = mask_tokens(
                ids, mask_token_id=tokenizer.mask_token_id, vocab_size=corpus.vocab_size, special_ids=special,
                cfg=masking, attention_mask=attention, generator=generator,
            )
        hidden = models.encoder_hidden(model, masked.to(device), attention.to(device))
        select = (labels.reshape(-1) != losses.IGNORE_INDEX).to(device)
        selected = hidden.reshape(-1, hidden.shape[-1])[select]
        targets = labels.reshape(-1).to(device)[select]
        for start in range(0, len(targets), _EVAL_CHUNK):  # bounded (positions x vocabulary) logits
            logits = models.mlm_logits(model, selected[start : start + _EVAL_CHUNK]).float()
            target = targets[start : start + _EVAL_CHUNK]
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
        count += int(targets.numel())
        blocks += int(ids.shape[0])
    model.train(was_training)
    loss = nll / max(count, 1)
    accuracy, n_scored = ("next_token_accuracy", "n_predicted") if family.causal else ("mlm_accuracy", "n_masked")
    return {
        accuracy: correct / max(count, 1),
        "perplexity": math.exp(min(loss, 700.0)),
        "loss": loss,
        n_scored: count,
        "n_blocks": blocks,
        "seed": seed,
    }


# =========================================================================== batch plan and data order


@dataclass
class Plan:
    """How many micro-batches make an optimizer step, and how many steps make the run."""

    world_size: int
    batch_size: int  # per device per micro-step
    block_size: int
    accumulation: int  # micro-steps per optimizer step
    steps: int  # optimizer steps in the whole run
    micro_per_epoch: int  # micro-steps per rank in one pass over the corpus
    sequences_per_step: int  # all devices
    tokens_per_step: int

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_per_epoch / self.accumulation


def plan_training(cfg: TrainConfig, n_blocks: int, block_size: int, world_size: int) -> Plan:
    per_micro = cfg.batch_size * world_size  # sequences per micro-step, all devices
    micro_per_epoch = n_blocks // per_micro
    if micro_per_epoch < 1:
        raise DistilkitError(
            f"corpus: {n_blocks} training blocks, fewer than batch_size x world_size = {per_micro}: "
            "prepare more text or lower batch_size"
        )
    if cfg.effective_batch is not None:
        accumulation = math.ceil(cfg.effective_batch / per_micro)
    elif cfg.effective_tokens is not None:
        accumulation = math.ceil(cfg.effective_tokens / (per_micro * block_size))
    else:
        accumulation = 1
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * micro_per_epoch / accumulation))
    return Plan(
        world_size=world_size, batch_size=cfg.batch_size, block_size=block_size, accumulation=accumulation,
        steps=steps, micro_per_epoch=micro_per_epoch, sequences_per_step=per_micro * accumulation,
        tokens_per_step=per_micro * accumulation * block_size,
    )


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block permutation of one epoch: a function of (seed, epoch) only, hence resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def rank_slice(order: np.ndarray, micro: int, batch_size: int, world_size: int, rank: int) -> np.ndarray:
    """Block indices of `rank` at micro-step `micro` of an epoch: disjoint across ranks and micro-steps."""
    start = (micro * world_size + rank) * batch_size
    return order[start : start + batch_size]


# =========================================================================== optimizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on everything but biases and LayerNorm parameters (tied ones counted once)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():  # de-duplicates tied parameters
        if not p.requires_grad:
            continue
        (rest if id(p) in no_decay or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# =========================================================================== model folders


def write_model_dir(model: Any, tokenizer: Any, folder: str | os.PathLike, info: dict[str, Any], info_name: str) -> None:
    """Save model (safetensors) + tokenizer + an info JSON into `folder`.

    Written in a temporary sibling folder first (`utils.temp_sibling`); a new folder is renamed into place, an
    existing one (e.g. an adaptation OUT that also holds checkpoints) gets the files moved in with config.json
    last, so a folder with config.json is always complete.
    """
    folder = Path(folder)
    tmp = temp_sibling(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / info_name, info)
        from .modelcard import write_model_card  # README.md: Hugging Face model card
        write_model_card(tmp, info_name)
        if not folder.exists():
            os.replace(tmp, folder)
            return
        with contextlib.suppress(FileNotFoundError):
            (folder / "config.json").unlink()
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json")
        for name in names:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def freeze_position_embeddings(model: torch.nn.Module) -> int:
    """requires_grad False on the model's learned position embeddings (the paper's --freeze_pos_embs);
    returns how many tensors were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if name.endswith("embeddings.position_embeddings.weight"):
            p.requires_grad_(False)
            frozen += 1
    return frozen


# =========================================================================== the training loop


@dataclass
class TrainTask:
    """What `train` trains: `model` (+ a frozen `teacher` for distillation) under the loss `loss`."""

    model: Any  # BertForMaskedLM or DistilBertForMaskedLM, trained
    tokenizer: Any
    loss: losses.LossConfig
    teacher: Any = None  # frozen, never wrapped in DDP
    kind: str = "distill"  # "distill" or "adapt": names the model's role in logs


@dataclass
class TrainResult:
    is_main: bool
    world_size: int
    plan: Plan
    steps: int
    tokens: int
    tokens_per_s: float  # this process's training segment, all ranks' tokens, checkpoints excluded
    elapsed: float  # wall seconds over all segments of the run
    resumed_from: str | None
    last: dict[str, float | None]  # last logged loss terms
    eval_before: dict[str, Any]  # {"model": ..., "teacher": ...} on the held-out split (empty without one)
    eval_after: dict[str, Any]
    initial_fingerprint: str
    final_fingerprint: str
    rank_fingerprints: list[str] = field(default_factory=list)
    mixed_precision: str = "no"  # resolved: "bf16", "fp16" or "no"
    teacher_fingerprint: str | None = None


_LOSS_NAMES = ("loss", "loss_ce", "loss_mlm", "loss_cos")
#: What OUT may hold for a plain (not --resume) run to start in it, when its checkpoints/ holds no step folder:
#: the leftovers of a run that stopped before its first checkpoint (temp leftovers are always ignored).
_RESTARTABLE = {CHECKPOINTS, METRICS, "tensorboard"}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _check_world(accelerator: Any) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise DistilkitError(
            f"launcher started {launched} processes but Accelerate sees {accelerator.num_processes}: "
            "use `torchrun --standalone --nproc_per_node N -m distilkit.cli ...` or `accelerate launch --multi_gpu`"
        )


def _trajectory_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}


@dataclass
class _Run:
    """One training run's fixed parts (built by `_setup`) and its position (advanced by the loop)."""

    task: TrainTask
    cfg: TrainConfig
    out: Path
    accelerator: Any
    precision: str
    blocks: Any
    heldout: Any
    plan: Plan
    identity: dict[str, Any]
    ckpt: Path | None
    state: dict[str, Any]
    # filled by _restore
    student: Any = None
    teacher_fwd: Any = None
    optimizer: Any = None
    scheduler: Any = None
    generator: Any = None
    masking: Any = None
    special: Any = None
    weights: Any = None
    eval_kw: dict[str, Any] = field(default_factory=dict)
    eval_before: dict[str, Any] = field(default_factory=dict)
    # position
    epoch: int = 0
    micro: int = 0
    step: int = 0
    tokens: int = 0
    order: Any = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _setup(task: TrainTask, corpus: str | os.PathLike, out: Path, cfg: TrainConfig, resume: bool) -> _Run:
    """Accelerator, data, plan, the run's identity, and the checkpoint to continue from (resume rules applied)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    lcfg = task.loss
    unused_head = lcfg.alpha_ce == 0 and lcfg.alpha_mlm == 0  # cosine only: the MLM head gets no gradient
    reset_accelerate_state()
    cuda = use_gpu()
    precision = resolve_mixed_precision(cfg.mixed_precision, cuda=cuda)
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_head)],
    )
    _check_world(accelerator)
    main = accelerator.is_main_process

    blocks = open_split(corpus, "train")
    heldout = open_split(corpus, "heldout")
    plan = plan_training(cfg, len(blocks), blocks.block_size, accelerator.num_processes)
    check_corpus_tokenizer(blocks, task.tokenizer, task.model, corpus)
    if cfg.smoothing is not None:
        blocks.token_counts()  # counts.npy is checked before anything is written to OUT
    if main:  # after the input checks: a bad input gets its one-line error alone
        how = "resolved from auto" if cfg.mixed_precision == "auto" else "as configured"
        print(f"{task.kind}: mixed precision {precision} ({how}) on {accelerator.device}", file=sys.stderr)
    identity = checkpoint.run_identity(
        teacher_fingerprint=model_fingerprint(task.teacher) if task.teacher is not None else None,
        initial_fingerprint=model_fingerprint(task.model), corpus_meta=blocks.meta, block_size=blocks.block_size,
        mixed_precision=precision, model=task.model, world_size=accelerator.num_processes,
        trajectory=_trajectory_config(cfg),
    )

    if main:
        checkpoint.clean_temps(out)
    restartable = (out / CHECKPOINTS).is_dir() and not checkpoint.step_dirs(out)  # stopped before a checkpoint
    if not resume and output_occupied(out, _RESTARTABLE if restartable else ()):
        raise DistilkitError(f"{out}: output folder exists and is not empty (use --resume to continue it, or another --out)")
    ckpt = checkpoint.resume_point(out, is_main=main) if resume else None
    if resume and ckpt is None and main:
        warnings.warn(f"{out}: no checkpoint to resume from; starting from the beginning", UserWarning, stacklevel=2)
    state = checkpoint.load_state(ckpt) if ckpt else {}
    if ckpt:
        checkpoint.check_resume(ckpt, state, identity)
    accelerator.wait_for_everyone()  # every rank has looked at OUT before anything is written to it
    if main:  # OUT/checkpoints exists from the start: a run killed before its first checkpoint is resumable too
        if ckpt:
            checkpoint.drop_newer(ckpt, out)
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / METRICS, state.get("position", {}).get("step", 0))
    return _Run(task=task, cfg=cfg, out=out, accelerator=accelerator, precision=precision, blocks=blocks,
                heldout=heldout, plan=plan, identity=identity, ckpt=ckpt, state=state)


def _restore(r: _Run) -> None:
    """Seeds, optimizer and schedule; with a checkpoint, weights, optimizer, schedule, RNG and data position."""
    from transformers import get_linear_schedule_with_warmup

    cfg, task, acc = r.cfg, r.task, r.accelerator
    set_seed(cfg.seed + r.rank)
    r.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (r.rank + 1))
    model = task.model
    if r.ckpt:
        checkpoint.load_weights(model, r.ckpt / "model")
    model.train()
    if cfg.attention_dropout is not None:
        models.set_attention_dropout(model, cfg.attention_dropout)
    if cfg.freeze_position_embeddings and not freeze_position_embeddings(model):
        raise DistilkitError(f"config: freeze_position_embeddings: {type(model).__name__} has no learned position embeddings")
    if task.teacher is not None:
        task.teacher.to(acc.device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(  # fused: one kernel over all tensors (CPU: 14 ms vs 71 ms a step, benchmarks/)
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True
    )
    r.scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * r.plan.steps), r.plan.steps)
    r.student, r.optimizer = acc.prepare(losses.MLMForward(model), optimizer)
    r.teacher_fwd = losses.MLMForward(task.teacher) if task.teacher is not None else None
    if r.ckpt:
        checkpoint.restore_training(r.ckpt, r.optimizer, r.scheduler, acc.scaler, r.generator, r.rank)

    r.masking = masking_config(cfg)
    r.special = special = special_ids_of(task.tokenizer)
    r.weights = token_weights(r.blocks.token_counts(), r.masking.smoothing, special) if r.masking.smoothing is not None else None
    r.eval_kw = dict(batch_size=cfg.eval_batch_size or cfg.batch_size, max_batches=cfg.eval_batches, seed=cfg.eval_seed,
                     masking=r.masking, device=acc.device)
    pos = r.state.get("position", {"epoch": 0, "micro": 0, "step": 0, "tokens": 0})
    r.epoch, r.micro, r.step, r.tokens = pos["epoch"], pos["micro"], pos["step"], pos["tokens"]
    r.order = epoch_order(len(r.blocks), cfg.seed, r.epoch)

    # held-out scores before training (first start only; kept in every checkpoint)
    r.eval_before = r.state.get("eval_before", {})
    if not r.ckpt and r.heldout is not None:
        if r.main:
            r.eval_before = {"model": evaluate_mlm(model, r.heldout, task.tokenizer, **r.eval_kw)}
            if task.teacher is not None:
                r.eval_before["teacher"] = evaluate_mlm(task.teacher, r.heldout, task.tokenizer, **r.eval_kw)
        acc.wait_for_everyone()


def _micro_step(r: _Run, sync: bool) -> dict[str, Any]:
    """Forward and backward of one micro-batch (the next one of this rank); returns the loss terms."""
    if r.micro >= r.plan.micro_per_epoch:
        r.epoch, r.micro = r.epoch + 1, 0
        r.order = epoch_order(len(r.blocks), r.cfg.seed, r.epoch)
    tok = r.task.tokenizer
    ids = r.blocks.batch(rank_slice(r.order, r.micro, r.plan.batch_size, r.world, r.rank))
    r.micro += 1
    family = families.family_of(r.task.model)
    if family.causal:  # GPT-2: no masking, next-token labels
        masked, attention, labels = families.causal_batch(ids, tok, family)
    else:
        attention = (ids != tok.pad_token_id).long()
        masked, labels = mask_tokens(
            ids, mask_token_id=tok.mask_token_id, vocab_size=r.blocks.vocab_size, special_ids=r.special,
            cfg=r.masking, attention_mask=attention, weights=r.weights, generator=r.generator,
        )
    device = r.accelerator.device
    batch = {"input_ids": masked.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}
    with contextlib.nullcontext() if sync else r.accelerator.no_sync(r.student):
        with r.accelerator.autocast():
            result = losses.compute_losses(r.student, r.teacher_fwd, batch, r.task.loss)
        r.accelerator.backward(result["loss"] / r.plan.accumulation)
    return result


def _optimizer_step(r: _Run) -> tuple[dict[str, float | None], int]:
    """The micro-steps of one optimizer step, all ranks' mean loss terms, clipping and the update.
    Returns (loss terms, tokens of the step); a non-finite loss raises before the update."""
    acc, n = r.accelerator, r.plan.accumulation
    sums = torch.zeros(len(_LOSS_NAMES) + 1, dtype=torch.float64, device=acc.device)
    for m in range(n):
        result = _micro_step(r, sync=m == n - 1)
        for i, key in enumerate(_LOSS_NAMES):
            if result[key] is not None:
                sums[i] += result[key].detach().double() / n
        sums[-1] += result["n_tokens"]
    sums = acc.reduce(sums, reduction="sum")
    sums[: len(_LOSS_NAMES)] /= r.world
    values = {k: (float(sums[i]) if result[k] is not None else None) for i, k in enumerate(_LOSS_NAMES)}
    if not math.isfinite(values["loss"]):
        good = checkpoint.latest_checkpoint(r.out)
        raise DistilkitError(
            f"non-finite loss ({values['loss']}) at optimizer step {r.step + 1} "
            f"({', '.join(f'{k}={v}' for k, v in values.items() if v is not None)}); "
            f"last good checkpoint: {good if good else 'none'}. Lower lr or check the data."
        )
    if r.cfg.grad_clip > 0:
        acc.clip_grad_norm_(r.student.parameters(), r.cfg.grad_clip)
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    step_tokens = int(sums[-1])
    r.tokens += step_tokens
    return values, step_tokens


def _log(r: _Run, values: dict[str, float | None], rate: float, elapsed: float, writer: Any, bar: Any) -> None:
    """One metrics.jsonl line (+ TensorBoard scalars and the progress bar's text). Main process only."""
    record = {"step": r.step, "epoch": round(r.step / r.plan.steps_per_epoch, 4), "lr": r.scheduler.get_last_lr()[0],
              **values, "tokens": r.tokens, "tokens_per_s": round(rate, 1), "elapsed": round(elapsed, 2),
              "mixed_precision": r.precision}
    with open(r.out / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"train/{k}", v, r.step)
    bar.set_postfix_str(f"tok/s {rate:.0f} loss {_fmt(values['loss'])} ce {_fmt(values['loss_ce'])} "
                        f"mlm {_fmt(values['loss_mlm'])} cos {_fmt(values['loss_cos'])}")


def _save(r: _Run, elapsed: float) -> None:
    checkpoint.save(
        r.accelerator, r.out, r.step, r.task.model, r.optimizer, r.scheduler, r.generator,
        {
            "step": r.step,
            "position": {"epoch": r.epoch, "micro": r.micro, "step": r.step, "tokens": r.tokens},
            "elapsed": elapsed,
            "world_size": r.world,
            "plan": dataclasses.asdict(r.plan),
            "config": to_dict(r.cfg),
            "config_class": type(r.cfg).__name__,
            "eval_before": r.eval_before,
            "initial_fingerprint": r.identity["initial_model"],
            "inputs": r.identity,
        },
        r.cfg.keep_checkpoints,
    )


def train(
    task: TrainTask,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train `task.model` on the corpus's train split; checkpoints, metrics and TensorBoard logs go to `out`.

    setup (accelerator, data, plan, resume rules: `checkpoint`) -> restore (weights, optimizer, RNG, data
    position) -> loop (optimizer step of micro-steps, log, save) -> held-out scores after training.
    """
    from accelerate.utils import gather_object

    check_config(cfg)
    r = _setup(task, corpus, Path(out), cfg, resume)
    _restore(r)
    main = r.main
    elapsed_before = float(r.state.get("elapsed", 0.0))
    writer = _tensorboard(r.out, cfg) if main else None
    bar = progress_bar(total=r.plan.steps, initial=r.step, desc=task.kind, unit="step", leave=True, enabled=main)
    t_start = time.perf_counter()
    train_time = 0.0  # seconds spent in steps (not in checkpoints / evaluation)
    seg_tokens = 0
    last_log = (r.tokens, 0.0)
    last: dict[str, float | None] = {}
    try:
        while r.step < r.plan.steps:
            t0 = time.perf_counter()
            last, step_tokens = _optimizer_step(r)
            seg_tokens += step_tokens
            train_time += time.perf_counter() - t0
            bar.update(1)
            if main and (r.step % cfg.log_every == 0 or r.step == r.plan.steps):
                rate = (r.tokens - last_log[0]) / max(train_time - last_log[1], 1e-9)
                last_log = (r.tokens, train_time)
                _log(r, last, rate, elapsed_before + time.perf_counter() - t_start, writer, bar)
            if r.step % cfg.save_every == 0 or r.step == r.plan.steps:
                _save(r, elapsed_before + time.perf_counter() - t_start)
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    eval_after: dict[str, Any] = {}
    if r.heldout is not None and main:
        eval_after = {"model": evaluate_mlm(task.model, r.heldout, task.tokenizer, **r.eval_kw)}
    final_fp = model_fingerprint(task.model)
    fingerprints = gather_object([final_fp])
    r.accelerator.wait_for_everyone()
    return TrainResult(
        is_main=main, world_size=r.world, plan=r.plan, steps=r.step, tokens=r.tokens,
        tokens_per_s=seg_tokens / train_time if train_time > 0 else 0.0,
        elapsed=elapsed_before + time.perf_counter() - t_start, resumed_from=str(r.ckpt) if r.ckpt else None,
        last=last, eval_before=r.eval_before, eval_after=eval_after, initial_fingerprint=r.identity["initial_model"],
        final_fingerprint=final_fp, rank_fingerprints=list(fingerprints), mixed_precision=r.precision,
        teacher_fingerprint=r.identity["teacher"],
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (written by a run that went past its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _tensorboard(out: Path, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard: true but tensorboard is not installed; logging to metrics.jsonl only", UserWarning, stacklevel=2)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def result_summary(result: TrainResult) -> dict[str, Any]:
    """The fields of a TrainResult that go into distill.json / adapt.json."""
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "elapsed_s": round(result.elapsed, 1),
        "world_size": result.world_size,
        "accumulation": result.plan.accumulation,
        "batch_size": result.plan.batch_size,
        "block_size": result.plan.block_size,
        "sequences_per_step": result.plan.sequences_per_step,
        "tokens_per_step": result.plan.tokens_per_step,
        "steps_per_epoch": round(result.plan.steps_per_epoch, 3),
        "resumed_from": result.resumed_from,
        "last_losses": result.last,
        "initial_fingerprint": result.initial_fingerprint,
        "final_fingerprint": result.final_fingerprint,
        "rank_fingerprints": result.rank_fingerprints,
        "mixed_precision": result.mixed_precision,
    }


# =========================================================================== distill


def distill(
    teacher: str, student: str, corpus: str, out: str, cfg: DistillConfig | None = None, resume: bool = False
) -> dict[str, Any]:
    """`distilkit distill`: train `student` against `teacher` with the triple loss on a prepared corpus.

    Writes OUT/final (DistilBertForMaskedLM + tokenizer), OUT/distill.json (summary), OUT/eval.json
    (held-out teacher / student before / student after, when the corpus has a held-out split),
    OUT/metrics.jsonl and OUT/checkpoints/. Returns the summary (on every rank).
    """
    cfg = cfg or DistillConfig()
    check_config(cfg)
    check_output_not_input(out, models.resolve_model(teacher), student, corpus)
    set_seed(cfg.seed)  # a headless teacher gets a (seeded) fresh head
    tmodel, had_head = models.load_teacher(teacher)
    smodel = models.load_student(student)
    tokenizer = models.load_tokenizer(student)
    if tmodel.config.vocab_size != smodel.config.vocab_size:
        raise DistilkitError(f"{student}: vocabulary size {smodel.config.vocab_size} differs from the teacher's "
                             f"{tmodel.config.vocab_size}: build the student with `distilkit init-student`")
    if cfg.alpha_cos > 0 and tmodel.config.hidden_size != smodel.config.hidden_size:
        raise DistilkitError(f"{student}: hidden size {smodel.config.hidden_size} differs from the teacher's "
                             f"{tmodel.config.hidden_size}: the cosine loss needs equal widths (set alpha_cos=0)")
    family = families.family_of(smodel)
    if families.family_of(tmodel) is not family:
        raise DistilkitError(f"{student}: a {family.name} student cannot learn from a {families.family_of(tmodel).name} "
                             "teacher: build the student from this teacher with `distilkit init-student`")
    task = TrainTask(model=smodel, tokenizer=tokenizer, loss=loss_config(cfg, family), teacher=tmodel, kind="distill")
    result = train(task, corpus, out, cfg, resume=resume)
    teacher_fp = result.teacher_fingerprint

    summary = {
        "command": "distill",
        "teacher": str(teacher),
        "teacher_resolved": models.resolve_model(teacher),
        "teacher_had_mlm_head": had_head,
        "teacher_fingerprint": teacher_fp,
        "student": str(student),
        "corpus": str(corpus),
        "corpus_meta": open_split(corpus, "train").meta,
        "out": str(out),
        "final": str(Path(out) / "final"),
        **result_summary(result),
        "config": to_dict(cfg),
        "seed": cfg.seed,
        **provenance(),
    }
    if result.eval_before:
        summary["eval"] = {
            "teacher": result.eval_before.get("teacher"),
            "student_before": result.eval_before.get("model"),
            "student_after": result.eval_after.get("model"),
        }
    if result.is_main:
        out = Path(out)
        write_model_dir(smodel, tokenizer, out / "final", summary, "distilkit_distill.json")
        if result.eval_before:
            atomic_write_json(out / "eval.json", {
                **summary["eval"],
                "masking_seed": cfg.eval_seed,
                "eval_batches": cfg.eval_batches,
                "teacher_fingerprint": teacher_fp,
                "student_fingerprint": result.final_fingerprint,
                "mixed_precision": result.mixed_precision,
                **provenance(),
            })
        atomic_write_json(out / "distill.json", summary)
    return summary
