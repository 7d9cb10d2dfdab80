"""Build a DistilBERT student from a BERT teacher (paper section 3, "Student initialization").

The student has the teacher's width, heads and FFN size, no token-type embeddings and no pooler,
and one layer for each chosen teacher layer (default: one out of two, starting at 0). Weights are
copied from the teacher; token-type row 0 is folded into the position embeddings so that, for
single-segment input, the student's embedding output equals the teacher's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from .families import family_of
from .models import count_parameters, load_teacher, load_tokenizer, resolve_model
from .utils import DistilkitError, atomic_dir, atomic_write_json, check_output_not_input, output_occupied, provenance

log = logging.getLogger(__name__)


def default_layers(n_teacher_layers: int, every: int = 2) -> list[int]:
    """One teacher layer out of `every`, starting at 0 (the paper's choice)."""
    if every < 1:
        raise DistilkitError(f"--every must be >= 1, got {every}")
    return list(range(0, n_teacher_layers, every))


def parse_layers(spec: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4]: teacher layers in increasing order, each once (empty items and '2,0' are refused)."""
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise DistilkitError(f"--layers: expected comma-separated integers such as 0,2,4, got '{spec}'") from None
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise DistilkitError(f"--layers: expected teacher layers in increasing order, each once (such as 0,2,4), got '{spec}'")
    return layers


def check_layers(layers: list[int], n_teacher_layers: int) -> None:
    if not layers:
        raise DistilkitError("layer list is empty: give at least one teacher layer")
    for i in layers:
        if not 0 <= i < n_teacher_layers:
            raise DistilkitError(f"layer {i} out of range: the teacher has layers 0..{n_teacher_layers - 1}")
    if len(set(layers)) != len(layers):
        raise DistilkitError(f"layer list {layers} repeats a layer")


def student_config(teacher: BertConfig, n_layers: int) -> DistilBertConfig:
    if teacher.hidden_act not in ("gelu", "relu"):
        raise DistilkitError(f"teacher activation '{teacher.hidden_act}' is not supported by DistilBERT (gelu/relu)")
    if getattr(teacher, "position_embedding_type", "absolute") != "absolute":
        raise DistilkitError("teacher must use absolute position embeddings")
    return DistilBertConfig(
        vocab_size=teacher.vocab_size,
        max_position_embeddings=teacher.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=teacher.num_attention_heads,
        dim=teacher.hidden_size,
        hidden_dim=teacher.intermediate_size,
        dropout=teacher.hidden_dropout_prob,
        attention_dropout=teacher.attention_probs_dropout_prob,
        activation=teacher.hidden_act,
        initializer_range=teacher.initializer_range,
        pad_token_id=teacher.pad_token_id,
        tie_word_embeddings=getattr(teacher, "tie_word_embeddings", True),
    )


@torch.no_grad()
def student_from_teacher(teacher: BertForMaskedLM, layers: list[int]) -> DistilBertForMaskedLM:
    """Copy embeddings, the chosen layers and the MLM head of `teacher` into a new DistilBERT."""
    tcfg = teacher.config
    check_layers(layers, tcfg.num_hidden_layers)
    student = DistilBertForMaskedLM(student_config(tcfg, len(layers)))
    student.eval()
    tb, sb = teacher.bert, student.distilbert

    # Embeddings: word, position (+ token-type row 0 folded in), LayerNorm.
    te, se = tb.embeddings, sb.embeddings
    se.word_embeddings.weight.copy_(te.word_embeddings.weight)
    se.position_embeddings.weight.copy_(te.position_embeddings.weight + te.token_type_embeddings.weight[0])
    se.LayerNorm.load_state_dict(te.LayerNorm.state_dict())
    if abs(te.LayerNorm.eps - se.LayerNorm.eps) > 0:
        se.LayerNorm.eps = te.LayerNorm.eps

    # Transformer layers.
    for s_idx, t_idx in enumerate(layers):
        t, s = tb.encoder.layer[t_idx], sb.transformer.layer[s_idx]
        s.attention.q_lin.load_state_dict(t.attention.self.query.state_dict())
        s.attention.k_lin.load_state_dict(t.attention.self.key.state_dict())
        s.attention.v_lin.load_state_dict(t.attention.self.value.state_dict())
        s.attention.out_lin.load_state_dict(t.attention.output.dense.state_dict())
        s.sa_layer_norm.load_state_dict(t.attention.output.LayerNorm.state_dict())
        s.ffn.lin1.load_state_dict(t.intermediate.dense.state_dict())
        s.ffn.lin2.load_state_dict(t.output.dense.state_dict())
        s.output_layer_norm.load_state_dict(t.output.LayerNorm.state_dict())
        s.sa_layer_norm.eps = t.attention.output.LayerNorm.eps
        s.output_layer_norm.eps = t.output.LayerNorm.eps

    # MLM head: transform dense + LayerNorm, decoder (tied or not) + bias.
    head = teacher.cls.predictions
    student.vocab_transform.load_state_dict(head.transform.dense.state_dict())
    student.vocab_layer_norm.load_state_dict(head.transform.LayerNorm.state_dict())
    student.vocab_layer_norm.eps = head.transform.LayerNorm.eps
    if not student.config.tie_word_embeddings:
        student.vocab_projector.weight.copy_(head.decoder.weight)
    student.vocab_projector.bias.copy_(head.bias)
    return student


@dataclass
class StudentSummary:
    out: str
    teacher: str
    layers: list[int]
    teacher_had_mlm_head: bool
    teacher_params: int
    student_params: int
    teacher_params_no_head: int
    student_params_no_head: int


def init_student(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    layers: list[int] | None = None,
    every: int = 2,
    overwrite: bool = False,
) -> StudentSummary:
    """`distilkit init-student`: build, save (safetensors + config + tokenizer) and summarise."""
    out = Path(out)
    check_output_not_input(out, resolve_model(teacher))
    if output_occupied(out) and not overwrite:
        raise DistilkitError(f"{out}: output folder exists and is not empty (use --overwrite)")
    tmodel, had_head = load_teacher(teacher)
    n = tmodel.config.num_hidden_layers
    layers = default_layers(n, every) if layers is None else list(layers)
    check_layers(layers, n)
    family = family_of(tmodel)  # families.py: where the parts live, which student class
    student = family.build_student(tmodel, layers)
    tokenizer = load_tokenizer(teacher)

    summary = StudentSummary(
        out=str(out),
        teacher=str(teacher),
        layers=layers,
        teacher_had_mlm_head=had_head,
        teacher_params=count_parameters(tmodel),
        student_params=count_parameters(student),
        teacher_params_no_head=count_parameters(family.backbone(tmodel)),
        student_params_no_head=count_parameters(family.backbone(student)),
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "distilkit_student.json",
            {**summary.__dict__, "family": family.name, "teacher_resolved": resolve_model(teacher), **provenance()},
        )
        from .modelcard import write_model_card  # README.md: Hugging Face model card
        write_model_card(tmp, "distilkit_student.json")
    return summary
