"""Fine-tune and evaluate a BERT teacher or a DistilBERT student on a downstream task (GLUE, IMDb).

One plain PyTorch loop serves both model families: `AutoModelForSequenceClassification` on top of the
given folder, AdamW (weight decay off for biases and LayerNorm), linear warm-up then linear decay,
gradient clipping, `accelerate` for device placement and mixed precision (fp32 on CPU).

Speed on CPU comes from the data side: every split is tokenized once, batches are padded only to
their longest member, and training batches are grouped by length (sorted within mega-batches of
`mega_batch` x batch size, then the batches shuffled); evaluation runs in length order.

Several seeds fine-tune the same starting model; each seed fixes the classifier-head init, dropout
and data order, so the same seed gives the same numbers on CPU. With `distill_from`, the loss is
the paper's task-specific distillation "(D)": (1-a) CE(labels) + a T^2 KL(teacher_T || student_T),
or (1-a) MSE(labels) + a MSE(teacher) for regression, with teacher logits computed on the fly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import families
from .baselines import majority_baseline
from .config import FinetuneConfig, to_dict
from .distill import param_groups
from .losses import kl_distill
from .models import load_config, load_pretrained, load_tokenizer, loading, resolve_model
from .tasks import Example, Task, get_task, load_split, split_files, split_name, truncate_ids
from .utils import DistilkitError, atomic_dir, atomic_write_json, check_output_not_input, model_fingerprint, progress, provenance, reset_accelerate_state, set_seed, sha256_file, use_gpu

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # where the first seed's fine-tuned model is saved inside the output folder
META_FILE = "distilkit_finetune.json"  # written into every saved model folder


# =========================================================================== hyper-parameters


@dataclasses.dataclass
class HParams:
    """The values a run really used: config fields, else the task's defaults; max_length capped by the model."""

    lr: float
    batch_size: int
    epochs: float
    warmup_ratio: float
    max_length: int
    truncation: str


def resolve_hparams(cfg: FinetuneConfig, task: Task, max_positions: int) -> HParams:
    d = task.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    hp = HParams(
        lr=pick(cfg.lr, d.lr),
        batch_size=pick(cfg.batch_size, d.batch_size),
        epochs=pick(cfg.epochs, d.epochs),
        warmup_ratio=pick(cfg.warmup_ratio, d.warmup_ratio),
        max_length=pick(cfg.max_length, d.max_length),
        truncation=pick(cfg.truncation, d.truncation),
    )
    if hp.max_length > max_positions:
        log.warning("max_length %d capped at the model's %d positions", hp.max_length, max_positions)
        hp.max_length = max_positions
    if hp.truncation not in ("head", "head_tail"):
        raise DistilkitError(f"truncation: expected head or head_tail, got '{hp.truncation}'")
    if hp.truncation == "head_tail" and task.is_pair:
        raise DistilkitError(f"truncation head_tail is for single-text tasks; {task.name} has sentence pairs")
    for name in ("lr", "batch_size", "epochs", "max_length"):
        if not getattr(hp, name) > 0:
            raise DistilkitError(f"{name}: expected a positive value, got {getattr(hp, name)}")
    if hp.max_length < 8:
        raise DistilkitError(f"max_length: expected at least 8 tokens, got {hp.max_length}")
    if not 0 <= hp.warmup_ratio < 1:
        raise DistilkitError(f"warmup_ratio: expected a value in [0, 1), got {hp.warmup_ratio}")
    return hp


