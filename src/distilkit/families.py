"""Model families: the one place that knows where each family keeps its parts and which objective it trains.

The paper's own code distils three families; distilkit does the same through this registry:

| family  | teachers (model_type)       | student                                   | objective                   |
|---------|-----------------------------|-------------------------------------------|-----------------------------|
| bert    | bert                        | `DistilBertForMaskedLM` (token type folded)| masked LM (`alpha_mlm`)     |
| roberta | roberta, xlm-roberta        | the teacher's class with the chosen layers| masked LM (`alpha_mlm`)     |
| gpt2    | gpt2                        | `GPT2LMHeadModel` with the chosen blocks  | causal LM (`alpha_clm`)     |

Each `Family` names the attribute paths of its embeddings, its layer list, its final norm (GPT-2's `ln_f`)
and its LM head, the teacher / student classes, and the objective. Stages ask `family_of(...)` and call the
family's methods (`build_student`, `hidden`, `lm_logits`, `backbone`); nothing else tests `model_type`.

A RoBERTa or GPT-2 student is the teacher's own class with fewer layers: the teacher's state dict, with
layer `t` renamed to student layer `s` and the other layers left out, loads strictly into it, so the
embeddings (RoBERTa's position ids that start after the padding index, its single token type), the final
norm and the tied head are the teacher's. With every layer kept the student *is* the teacher.

Causal-LM objective (GPT-2): no masking; labels are the next token (`causal_labels`), the KL term is taken
at every position, the cross-entropy (`alpha_clm`) at every position that has a next token, and the held-out
score is next-token accuracy and perplexity (`distill.evaluate_mlm` with a causal model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .utils import DistilkitError

MLM, CLM = "mlm", "clm"
IGNORE_INDEX = -100  # the label value the losses skip (the same as losses.IGNORE_INDEX)


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts (attribute paths from the LM model) and what it trains."""

    name: str
    teacher_types: tuple[str, ...]  # config.model_type of accepted teachers
    student_types: tuple[str, ...]  # config.model_type of its students
    objective: str  # MLM or CLM
    teacher_class: str  # transformers class names (imported lazily)
    student_class: str
    backbone_attr: str  # the encoder / decoder stack without the LM head
    embeddings_attr: str  # word embeddings module (from the backbone)
    layers_attr: str  # the layer list (from the backbone)
    final_norm_attr: str | None  # GPT-2's ln_f (from the backbone); None when there is none
    head_attr: str  # the LM head (from the model)
    head_keys: tuple[str, ...]  # checkpoint tensor-name fragments that show a trained LM head
    title: str = ""  # as people write it: BERT, RoBERTa, GPT-2
    student_backbone_attr: str | None = None  # when the student class differs from the teacher's (DistilBERT)

    @property
    def causal(self) -> bool:
        return self.objective == CLM

    def classes(self) -> tuple[type, type]:
        import transformers

        return getattr(transformers, self.teacher_class), getattr(transformers, self.student_class)

    def backbone(self, model: nn.Module) -> nn.Module:
        name = self.student_backbone_attr if self.student_backbone_attr and self.is_student(model) else self.backbone_attr
        return _attr(model, name)

    def is_student(self, model: nn.Module) -> bool:
        return model.config.model_type in self.student_types and model.config.model_type not in self.teacher_types

    # ---------------------------------------------------------------- forward pieces
    def hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (batch, seq, dim), after GPT-2's final norm."""
        if self.name == "bert":
            from .models import encoder_hidden

            return encoder_hidden(model, input_ids, attention_mask)
        return self.backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def lm_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states of any leading shape (..., dim)."""
        if self.name == "bert":
            from .models import mlm_logits

            return mlm_logits(model, hidden)
        return _attr(model, self.head_attr)(hidden)

    # ---------------------------------------------------------------- students
    def build_student(self, teacher: nn.Module, layers: list[int]) -> nn.Module:
        """The student of `teacher` with one layer per chosen teacher layer, weights copied."""
        if self.name == "bert":
            from .student import student_from_teacher

            return student_from_teacher(teacher, layers)
        return cut_layers(teacher, layers, f"{self.backbone_attr}.{self.layers_attr}.")


@torch.no_grad()
def cut_layers(teacher: nn.Module, layers: list[int], prefix: str) -> nn.Module:
    """A model of the teacher's class and config with only `layers` (in that order) of the list at `prefix`."""
    from .student import check_layers

    check_layers(layers, teacher.config.num_hidden_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    config.architectures = [type(teacher).__name__]
    student = type(teacher)(config)
    rename = {str(t): str(s) for s, t in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if index not in rename:
                continue
            key = f"{prefix}{rename[index]}.{rest}"
        state[key] = value
    student.load_state_dict(state, strict=True)
    student.eval()
    return student


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="bert", teacher_types=("bert",), student_types=("distilbert",), objective=MLM,
            teacher_class="BertForMaskedLM", student_class="DistilBertForMaskedLM",
            backbone_attr="bert", embeddings_attr="embeddings.word_embeddings", layers_attr="encoder.layer",
            final_norm_attr=None, head_attr="cls", head_keys=("predictions.transform", "vocab_transform"),
            title="BERT", student_backbone_attr="distilbert",
        ),
        Family(
            name="roberta", teacher_types=("roberta", "xlm-roberta"), student_types=("roberta", "xlm-roberta"),
            objective=MLM, teacher_class="AutoModelForMaskedLM", student_class="AutoModelForMaskedLM",
            backbone_attr="roberta", embeddings_attr="embeddings.word_embeddings", layers_attr="encoder.layer",
            final_norm_attr=None, head_attr="lm_head", head_keys=("lm_head.dense",),
            title="RoBERTa",
        ),
        Family(
            name="gpt2", teacher_types=("gpt2",), student_types=("gpt2",), objective=CLM,
            teacher_class="GPT2LMHeadModel", student_class="GPT2LMHeadModel",
            backbone_attr="transformer", embeddings_attr="wte", layers_attr="h",
            final_norm_attr="ln_f", head_attr="lm_head", head_keys=("wte",),  # GPT-2's head is tied to wte
            title="GPT-2",
        ),
    )
}


