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
* writes atomic checkpoints (safetensors weights, optimizer / scheduler tensors, RNG states, data
  position) from which `resume=True` continues bit-exactly, metrics as JSONL, and stops with a
  DistilkitError on a non-finite loss, keeping the last good checkpoint;
* scores held-out masked-LM accuracy / perplexity with a fixed masking seed before and after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import losses, models
from .hardware import PRECISIONS, resolve_mixed_precision
from .config import DistillConfig, TrainConfig, to_dict
from .masking import MaskingConfig, mask_tokens, special_ids_of, token_weights
from .utils import DistilkitError, atomic_write_json, model_fingerprint, provenance, reset_accelerate_state, set_seed, use_gpu

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
_CKPT_RE = re.compile(r"^step-(\d+)$")
#: Config fields that may change between a run and its resumption (they do not alter the trajectory).
RESUMABLE_CHANGES = {"save_every", "keep_checkpoints", "log_every", "tensorboard", "eval_batches", "eval_batch_size", "eval_seed"}


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
        if min(cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos) < 0 or cfg.alpha_ce + cfg.alpha_mlm + cfg.alpha_cos <= 0:
            raise DistilkitError("config: alpha_ce, alpha_mlm, alpha_cos must be >= 0 and not all 0")
        if not cfg.temperature > 0:
            raise bad("temperature", "a positive softmax temperature")
        if cfg.kl_positions not in losses.KL_POSITIONS:
            raise bad("kl_positions", "masked or all")


def masking_config(cfg: TrainConfig) -> MaskingConfig:
    return MaskingConfig(mlm_prob=cfg.mlm_prob, mask_frac=cfg.mask_frac, random_frac=cfg.random_frac, smoothing=cfg.smoothing)


def loss_config(cfg: DistillConfig) -> losses.LossConfig:
    return losses.LossConfig(cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos, cfg.temperature, cfg.kl_positions)


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


# =========================================================================== held-out evaluation


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
    Returns {"mlm_accuracy", "perplexity", "loss", "n_masked", "n_blocks", "seed"}.
    """
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
    disable = True if (progress is False or os.environ.get("DISTILKIT_NO_PROGRESS")) else None
    for b in tqdm(range(n_batches), desc="eval", leave=False, disable=disable):
        ids = corpus.batch(np.arange(b * batch_size, min(n, (b + 1) * batch_size)))
        attention = (ids != tokenizer.pad_token_id).long()
        masked, labels = mask_tokens(
            ids, mask_token_id=tokenizer.mask_token_id, vocab_size=corpus.vocab_size, special_ids=special,
            cfg=masking, attention_mask=attention, generator=generator,
        )
        hidden = models.encoder_hidden(model, masked.to(device), attention.to(device))
        select = (labels.reshape(-1) != losses.IGNORE_INDEX).to(device)
        logits = models.mlm_logits(model, hidden.reshape(-1, hidden.shape[-1])[select]).float()
        target = labels.reshape(-1).to(device)[select]
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += int(target.numel())
        blocks += int(ids.shape[0])
    model.train(was_training)
    loss = nll / max(count, 1)
    return {
        "mlm_accuracy": correct / max(count, 1),
        "perplexity": math.exp(min(loss, 700.0)),
        "loss": loss,
        "n_masked": count,
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


# =========================================================================== checkpoints


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in OUT/checkpoints, oldest first (temporary folders are ignored)."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state(), "masking": generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    py = random.getstate()
    npy = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    return tensors, plain


def _restore_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"rng-rank{rank}.safetensors"))
    plain = json.loads((folder / f"rng-rank{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["masking"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    accelerator: Any, out: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
    generator: torch.Generator, state: dict[str, Any], keep: int,
) -> Path:
    """Write OUT/checkpoints/step-N atomically (temp folder, then rename); keep the newest `keep`. All ranks call."""
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, plain = _rng_state(generator)  # every rank: its own RNG streams
    save_file(tensors, str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    atomic_write_json(tmp / f"rng-rank{accelerator.process_index}.json", plain)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        atomic_write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load a save_pretrained safetensors folder into `model` in place (exact; tied weights re-shared)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in weights if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise DistilkitError(f"{folder}: checkpoint does not match the model (missing {untied[:5]}, unexpected {unexpected[:5]})")


def write_model_dir(model: Any, tokenizer: Any, folder: str | os.PathLike, info: dict[str, Any], info_name: str) -> None:
    """Save model (safetensors) + tokenizer + an info JSON into `folder`.

    Written in a temporary sibling folder first; a new folder is renamed into place, an existing one
    (e.g. an adaptation OUT that also holds checkpoints) gets the files moved in with config.json last,
    so a folder with config.json is always complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
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


def _no_progress() -> bool:
    return bool(os.environ.get("DISTILKIT_NO_PROGRESS"))


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