def parse_seeds(spec: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (an empty item such as in '1,,2' is refused)."""
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise DistilkitError(f"--seeds: expected comma-separated integers such as 1,2,3, got '{spec}'") from None


def _check_config(cfg: FinetuneConfig) -> None:
    if not cfg.seeds:
        raise DistilkitError("seeds: expected at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise DistilkitError(f"seeds: {cfg.seeds} repeats a seed")
    if cfg.save_models not in ("first", "all", "none"):
        raise DistilkitError(f"save_models: expected first, all or none, got '{cfg.save_models}'")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise DistilkitError(f"mixed_precision: expected auto, no, bf16 or fp16, got '{cfg.mixed_precision}'")
    for name in ("max_train", "max_eval"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise DistilkitError(f"{name}: expected a positive number of examples, got {value}")
    if not 0 <= cfg.alpha_kd <= 1:
        raise DistilkitError(f"alpha_kd: expected a value in [0, 1], got {cfg.alpha_kd}")
    if not cfg.temperature > 0:
        raise DistilkitError(f"temperature: expected a positive value, got {cfg.temperature}")


# =========================================================================== data: subset, tokenize once, batch


def subset_indices(n: int, k: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of size min(k, n), in file order (all of them when k is None)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


@dataclasses.dataclass
class Features:
    """Token ids of a split (no padding), token types, labels. Built once per run, shared by all seeds."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(examples: list[Example], tokenizer, max_length: int, truncation: str) -> Features:
    """Encode examples (pairs with the tokenizer's pair encoding and token types)."""
    labels = np.array([e.label for e in examples], dtype=np.float32 if isinstance(examples[0].label, float) else np.int64)
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    if truncation == "head_tail":  # encode in full, then cut the content between the special tokens
        enc = tokenizer(a, return_special_tokens_mask=True, verbose=False)
        ids = []
        for x, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
            first = special.index(0) if 0 in special else len(x)
            end = len(x) - special[::-1].index(0) if 0 in special else len(x)
            budget = max_length - (len(x) - (end - first))
            ids.append(x[:first] + truncate_ids(x[first:end], budget, "head_tail") + x[end:])
        return Features(ids, [[0] * len(x) for x in ids], labels)
    enc = tokenizer(a, b, truncation=True, max_length=max_length, return_token_type_ids=True)
    return Features(enc["input_ids"], enc["token_type_ids"], labels)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega_batch: int) -> list[np.ndarray]:
    """Shuffle, sort by length within mega-batches of `mega_batch` batches, cut into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    span = batch_size * mega_batch
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches, longest first."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(feats: Features, idx: np.ndarray, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member."""
    rows = [feats.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for j, i in enumerate(idx):
        n = len(rows[j])
        ids[j, :n] = rows[j]
        mask[j, :n] = 1
        types[j, :n] = feats.token_type_ids[i]
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def input_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The batch keys a model takes: token_type_ids only where its forward accepts them (BERT, not DistilBERT)."""
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters and families.uses_token_types(model)
    return ("input_ids", "attention_mask") + (("token_type_ids",) if accepts else ())


def _data_record(task: Task, data_dir: str, split: str, n_total: int, n_used: int) -> dict[str, Any]:
    """Which files a split came from (sha256 each), how many examples it has and how many were used."""
    split = split_name(task, split)
    if str(data_dir).startswith("hf:"):
        source: dict[str, Any] = {"hub": str(data_dir)}
    else:
        source = {"files": {f.relative_to(data_dir).as_posix(): sha256_file(f) for f in split_files(task, data_dir, split)}}
    return {"split": split, **source, "n_total": n_total, "n_used": n_used}


# =========================================================================== models


def load_classifier(path: str, task: Task | None = None):
    """A sequence classifier from a BERT/DistilBERT folder. With `task`: heads sized for it (new or
    mismatched heads are initialised from torch's RNG); without: as saved (a fine-tuned model)."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {}
    if task is not None:
        names = task.label_names or tuple(task.labels)
        kwargs = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
        if task.is_regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["problem_type"] = "single_label_classification"
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    return families.prepare_classifier(  # GPT-2: pad id for its last-token pooling
        load_pretrained(AutoModelForSequenceClassification, path, "sequence classifier", **kwargs))


def max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", 512))


class _Tensors(torch.nn.Module):
    """Lets `utils.model_fingerprint` hash a plain name -> tensor mapping."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.tensors


def checkpoint_fingerprint(path: str) -> str | None:
    """`utils.model_fingerprint` of the tensors stored in a local safetensors folder (None for hub ids)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    tensors: dict[str, torch.Tensor] = {}
    with loading(path, "model weights"):
        for f in files:
            tensors.update(load_file(str(f)))
    return model_fingerprint(_Tensors(tensors))


def _accelerator(mixed_precision: str):
    """An Accelerator for this run (GPU if there is one, else CPU; "auto": bf16 where the GPU supports it).

    Accelerate keeps its settings in a process-wide singleton that refuses changes, so the per-run part
    is cleared first: one process may distill in one precision, then fine-tune in another.
    """
    from accelerate import Accelerator

    from .hardware import resolve_mixed_precision

    cuda = use_gpu()
    mixed_precision = resolve_mixed_precision(mixed_precision, cuda=cuda)
    reset_accelerate_state()
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision)


# =========================================================================== train / predict


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, weight decay off for biases and LayerNorm. The fused kernel: on CPU its step over the
    (dense) embedding gradients is ~10x faster than the default foreach one."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def task_loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def distill_loss(task: Task, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)) per example, or MSE to the teacher's score (regression)."""
    if task.is_regression:
        return F.mse_loss(student.squeeze(-1).float(), teacher.squeeze(-1).float())
    return kl_distill(student, teacher, temperature)


@torch.inference_mode()
def predict_logits(model, feats: Features, batch_size: int, pad_id: int, accelerator, desc: str = "eval") -> np.ndarray:
    """Logits for every example, in the examples' order (batches run longest first)."""
    model.eval()
    names = input_names(accelerator.unwrap_model(model))
    out = np.zeros((len(feats), accelerator.unwrap_model(model).config.num_labels), dtype=np.float32)
    batches = sorted_batches(feats.lengths, batch_size)
    for idx in progress(batches, desc=desc, unit="batch"):
        with accelerator.autocast():
            batch = collate(feats, idx, pad_id, accelerator.device)
            logits = model(**{k: batch[k] for k in names}).logits
        out[idx] = logits.float().cpu().numpy()
    return out


def score_logits(task: Task, logits: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], float]:
    """(metrics, paper score) of a task's logits."""
    preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
    metrics = task.metric_fn(preds, labels)
    return metrics, float(task.score_fn(metrics))


