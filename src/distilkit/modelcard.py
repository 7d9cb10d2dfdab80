"""Model cards: a Hugging Face `README.md` in every model folder distilkit saves.

`write_model_card(folder, info_name)` reads the info JSON a stage has just written into `folder`
(`distilkit_student.json`, `distilkit_adapt.json`, `distilkit_distill.json`, `distilkit_finetune.json`)
and writes `folder/README.md`: YAML front matter built with `huggingface_hub.ModelCardData` (the Hub's
own schema: `base_model`, `library_name: transformers`, `tags: [distillation, distilkit]`, `datasets`,
`metrics`, `license` when known), then a short body saying how the model was made: the command, the
config, tokens seen, held-out masked-LM accuracy of teacher and student, downstream scores when known,
distilkit version and commit.

`base_model` is the root of the model tree as the Hub expects it: a hub id when one is known (the
bundled `minilm` is `sentence-transformers/all-MiniLM-L6-v2`; a distilkit folder passes on the
`base_model` of its own card), else the teacher's path as given. `license` is inherited the same way.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from .utils import atomic_write_text

CARD = "README.md"
#: Hub ids of the models distilkit ships under an alias (models.ALIASES).
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
#: Hub datasets of the tasks (tasks.TASKS) and of corpora recognised by file name.
TASK_DATASETS = {
    "cola": "nyu-mll/glue", "mrpc": "nyu-mll/glue", "sst2": "nyu-mll/glue", "rte": "nyu-mll/glue",
    "stsb": "nyu-mll/glue", "wnli": "nyu-mll/glue", "imdb": "stanfordnlp/imdb",
}
CORPUS_DATASETS = {"wikitext": "Salesforce/wikitext", "bookcorpus": "bookcorpus/bookcorpus", "wiki": "wikimedia/wikipedia"}
#: Hub metric ids of distilkit's metric names (tasks.Task.metric_names).
METRIC_IDS = {"accuracy": "accuracy", "f1": "f1", "matthews_corr": "matthews_correlation",
              "pearson": "pearsonr", "spearman": "spearmanr"}
KINDS = {
    "distilkit_student.json": "student",
    "distilkit_adapt.json": "adapt",
    "distilkit_distill.json": "distill",
    "distilkit_finetune.json": "finetune",
}


# =========================================================================== reading


def read_card_data(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of `folder/README.md` as a dict ({} when there is none or it does not parse)."""
    path = Path(folder) / CARD
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        data = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def lineage(model: str | os.PathLike | None) -> dict[str, Any]:
    """{"base_model", "license"} of the model a new one is derived from (see module docstring)."""
    if model is None:
        return {}
    name = str(model)
    if name in HUB_IDS:
        from .models import resolve_model

        return {"base_model": HUB_IDS[name], "license": read_card_data(resolve_model(name)).get("license")}
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return {"base_model": name}  # a hub id
    data = read_card_data(folder)
    for alias, hub_id in HUB_IDS.items():  # the bundled model's folder, named by its path
        if _same_folder(folder, alias):
            return {"base_model": hub_id, "license": data.get("license")}
    base = data.get("base_model") if "distilkit" in (data.get("tags") or []) else None
    return {"base_model": base or name, "license": data.get("license")}


def _same_folder(folder: Path, alias: str) -> bool:
    from .models import resolve_model
    from .utils import DistilkitError

    try:
        return folder.resolve() == Path(resolve_model(alias)).resolve()
    except DistilkitError:
        return False


# =========================================================================== writing


def write_model_card(folder: str | os.PathLike, info_name: str) -> Path:
    """Write `folder/README.md` from the stage's info JSON `folder/info_name` (see module docstring)."""
    folder = Path(folder)
    info = json.loads((folder / info_name).read_text(encoding="utf-8"))
    kind = KINDS.get(info_name, "model")
    text = render_card(kind, info)
    atomic_write_text(folder / CARD, text)
    return folder / CARD


def render_card(kind: str, info: dict[str, Any]) -> str:
    """The card's text: YAML front matter (huggingface_hub.ModelCardData) and a markdown body."""
    from huggingface_hub import ModelCardData

    parent = {"student": info.get("teacher"), "adapt": info.get("teacher"), "distill": info.get("teacher"),
              "finetune": info.get("base_model")}.get(kind)
    origin = lineage(parent)
    data = ModelCardData(
        base_model=origin.get("base_model"),
        library_name="transformers",
        license=origin.get("license"),
        tags=["distillation", "distilkit", *(["masked-lm"] if kind != "finetune" else ["text-classification"])],
        datasets=_datasets(kind, info) or None,
        metrics=_metrics(kind, info) or None,
        pipeline_tag="fill-mask" if kind != "finetune" else "text-classification",
    )
    body = _BODIES[kind](info) if kind in _BODIES else []
    return "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body + _footer(info)) + "\n"