def supported() -> str:
    return ", ".join(f"{f.title}-family ({', '.join(f.teacher_types)})" for f in FAMILIES.values())


def by_model_type(model_type: str, *, role: str = "teacher", where: str = "") -> Family:
    """The family whose teachers (role 'teacher') or students (role 'student') have this model_type."""
    for fam in FAMILIES.values():
        if model_type in (fam.teacher_types if role == "teacher" else fam.student_types):
            return fam
    kinds = supported() if role == "teacher" else ", ".join(
        f"{'/'.join(f.student_types)} ({f.name})" for f in FAMILIES.values())
    raise DistilkitError(f"{where + ': ' if where else ''}{role} model_type '{model_type}' is not supported "
                         f"(supported {role}s: {kinds})")


def family_of(model_or_config: Any) -> Family:
    """The family of a model (or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    mtype = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if mtype in fam.teacher_types or mtype in fam.student_types:
            return fam
    raise DistilkitError(f"model_type '{mtype}' is not supported (supported: {supported()})")


def load_model(path: str, role: str, where: str) -> tuple[nn.Module, Family]:
    """Load a teacher or student LM (safetensors only, no remote code) through its family's class."""
    import warnings

    from .models import load_config, load_pretrained  # one-line errors for bad folders, pickle-only weights

    config = load_config(path)
    fam = by_model_type(config.model_type, role=role, where=where)
    cls = fam.classes()[0 if role == "teacher" else 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_pretrained(cls, path, role)
    return model, fam


# =========================================================================== causal-LM objective


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels: position i predicts token i+1; the last position and padding get IGNORE_INDEX."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        nxt = torch.zeros_like(attention_mask, dtype=torch.bool)
        nxt[:, :-1] = attention_mask[:, 1:].bool()
        labels = labels.masked_fill(~(nxt & attention_mask.bool()), IGNORE_INDEX)
    return labels


def attention_of(fam: Family, ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Attention mask of corpus blocks: padding off for masked-LM families; a causal family's blocks are
    packed without padding and its end-of-text token (often also its pad token) is real input."""
    if fam.causal or tokenizer.pad_token_id is None:
        return torch.ones_like(ids)
    return (ids != tokenizer.pad_token_id).long()


def causal_batch(ids: torch.Tensor, tokenizer: Any, fam: Family) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of a causal-LM batch: no masking, next-token labels."""
    attention = attention_of(fam, ids, tokenizer)
    return ids, attention, causal_labels(ids, attention)


def loss_weights(fam: Family, cfg: Any) -> dict[str, Any]:
    """The loss configuration's fields for this family: a causal family's hard-target term is the causal-LM
    cross-entropy weighted by `alpha_clm` (in the slot of `alpha_mlm`), with KL at every position."""
    if not fam.causal:
        return {"alpha_mlm": cfg.alpha_mlm, "kl_positions": cfg.kl_positions}
    return {"alpha_mlm": cfg.alpha_clm, "kl_positions": "all"}


# =========================================================================== fine-tuning


def prepare_classifier(model: nn.Module) -> nn.Module:
    """GPT-2 classifies from the last non-padding token and needs a pad id: its end-of-text token when unset."""
    config = model.config
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        config.pad_token_id = config.eos_token_id
    return model


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the pad token, else end-of-text (GPT-2, as `prepare_classifier`), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def with_pad_token(tokenizer: Any) -> Any:
    """The tokenizer, with end-of-text as its pad token when it has none (GPT-2), for batched padding."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lm_auto_class(config: Any) -> type:
    """`AutoModelForCausalLM` for a causal family's config, `AutoModelForMaskedLM` otherwise."""
    import transformers

    causal = any(config.model_type in f.teacher_types + f.student_types for f in FAMILIES.values() if f.causal)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM


def uses_token_types(model: nn.Module) -> bool:
    """Whether segment ids carry information: not for RoBERTa (one token type) nor GPT-2 (none; its forward
    would look `token_type_ids` up in the word embeddings)."""
    return getattr(model.config, "type_vocab_size", 0) > 1


# =========================================================================== corpus packing


@dataclass(frozen=True)
class Packing:
    """How `prepare-corpus` frames a block: `[CLS] body [SEP]` (masked-LM tokenizers), or, for a causal-LM
    tokenizer without [CLS]/[SEP] (GPT-2), a bare body with the end-of-text token after every line."""

    cls_id: int | None
    sep_id: int | None
    eos_id: int | None  # appended after every line (document)
    body: int  # stream tokens per block
    text: str  # for meta.json


def packing(tok: Any, block_size: int, where: str) -> Packing:
    if tok.cls_token_id is not None and tok.sep_token_id is not None:
        return Packing(tok.cls_token_id, tok.sep_token_id, None, block_size - 2,
                       "continuous token stream over all lines and files, no separator between documents; "
                       "each block = [CLS] + block_size-2 tokens + [SEP], no padding; final partial block dropped")
    if tok.eos_token_id is not None:
        return Packing(None, None, tok.eos_token_id, block_size,
                       "continuous token stream over all lines and files, the end-of-text token after every line; "
                       "each block = block_size tokens, no [CLS]/[SEP], no padding; final partial block dropped")
    raise DistilkitError(f"{where}: tokenizer has neither [CLS]/[SEP] tokens (masked-LM families) nor an "
                         "end-of-text token (causal-LM families)")