def train(
    model, task: Task, feats: Features, hp: HParams, cfg: FinetuneConfig, seed: int, pad_id: int, accelerator,
    teacher=None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune `model`. Returns the model as prepared by `accelerator`, and steps, per-epoch mean loss, throughput."""
    from transformers import get_linear_schedule_with_warmup

    n_epochs = math.ceil(hp.epochs)
    per_epoch = math.ceil(len(feats) / hp.batch_size)
    total = max(1, math.ceil(hp.epochs * per_epoch))
    optimizer = _optimizer(model, hp.lr, cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    names = input_names(accelerator.unwrap_model(model))
    teacher_names = input_names(teacher) if teacher is not None else ()
    labels_all = torch.from_numpy(feats.labels)
    rng = np.random.default_rng(seed)

    model.train()
    step, seen, epoch_losses = 0, 0, []
    start = time.perf_counter()
    bar = progress(total=total, desc=f"seed {seed} train", unit="step")
    for _ in range(n_epochs):
        batches = (
            length_grouped_batches(feats.lengths, hp.batch_size, rng, cfg.mega_batch)
            if cfg.group_by_length else shuffled_batches(len(feats), hp.batch_size, rng)
        )
        losses = []
        for idx in batches[: total - step]:
            batch = collate(feats, idx, pad_id, accelerator.device)
            labels = labels_all[idx].to(accelerator.device)
            with accelerator.autocast():
                logits = model(**{k: batch[k] for k in names}).logits
            loss = task_loss(task, logits, labels)
            if teacher is not None:
                with torch.inference_mode(), accelerator.autocast():
                    t_logits = teacher(**{k: batch[k] for k in teacher_names}).logits
                kd = distill_loss(task, logits, t_logits.clone(), cfg.temperature)  # clone: usable by autograd
                loss = (1 - cfg.alpha_kd) * loss + cfg.alpha_kd * kd
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        epoch_losses.append(float(np.mean(losses)))
        if step >= total:
            break
    bar.close()
    wall = time.perf_counter() - start
    return model, {"steps": step, "train_loss": epoch_losses, "train_wall_s": wall, "train_examples_per_s": seen / wall}


# =========================================================================== finetune


def finetune(model: str, task: str, data_dir: str, out: str, cfg: FinetuneConfig | None = None, *,
             allow_task_mismatch: bool = False) -> dict[str, Any]:
    """`distilkit finetune`: fine-tune `model` on `task` once per seed; write `out/results.json` and the
    first seed's model to `out/model/` (see `FinetuneConfig.save_models`). Returns the results dict.

    Tasks with further dev sets (MNLI: dev_mismatched beside dev_matched) are scored on each; the main
    score is that of the task's eval split. A `distill_from` teacher must have been fine-tuned on `task`
    (its distilkit_finetune.json says so) unless `allow_task_mismatch`."""
    cfg = cfg or FinetuneConfig()
    wall_start = time.perf_counter()
    _check_config(cfg)
    check_output_not_input(out, resolve_model(model), cfg.distill_from and resolve_model(cfg.distill_from))
    t = get_task(task)
    data_dir = str(data_dir)

    # Data first: bad files fail before anything is loaded or written.
    train_examples = load_split(t, data_dir, "train")
    eval_examples = load_split(t, data_dir, "eval")
    also_examples = {split: load_split(t, data_dir, split) for split in t.also_eval}
    train_idx = subset_indices(len(train_examples), cfg.max_train, cfg.subset_seed)
    eval_idx = subset_indices(len(eval_examples), cfg.max_eval, cfg.subset_seed)
    also_idx = {split: subset_indices(len(ex), cfg.max_eval, cfg.subset_seed) for split, ex in also_examples.items()}
    data = {
        "train": _data_record(t, data_dir, "train", len(train_examples), len(train_idx)),
        "eval": _data_record(t, data_dir, "eval", len(eval_examples), len(eval_idx)),
        **{split: _data_record(t, data_dir, split, len(also_examples[split]), len(idx)) for split, idx in also_idx.items()},
    }
    teacher_path = None
    if cfg.distill_from is not None:  # before anything is written: a teacher for another task is refused
        teacher_path = resolve_model(cfg.distill_from)
        check_finetuned_on(teacher_path, t, "--distill-from teacher", allow_task_mismatch)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        path = resolve_model(model)
        tokenizer = load_tokenizer(path)
        positions = max_positions(load_config(path))
        teacher = None
        if teacher_path is not None:
            teacher = _load_teacher(teacher_path, t, tokenizer)
            positions = min(positions, max_positions(teacher.config))
        hp = resolve_hparams(cfg, t, positions)

        log.info("tokenizing %d train and %d eval examples", len(train_idx), len(eval_idx))
        train_feats = tokenize([train_examples[i] for i in train_idx], tokenizer, hp.max_length, hp.truncation)
        eval_feats = tokenize([eval_examples[i] for i in eval_idx], tokenizer, hp.max_length, hp.truncation)
        also_feats = {split: tokenize([also_examples[split][i] for i in idx], tokenizer, hp.max_length, hp.truncation)
                      for split, idx in also_idx.items()}
        pad_id = _pad_id(tokenizer)

        accelerator = _accelerator(cfg.mixed_precision)
        if teacher is not None:
            teacher = teacher.to(accelerator.device).eval()

        seeds: list[dict[str, Any]] = []
        saved: dict[str, str] = {}
        for i, seed in enumerate(cfg.seeds):
            set_seed(seed)  # before the head is initialised, and for dropout
            net = load_classifier(path, t)
            net, run = train(net, t, train_feats, hp, cfg, seed, pad_id, accelerator, teacher)
            start = time.perf_counter()
            logits = predict_logits(net, eval_feats, cfg.eval_batch_size, pad_id, accelerator, desc=f"seed {seed} eval")
            eval_wall = time.perf_counter() - start
            metrics, score = score_logits(t, logits, eval_feats.labels)
            also = _score_also(t, net, also_feats, cfg.eval_batch_size, pad_id, accelerator)
            net = accelerator.unwrap_model(net)
            entry = {
                "seed": seed,
                "metrics": metrics,
                "score": score,
                **run,  # train_wall_s, train_examples_per_s, steps, train_loss (per epoch)
                "eval_examples_per_s": len(eval_feats) / eval_wall,
                "n_train": len(train_feats),
                "n_eval": len(eval_feats),
                "finetuned_fingerprint": model_fingerprint(net),
                **({"also_eval": also} if also else {}),
            }
            seeds.append(entry)
            log.info("seed %d: %s score %.2f", seed, metrics, score)
            folder = MODEL_DIR if i == 0 else f"seed-{seed}"
            if cfg.save_models == "all" or (cfg.save_models == "first" and i == 0):
                meta = {"task": t.name, "base_model": model, "seed": seed, "hparams": dataclasses.asdict(hp),
                        "metrics": metrics, "score": score, **provenance()}
                _save(net, tokenizer, tmp / folder, meta)
                saved[str(seed)] = folder
            accelerator.free_memory()
            del net

        scores = [s["score"] for s in seeds]
        results = {
            **_header(t, model, path),
            "seeds": seeds,
            "score": _summary(scores),
            "eval_split": t.eval_split,
            **({"also_eval": {split: _summary([s["also_eval"][split]["score"] for s in seeds]) for split in t.also_eval}}
               if t.also_eval else {}),
            "config": to_dict(cfg),
            "allow_task_mismatch": allow_task_mismatch,
            "hparams": dataclasses.asdict(hp),
            "distill_from_resolved": teacher_path,
            "distill_from_fingerprint": checkpoint_fingerprint(teacher_path) if teacher_path else None,
            "saved_models": saved,
            "data": data,
            "majority": majority_baseline(t, [train_examples[i] for i in train_idx], [eval_examples[i] for i in eval_idx]),
            "device": str(accelerator.device),
            "wall_s": time.perf_counter() - wall_start,
            **provenance(),
        }
        atomic_write_json(tmp / "results.json", results)
    return results


def _summary(scores: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(scores)), "min": min(scores), "max": max(scores), "n": len(scores)}


def _score_also(task: Task, net, feats: dict[str, Features], batch_size: int, pad_id: int, accelerator) -> dict[str, Any]:
    """Metrics and score on each of the task's further dev sets (`Task.also_eval`; MNLI: dev_mismatched)."""
    out = {}
    for split, f in feats.items():
        metrics, score = score_logits(task, predict_logits(net, f, batch_size, pad_id, accelerator, desc=split), f.labels)
        out[split] = {"metrics": metrics, "score": score, "n_eval": len(f)}
    return out


def finetune_meta(path: str) -> dict[str, Any]:
    """The distilkit_finetune.json of a fine-tuned model folder ({} when there is none)."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("hparams", {}), dict):
        raise DistilkitError(f"{meta_file}: expected a JSON object with the fine-tuning 'task' and 'hparams'")
    return meta


def check_finetuned_on(path: str, task: Task, what: str, allow_mismatch: bool = False) -> None:
    """Refuse a model that distilkit did not fine-tune on `task` (its distilkit_finetune.json names the task)."""
    trained = finetune_meta(path).get("task")
    if trained == task.name or allow_mismatch:
        return
    if trained is None:
        raise DistilkitError(
            f"{path}: expected a model fine-tuned on {task.name} (no {META_FILE}: fine-tune it first with distilkit "
            f"finetune --task {task.name}, or pass --allow-task-mismatch to use the {what} anyway)"
        )
    raise DistilkitError(
        f"{path}: the {what} was fine-tuned on {trained} (its {META_FILE}), not {task.name} "
        "(pass --allow-task-mismatch to use it anyway)"
    )


def _load_teacher(path: str, task: Task, student_tokenizer):
    """A fine-tuned teacher for `distill_from`: same vocabulary as the student, same number of labels."""
    teacher_tok = load_tokenizer(path)
    if teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        raise DistilkitError(
            f"{path}: the teacher's tokenizer vocabulary differs from the student's; "
            "task-specific distillation needs the same vocabulary"
        )
    teacher = load_classifier(path)
    if teacher.config.num_labels != task.num_labels:
        raise DistilkitError(
            f"{path}: expected a teacher fine-tuned on {task.name} ({task.num_labels} output(s)), "
            f"got {teacher.config.num_labels} (fine-tune it first: distilkit finetune --task {task.name})"
        )
    teacher.requires_grad_(False)
    return teacher


def _header(task: Task, model: str, path: str) -> dict[str, Any]:
    """The keys results.json and eval.json share: what was scored, on what."""
    return {
        "task": task.name,
        "model": str(model),
        "model_resolved": path,
        "model_fingerprint": checkpoint_fingerprint(path) or "",
        "metric_names": list(task.metric_names),
        "score_name": task.score_name,
    }


def _pad_id(tokenizer) -> int:
    return families.pad_id(tokenizer)


def _save(model, tokenizer, folder: Path, meta: dict[str, Any]) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    atomic_write_json(folder / META_FILE, meta)
    from .modelcard import write_model_card  # README.md: Hugging Face model card
    write_model_card(folder, META_FILE)


# =========================================================================== evaluate


def evaluate(
    model: str,
    task: str,
    data_dir: str,
    max_eval: int | None = None,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    subset_seed: int = 0,
    out: str | None = None,
    allow_task_mismatch: bool = False,
) -> dict[str, Any]:
    """`distilkit evaluate`: score a fine-tuned model on the task's eval split (and `Task.also_eval`);
    write JSON to `out` if given.

    max_length / truncation default to what the model was fine-tuned with (its `distilkit_finetune.json`),
    else to the task's defaults. A model fine-tuned on another task (or not by distilkit) is refused unless
    `allow_task_mismatch`.
    """
    wall_start = time.perf_counter()
    t = get_task(task)
    if max_eval is not None and max_eval < 1:
        raise DistilkitError(f"max_eval: expected a positive number of examples, got {max_eval}")
    if batch_size < 1:
        raise DistilkitError(f"batch_size: expected a positive number of examples, got {batch_size}")
    examples = load_split(t, data_dir, "eval")
    idx = subset_indices(len(examples), max_eval, subset_seed)
    also_examples = {split: load_split(t, data_dir, split) for split in t.also_eval}

    path = resolve_model(model)
    check_finetuned_on(path, t, "model", allow_task_mismatch)
    net = load_classifier(path)
    if net.config.num_labels != t.num_labels:
        raise DistilkitError(f"{path}: model has {net.config.num_labels} output(s), task {t.name} needs {t.num_labels}")
    trained = finetune_meta(path).get("hparams", {})
    cfg = FinetuneConfig(max_length=trained.get("max_length") if max_length is None else max_length,
                         truncation=trained.get("truncation"))
    hp = resolve_hparams(cfg, t, max_positions(net.config))
    tokenizer = load_tokenizer(path)
    feats = tokenize([examples[i] for i in idx], tokenizer, hp.max_length, hp.truncation)
    also_feats = {split: tokenize([ex[i] for i in subset_indices(len(ex), max_eval, subset_seed)], tokenizer,
                                  hp.max_length, hp.truncation) for split, ex in also_examples.items()}

    accelerator = _accelerator("auto")
    net = accelerator.prepare_model(net, evaluation_mode=True)
    start = time.perf_counter()
    pad_id = _pad_id(tokenizer)
    logits = predict_logits(net, feats, batch_size, pad_id, accelerator)
    eval_wall = time.perf_counter() - start
    metrics, score = score_logits(t, logits, feats.labels)
    also = _score_also(t, net, also_feats, batch_size, pad_id, accelerator)
    results = {
        **_header(t, model, path),
        "metrics": metrics,
        "score": score,
        "eval_split": t.eval_split,
        **({"also_eval": also} if also else {}),
        "allow_task_mismatch": allow_task_mismatch,
        "n_eval": len(feats),
        "eval_examples_per_s": len(feats) / eval_wall,
        "max_eval": max_eval,
        "subset_seed": subset_seed,
        "max_length": hp.max_length,
        "truncation": hp.truncation,
        "data": {"eval": _data_record(t, data_dir, "eval", len(examples), len(idx)),
                 **{split: _data_record(t, data_dir, split, len(also_examples[split]), res["n_eval"])
                    for split, res in also.items()}},
        "device": str(accelerator.device),
        "wall_s": time.perf_counter() - wall_start,
        **provenance(),
    }
    if out is not None:
        atomic_write_json(out, results)
    return results