def _datasets(kind: str, info: dict[str, Any]) -> list[str]:
    if kind == "finetune":
        return [TASK_DATASETS[info["task"]]] if info.get("task") in TASK_DATASETS else []
    sources = ((info.get("corpus_meta") or {}).get("sources") or {}).get("train") or []
    names = [str(s.get("path", "")).lower() for s in sources] + [str(info.get("corpus", "")).lower()]
    return sorted({hub for key, hub in CORPUS_DATASETS.items() if any(key in Path(n).as_posix() for n in names)})[:1]


def _metrics(kind: str, info: dict[str, Any]) -> list[str]:
    if kind == "finetune":
        return sorted({METRIC_IDS.get(m, m) for m in (info.get("metrics") or {})})
    if kind in ("adapt", "distill"):
        return ["accuracy", "perplexity"]
    return []


def _command() -> str:
    """The command line that is running now (`distilkit ...` when it is the CLI)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cli.py", "distilkit", "__main__.py"):
        argv[0] = "distilkit"
    return " ".join(shlex.quote(a) for a in argv)


def _mlm(score: dict | None) -> str:
    if not score or "mlm_accuracy" not in score:
        return "not measured"
    ppl = f", perplexity {score['perplexity']:.1f}" if "perplexity" in score else ""
    return f"{score['mlm_accuracy']:.2%} top-1{ppl}"


def _config_block(config: Any) -> list[str]:
    if not config:
        return []
    return ["", "Config:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]


def _student_body(info: dict[str, Any]) -> list[str]:
    return [
        "# DistilBERT student (initialised, not yet distilled)", "",
        f"A `DistilBertForMaskedLM` cut from the teacher `{info.get('teacher')}` by "
        f"distilkit (`distilkit init-student`): teacher layers {info.get('layers')} copied, token-type "
        "embedding row 0 folded into the position embeddings, MLM head copied.", "",
        f"- parameters: {_m(info.get('student_params'))} (teacher {_m(info.get('teacher_params'))}); "
        f"without the MLM head {_m(info.get('student_params_no_head'))} vs {_m(info.get('teacher_params_no_head'))}",
        "- Distil it next: `distilkit distill --teacher TEACHER --student THIS_FOLDER --corpus CORPUS --out OUT`.",
    ]


def _trained_body(title: str, what: str, info: dict[str, Any], scores: list[str]) -> list[str]:
    return [
        f"# {title}", "", what, "",
        f"- teacher: `{info.get('teacher')}`",
        f"- corpus: `{info.get('corpus')}`; {info.get('steps')} optimizer steps, "
        f"{_int(info.get('tokens'))} tokens seen ({info.get('world_size', 1)} process(es))",
        *scores,
        *_config_block(info.get("config")),
    ]


def _adapt_body(info: dict[str, Any]) -> list[str]:
    return _trained_body(
        "BERT teacher adapted to masked-LM",
        "The whole model trained with the masked-LM loss (a fresh head tied to the word embeddings where the "
        "teacher had none), so that its soft targets are worth distilling (`distilkit adapt-teacher`).",
        info,
        [f"- held-out masked-LM accuracy: before {_mlm(info.get('before'))}, after {_mlm(info.get('after'))}"],
    )


def _distill_body(info: dict[str, Any]) -> list[str]:
    ev = info.get("eval") or {}
    cfg = info.get("config") or {}
    return _trained_body(
        "DistilBERT student",
        "Distilled from the teacher with the triple loss of Sanh et al. 2019 (soft-target KL "
        f"x{cfg.get('alpha_ce')}, masked-LM x{cfg.get('alpha_mlm')}, hidden-state cosine x{cfg.get('alpha_cos')}, "
        f"temperature {cfg.get('temperature')}) by `distilkit distill`.",
        info,
        [f"- held-out masked-LM accuracy: teacher {_mlm(ev.get('teacher'))}; student before distillation "
         f"{_mlm(ev.get('student_before'))}, after {_mlm(ev.get('student_after'))}",
         "- downstream scores: not known yet (run `distilkit finetune`)"],
    )


def _finetune_body(info: dict[str, Any]) -> list[str]:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in (info.get("metrics") or {}).items())
    score = info.get("score")
    return [
        f"# {info.get('task')}: fine-tuned sequence classifier", "",
        f"`{info.get('base_model')}` fine-tuned on {info.get('task')} by `distilkit finetune` (seed {info.get('seed')}).",
        "",
        f"- evaluation split: {metrics}" + (f"; score x100 {score:.2f}" if isinstance(score, (int, float)) else ""),
        *_config_block(info.get("hparams")),
    ]


_BODIES = {"student": _student_body, "adapt": _adapt_body, "distill": _distill_body, "finetune": _finetune_body}


def _footer(info: dict[str, Any]) -> list[str]:
    return [
        "", "## How it was made", "",
        f"- command: `{_command()}`",
        f"- distilkit {info.get('distilkit_version')}, commit `{info.get('git_commit')}`; "
        f"torch {info.get('torch')}, transformers {info.get('transformers')}",
        "- load it with `transformers` (`AutoModel.from_pretrained(THIS_FOLDER)`); weights are safetensors.",
    ]


def _m(x: Any) -> str:
    return f"{x / 1e6:.1f}M" if isinstance(x, (int, float)) else "?"


def _int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)