def train(
    task: TrainTask,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train `task.model` on the corpus's train split; checkpoints, metrics and TensorBoard logs go to `out`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object
    from transformers import get_linear_schedule_with_warmup

    check_config(cfg)
    out = Path(out)
    lcfg = task.loss
    unused_head = lcfg.alpha_ce == 0 and lcfg.alpha_mlm == 0  # cosine only: the MLM head gets no gradient
    reset_accelerate_state()
    cuda = use_gpu()
    precision = resolve_mixed_precision(cfg.mixed_precision, cuda=cuda)
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_head)],
    )
    _check_world(accelerator)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device

    # --- data, plan, output folder --------------------------------------------------------------
    blocks = open_split(corpus, "train")
    heldout = open_split(corpus, "heldout")
    plan = plan_training(cfg, len(blocks), blocks.block_size, world)
    check_corpus_tokenizer(blocks, task.tokenizer, task.model, corpus)
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and out.exists() and any(out.iterdir()):
        raise DistilkitError(f"{out}: output folder exists and is not empty (use --resume to continue it, or another --out)")
    if resume and ckpt is None and main:
        warnings.warn(f"{out}: no checkpoint to resume from; starting from the beginning", UserWarning, stacklevel=2)
    state: dict[str, Any] = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    if ckpt:
        if state["world_size"] != world:
            raise DistilkitError(f"{ckpt}: written by {state['world_size']} processes, now {world}: resume with the same number")
        saved, now = _trajectory_config_from(state["config"]), _trajectory_config(cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise DistilkitError(f"{ckpt}: config differs from the checkpoint's in {changed}: resume with the same settings")
    accelerator.wait_for_everyone()  # every rank has looked at OUT before anything is written to it
    if main:  # OUT/checkpoints exists from the start: a run killed before its first checkpoint is resumable too
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / METRICS, state.get("position", {}).get("step", 0))

    # --- models, optimizer, schedule ------------------------------------------------------------
    set_seed(cfg.seed + rank)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
    model = task.model
    if ckpt:
        load_weights(model, ckpt / "model")
    initial_fp = state.get("initial_fingerprint") or model_fingerprint(model)
    model.train()
    if cfg.attention_dropout is not None:
        models.set_attention_dropout(model, cfg.attention_dropout)
    teacher = task.teacher
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(  # fused: one kernel over all tensors (CPU: 14 ms vs 71 ms a step, benchmarks/)
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * plan.steps), plan.steps)
    student, optimizer = accelerator.prepare(losses.MLMForward(model), optimizer)
    teacher_fwd = losses.MLMForward(teacher) if teacher is not None else None
    if ckpt:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", map_location="cpu", weights_only=True))
        _restore_rng(ckpt, rank, generator)

    mcfg = masking_config(cfg)
    special = special_ids_of(task.tokenizer)
    weights = token_weights(blocks.token_counts(), mcfg.smoothing, special) if mcfg.smoothing is not None else None
    pad_id = task.tokenizer.pad_token_id
    eval_kw = dict(batch_size=cfg.eval_batch_size or cfg.batch_size, max_batches=cfg.eval_batches, seed=cfg.eval_seed,
                   masking=mcfg, device=device)

    # --- held-out scores before training (first start only; kept in every checkpoint) -------------
    eval_before: dict[str, Any] = state.get("eval_before", {})
    if not ckpt and heldout is not None:
        if main:
            eval_before = {"model": evaluate_mlm(model, heldout, task.tokenizer, **eval_kw)}
            if teacher is not None:
                eval_before["teacher"] = evaluate_mlm(teacher, heldout, task.tokenizer, **eval_kw)
        accelerator.wait_for_everyone()

    # --- the loop -------------------------------------------------------------------------------
    pos = state.get("position", {"epoch": 0, "micro": 0, "step": 0, "tokens": 0})
    epoch, micro, step, tokens = pos["epoch"], pos["micro"], pos["step"], pos["tokens"]
    elapsed_before = float(state.get("elapsed", 0.0))
    order = epoch_order(len(blocks), cfg.seed, epoch)
    writer = _tensorboard(out, cfg) if main else None
    bar = tqdm(total=plan.steps, initial=step, desc=task.kind, unit="step", dynamic_ncols=True,
               disable=True if (not main or _no_progress()) else None)
    t_start = time.perf_counter()
    train_time = 0.0  # seconds spent in steps (not in checkpoints / evaluation)
    seg_tokens = 0
    last_log = (time.perf_counter(), tokens, 0.0)
    last: dict[str, float | None] = {}
    names = ("loss", "loss_ce", "loss_mlm", "loss_cos")
    try:
        while step < plan.steps:
            t0 = time.perf_counter()
            sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
            for m in range(plan.accumulation):
                if micro >= plan.micro_per_epoch:
                    epoch, micro = epoch + 1, 0
                    order = epoch_order(len(blocks), cfg.seed, epoch)
                ids = blocks.batch(rank_slice(order, micro, plan.batch_size, world, rank))
                micro += 1
                attention = (ids != pad_id).long()
                masked, labels = mask_tokens(
                    ids, mask_token_id=task.tokenizer.mask_token_id, vocab_size=blocks.vocab_size, special_ids=special,
                    cfg=mcfg, attention_mask=attention, weights=weights, generator=generator,
                )
                batch = {"input_ids": masked.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}
                sync = m == plan.accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(student):
                    with accelerator.autocast():
                        result = losses.compute_losses(student, teacher_fwd, batch, lcfg)
                    accelerator.backward(result["loss"] / plan.accumulation)
                for i, key in enumerate(names):
                    if result[key] is not None:
                        sums[i] += result[key].detach().double() / plan.accumulation
                sums[-1] += result["n_tokens"]
            sums = accelerator.reduce(sums, reduction="sum")
            sums[: len(names)] /= world
            values = {k: (float(sums[i]) if result[k] is not None else None) for i, k in enumerate(names)}
            if not math.isfinite(values["loss"]):
                good = latest_checkpoint(out)
                raise DistilkitError(
                    f"non-finite loss ({values['loss']}) at optimizer step {step + 1} "
                    f"({', '.join(f'{k}={v}' for k, v in values.items() if v is not None)}); "
                    f"last good checkpoint: {good if good else 'none'}. Lower lr or check the data."
                )
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = int(sums[-1])
            tokens += step_tokens
            seg_tokens += step_tokens
            train_time += time.perf_counter() - t0
            last = values

            bar.update(1)
            if main and (step % cfg.log_every == 0 or step == plan.steps):
                now = time.perf_counter()
                t_prev, tok_prev, train_prev = last_log
                rate = (tokens - tok_prev) / max(train_time - train_prev, 1e-9)
                last_log = (now, tokens, train_time)
                record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                          **values, "tokens": tokens, "tokens_per_s": round(rate, 1),
                          "elapsed": round(elapsed_before + now - t_start, 2)}
                with open(out / METRICS, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if v is not None and k not in ("step",):
                            writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix_str(f"tok/s {rate:.0f} loss {_fmt(values['loss'])} ce {_fmt(values['loss_ce'])} "
                                    f"mlm {_fmt(values['loss_mlm'])} cos {_fmt(values['loss_cos'])}")
            if step % cfg.save_every == 0 or step == plan.steps:
                save_checkpoint(
                    accelerator, out, step, model, optimizer, scheduler, generator,
                    {
                        "step": step,
                        "position": {"epoch": epoch, "micro": micro, "step": step, "tokens": tokens},
                        "elapsed": elapsed_before + time.perf_counter() - t_start,
                        "world_size": world,
                        "plan": dataclasses.asdict(plan),
                        "config": to_dict(cfg),
                        "config_class": type(cfg).__name__,
                        "eval_before": eval_before,
                        "initial_fingerprint": initial_fp,
                    },
                    cfg.keep_checkpoints,
                )
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    # --- after training -------------------------------------------------------------------------
    eval_after: dict[str, Any] = {}
    if heldout is not None and main:
        eval_after = {"model": evaluate_mlm(model, heldout, task.tokenizer, **eval_kw)}
    final_fp = model_fingerprint(model)
    fingerprints = gather_object([final_fp])
    accelerator.wait_for_everyone()
    return TrainResult(
        is_main=main, world_size=world, plan=plan, steps=step, tokens=tokens,
        tokens_per_s=seg_tokens / train_time if train_time > 0 else 0.0,
        elapsed=elapsed_before + time.perf_counter() - t_start, resumed_from=str(ckpt) if ckpt else None,
        last=last, eval_before=eval_before, eval_after=eval_after, initial_fingerprint=initial_fp,
        final_fingerprint=final_fp, rank_fingerprints=list(fingerprints),
    )


def _trajectory_config_from(saved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (written by a run that went past its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    from .utils import atomic_write_text

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
    set_seed(cfg.seed)  # a headless teacher gets a (seeded) fresh head
    tmodel, had_head = models.load_teacher(teacher)
    smodel = models.load_student(student)
    tokenizer = models.load_tokenizer(student)
    if tmodel.config.vocab_size != smodel.config.vocab_size:
        raise DistilkitError(f"{student}: vocabulary size {smodel.config.vocab_size} differs from the teacher's "
                             f"{tmodel.config.vocab_size}: build the student with `distilkit init-student`")
    if cfg.alpha_cos > 0 and tmodel.config.hidden_size != smodel.config.dim:
        raise DistilkitError(f"{student}: hidden size {smodel.config.dim} differs from the teacher's "
                             f"{tmodel.config.hidden_size}: the cosine loss needs equal widths (set alpha_cos=0)")
    task = TrainTask(model=smodel, tokenizer=tokenizer, loss=loss_config(cfg), teacher=tmodel, kind="distill")
    teacher_fp = model_fingerprint(tmodel)
    result = train(task, corpus, out, cfg, resume=resume)

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
                **provenance(),
            })
        atomic_write_json(out / "distill.json", summary)
    return summary
