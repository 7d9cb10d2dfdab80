"""Teacher adaptation (`distilkit adapt-teacher`): give a headless BERT encoder a working masked-LM head.

A sentence encoder such as all-MiniLM-L6-v2 (`minilm`) has no MLM head, so its "soft targets" would
come from random weights. `models.load_teacher` attaches a fresh head tied to the word embeddings;
this stage then trains the whole model (encoder unfrozen: a frozen encoder stalls near 7% top-1 here)
with the masked-LM loss on a prepared corpus. It is the distillation loop of `distill.train` with one
model and the MLM term only (alpha_ce = alpha_cos = 0), so checkpoints, resume, multi-process runs and
metrics behave the same.

Output: OUT is a BertForMaskedLM folder (safetensors + config + tokenizer) that `load_teacher` reads
with has_mlm_head True, plus OUT/adapt.json (held-out MLM accuracy and perplexity before and after),
OUT/metrics.jsonl and OUT/checkpoints/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import models
from .config import AdaptConfig, to_dict
from .distill import TrainTask, check_config, open_split, result_summary, train, write_model_dir
from .losses import LossConfig
from .utils import atomic_write_json, check_output_not_input, provenance, set_seed

MLM_ONLY = LossConfig(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)


def adapt_teacher(teacher: str, corpus: str, out: str, cfg: AdaptConfig | None = None, resume: bool = False) -> dict[str, Any]:
    """Masked-LM training of `teacher` (fresh head if it has none) on the corpus; returns the adapt.json dict.

    The dict has "before" / "after" held-out scores ({"mlm_accuracy", "perplexity", ...}; empty when the
    corpus has no held-out split), the training summary, config and provenance.
    """
    cfg = cfg or AdaptConfig()
    check_config(cfg)
    check_output_not_input(out, models.resolve_model(teacher), corpus)
    set_seed(cfg.seed)  # a fresh head's initialisation is part of the run
    model, had_head = models.load_teacher(teacher, warn_missing_head=False)
    tokenizer = models.load_tokenizer(teacher)
    result = train(TrainTask(model=model, tokenizer=tokenizer, loss=MLM_ONLY, kind="adapt"), corpus, out, cfg, resume=resume)

    summary = {
        "command": "adapt-teacher",
        "teacher": str(teacher),
        "teacher_resolved": models.resolve_model(teacher),
        "teacher_had_mlm_head": had_head,
        "teacher_fingerprint": result.initial_fingerprint,
        "corpus": str(corpus),
        "corpus_meta": open_split(corpus, "train").meta,
        "out": str(out),
        "before": result.eval_before.get("model", {}),
        "after": result.eval_after.get("model", {}),
        "masking_seed": cfg.eval_seed,
        **result_summary(result),
        "config": to_dict(cfg),
        "seed": cfg.seed,
        **provenance(),
    }
    if result.is_main:
        write_model_dir(model, tokenizer, Path(out), {k: v for k, v in summary.items() if k != "corpus_meta"},
                        "distilkit_adapt.json")
        atomic_write_json(Path(out) / "adapt.json", summary)
    return summary
