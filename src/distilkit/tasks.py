"""Downstream tasks: GLUE (CoLA, MRPC, SST-2, RTE, STS-B, WNLI, MNLI, QNLI, QQP) and IMDb.

One registry, `TASKS`, maps a task name to a `Task`: where its files are, how to read them,
its label set, its metric and its "paper score" (the number the DistilBERT paper's Table 1/2 print,
metric x 100). Loaders check every row and raise `DistilkitError("FILE:LINE: expected ...")` on bad input.
MNLI is scored on dev_matched (the paper's "MNLI-m"); dev_mismatched is scored beside it (`Task.also_eval`).

GLUE TSVs are split at tabs with no quoting: their sentences contain bare quotes. The MRPC files start
with a UTF-8 BOM, which is dropped. Files are read as UTF-8 (gzip accepted) by `corpus.TextSource`.

A data dir of the form `hf:` or `hf:PATH[:CONFIG]` loads the task from the Hugging Face hub with the
optional `datasets` package (online only; `hf:` alone uses the task's usual hub id, e.g. `nyu-mll/glue:cola`).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .corpus import TextSource
from .utils import DistilkitError, fail_at


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskDefaults:
    """Fine-tuning hyper-parameters used where `FinetuneConfig` leaves a field as None."""

    lr: float = 2e-5
    batch_size: int = 32
    epochs: float = 3
    warmup_ratio: float = 0.1
    max_length: int = 128
    truncation: str = "head"  # "head": keep the first tokens; "head_tail": see `truncate_ids`


@dataclass(frozen=True)
class TsvFormat:
    """A GLUE-style TSV. `names` are its columns as GLUE's header row names them (documented names where the
    file has no header, CoLA); `text` and `label` name the columns read.

    With a header, the first row must name every column read (a file without its header would otherwise lose
    its first example); columns are found by name, so MNLI's 12-column train and 16-column dev files share one
    format. Every later row must have as many columns as the header. Without a header, rows have
    `len(names)` columns.
    """

    names: tuple[str, ...]
    text: tuple[str, ...]
    label: str
    header: bool = True
    #: Skip (with a warning) up to `MAX_SKIPPED` rows with a wrong column count or an empty text, instead of
    #: stopping: GLUE's own QQP train.tsv has a question split over two lines and two empty questions.
    skip_broken_rows: bool = False

    @property
    def describe(self) -> str:
        return ", ".join(self.names)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    splits: dict[str, tuple[str, ...]]  # split -> file paths (or globs) relative to the data dir
    eval_split: str  # the split scored for the paper ("dev" for GLUE, "test" for IMDb)
    labels: tuple[str, ...]  # label values as written in the files (empty for regression)
    metric_names: tuple[str, ...]
    score_name: str
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    score_fn: Callable[[dict[str, float]], float]
    defaults: TaskDefaults = field(default_factory=TaskDefaults)
    tsv: TsvFormat | None = None  # None: JSON lines (IMDb)
    hub: tuple[str, str | None, dict[str, str], tuple[str, ...]] | None = None  # path, config, split map, text fields
    label_names: tuple[str, ...] = ()  # human names for config.json id2label
    also_eval: tuple[str, ...] = ()  # further splits scored beside eval_split (MNLI: dev_mismatched)

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.tsv is not None and len(self.tsv.text) == 2


# =========================================================================== metrics
# `preds` are class ids (classification) or scores (regression). Values are plain floats in [-1, 1] / [0, 1].


def _corr_or_zero(value: float) -> float:
    """Correlations of a constant vector are undefined; report 0 (as sklearn's MCC does) instead of NaN."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score

    return {"accuracy": float(accuracy_score(labels, preds))}


def matthews(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import matthews_corrcoef

    return {"matthews_corr": _corr_or_zero(matthews_corrcoef(labels, preds))}


def f1_and_accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {"f1": float(f1_score(labels, preds, pos_label=1, zero_division=0)), **accuracy(preds, labels)}


def pearson_and_spearman(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {
        "pearson": _corr_or_zero(pearsonr(preds, labels).statistic),
        "spearman": _corr_or_zero(spearmanr(preds, labels).statistic),
    }


def _x100(name: str) -> Callable[[dict[str, float]], float]:
    return lambda m: 100.0 * m[name]


def _mean_x100(*names: str) -> Callable[[dict[str, float]], float]:
    return lambda m: 100.0 * sum(m[n] for n in names) / len(names)


# =========================================================================== registry

_PAIR = TsvFormat(("index", "sentence1", "sentence2", "label"), ("sentence1", "sentence2"), "label")
_COLA = TsvFormat(("source", "label", "author mark", "sentence"), ("sentence",), "label", header=False)
_MNLI = TsvFormat(
    ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
     "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"),  # dev: label1..label5, gold_label
    ("sentence1", "sentence2"), "gold_label")
_ACCURACY = dict(metric_names=("accuracy",), score_name="acc x100", metric_fn=accuracy, score_fn=_x100("accuracy"))
_MCC = dict(metric_names=("matthews_corr",), score_name="mcc x100", metric_fn=matthews, score_fn=_x100("matthews_corr"))


def _glue(name: str, description: str, tsv: TsvFormat, fields: tuple[str, ...], hub_splits: dict[str, str] | None = None,
          **kw) -> Task:
    """A GLUE task: `<name>/{train,dev}.tsv` (unless `splits` is given), scored on dev, `nyu-mll/glue` on the hub."""
    kw.setdefault("splits", {"train": (f"{name}/train.tsv",), "dev": (f"{name}/dev.tsv",)})
    kw.setdefault("labels", ("0", "1"))
    kw.setdefault("eval_split", "dev")
    hub = ("nyu-mll/glue", name, hub_splits or {"train": "train", "dev": "validation"}, fields)
    return Task(name=name, description=description, tsv=tsv, hub=hub, **kw)


_TASK_LIST = [
    _glue("cola", "CoLA as shipped by GLUE (= CoLA v1.0), Matthews corr.", _COLA, ("sentence",),
          splits={"train": ("cola/glue/train.tsv",), "dev": ("cola/glue/dev.tsv",)},
          label_names=("unacceptable", "acceptable"), **_MCC),
    Task(
        name="cola-v1.1",
        description="CoLA v1.1 public release (dev = in-domain + out-of-domain dev), Matthews corr.",
        splits={
            "train": ("cola/raw/in_domain_train.tsv",),
            "dev": ("cola/raw/in_domain_dev.tsv", "cola/raw/out_of_domain_dev.tsv"),
        },
        eval_split="dev", tsv=_COLA, labels=("0", "1"), label_names=("unacceptable", "acceptable"), **_MCC,
    ),
    _glue("mrpc", "MRPC (GLUE format), F1 and accuracy; paper score = their mean.",
          TsvFormat(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), ("#1 String", "#2 String"), "Quality"), ("sentence1", "sentence2"),
          label_names=("not_equivalent", "equivalent"), defaults=TaskDefaults(epochs=5),
          metric_names=("f1", "accuracy"), score_name="mean(f1, acc) x100",
          metric_fn=f1_and_accuracy, score_fn=_mean_x100("f1", "accuracy")),
    _glue("sst2", "SST-2 (GLUE), accuracy.", TsvFormat(("sentence", "label"), ("sentence",), "label"), ("sentence",),
          label_names=("negative", "positive"), **_ACCURACY),
    _glue("rte", "RTE (GLUE), accuracy.", _PAIR, ("sentence1", "sentence2"),
          labels=("entailment", "not_entailment"), **_ACCURACY),
    _glue("stsb", "STS-B (GLUE), regression on 0-5 scores, Pearson and Spearman; paper score = their mean.",
          TsvFormat(("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                     "score"), ("sentence1", "sentence2"), "score"),
          ("sentence1", "sentence2"), labels=(), metric_names=("pearson", "spearman"),
          score_name="mean(pearson, spearman) x100", metric_fn=pearson_and_spearman,
          score_fn=_mean_x100("pearson", "spearman")),
    _glue("wnli", "WNLI (GLUE), accuracy.", _PAIR, ("sentence1", "sentence2"),
          label_names=("not_entailment", "entailment"), defaults=TaskDefaults(epochs=5), **_ACCURACY),
    _glue("mnli", "MultiNLI (GLUE), accuracy on dev_matched (the paper's MNLI-m); dev_mismatched scored beside it.",
          _MNLI, ("premise", "hypothesis"), labels=("entailment", "neutral", "contradiction"),
          splits={"train": ("mnli/train.tsv",), "dev_matched": ("mnli/dev_matched.tsv",),
                  "dev_mismatched": ("mnli/dev_mismatched.tsv",)},
          eval_split="dev_matched", also_eval=("dev_mismatched",),
          hub_splits={"train": "train", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
          **_ACCURACY),
    _glue("qnli", "QNLI (GLUE), accuracy.", TsvFormat(("index", "question", "sentence", "label"), ("question", "sentence"),
          "label"), ("question", "sentence"), labels=("entailment", "not_entailment"), **_ACCURACY),
    _glue("qqp", "QQP (GLUE), F1 and accuracy; paper score = their mean.",
          TsvFormat(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), ("question1", "question2"),
                    "is_duplicate", skip_broken_rows=True), ("question1", "question2"), label_names=("not_duplicate", "duplicate"),
          metric_names=("f1", "accuracy"), score_name="mean(f1, acc) x100",
          metric_fn=f1_and_accuracy, score_fn=_mean_x100("f1", "accuracy")),
    Task(
        name="imdb",
        description="IMDb movie reviews (25k train / 25k test), accuracy on the test split.",
        splits={"train": ("imdb/train-*.jsonl.gz",), "test": ("imdb/test-*.jsonl.gz",)},
        eval_split="test",
        labels=("0", "1"),
        label_names=("neg", "pos"),
        defaults=TaskDefaults(lr=2e-5, batch_size=16, epochs=2, max_length=512, truncation="head_tail"),
        hub=("stanfordnlp/imdb", None, {"train": "train", "test": "test"}, ("text",)),
        **_ACCURACY,
    ),
]

#: name -> Task
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DistilkitError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None


# =========================================================================== loading

#: The range of STS-B similarity scores (the only regression task).
STSB_RANGE = (0.0, 5.0)


def split_name(task: Task, split: str) -> str:
    """Resolve 'eval' to the task's scored split; check the split exists."""
    split = task.eval_split if split == "eval" else split
    if split not in task.splits:
        raise DistilkitError(f"task {task.name} has no split '{split}'; known: {', '.join(task.splits)}, eval")
    return split


def split_files(task: Task, data_dir: str | Path, split: str) -> list[Path]:
    """The files of one split (IMDb shards in name order). Raises when any is missing."""
    split = split_name(task, split)
    data_dir = Path(data_dir)
    files: list[Path] = []
    for pattern in task.splits[split]:
        found = sorted(data_dir.glob(pattern)) if "*" in pattern else [data_dir / pattern]
        found = [f for f in found if f.is_file()]
        if not found:
            raise fail_at(data_dir / pattern, None, f"expected the {task.name} {split} split file(s) here (not found)")
        files += found
    return files


def task_files(task: Task | str, data_dir: str | Path) -> list[Path]:
    """Every file of every split of a task that exists under `data_dir` (what a cached result depends on)."""
    task = get_task(task) if isinstance(task, str) else task
    data_dir = Path(data_dir)
    files: list[Path] = []
    for patterns in task.splits.values():
        for pattern in patterns:
            files += [f for f in sorted(data_dir.glob(pattern)) if f.is_file()]
    return files


def load_split(task: Task | str, data_dir: str | Path, split: str) -> list[Example]:
    """Read one split ('train', 'dev'/'test', or 'eval' for the task's scored split) into `Example`s."""
    task = get_task(task) if isinstance(task, str) else task
    if str(data_dir).startswith("hf:"):
        return _load_hub(task, str(data_dir)[3:], split)
    files = split_files(task, data_dir, split)
    examples: list[Example] = []
    for path in files:
        examples += _read_tsv(task, path) if task.tsv is not None else _read_jsonl(task, path)
    if not examples:
        raise fail_at(files[0], None, f"expected at least one {task.name} example")
    return examples


def _label(task: Task, raw: str, path: Path, line: int) -> int | float:
    if task.is_regression:
        lo, hi = STSB_RANGE
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not lo <= value <= hi:  # also rejects NaN
            raise fail_at(path, line, f"expected a score between {lo:g} and {hi:g}, got '{raw}'")
        return value
    try:
        return task.labels.index(raw)
    except ValueError:
        raise fail_at(path, line, f"expected label {' or '.join(task.labels)}, got '{raw}'") from None


def _text(raw: object, path: Path, line: int, what: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise fail_at(path, line, f"expected a non-empty {what}")
    return raw


#: At most this many broken rows (or 0.1% of the rows, if more) are skipped where `TsvFormat.skip_broken_rows`.
MAX_SKIPPED = 10


def _read_tsv(task: Task, path: Path) -> list[Example]:
    """Rows split at tabs, no quoting (GLUE's sentences contain bare quotes); see `TsvFormat` for the header check."""
    fmt = task.tsv
    assert fmt is not None
    wanted = (*fmt.text, fmt.label)
    width, cols = len(fmt.names), [fmt.names.index(n) for n in wanted]
    out: list[Example] = []
    skipped: list[tuple[int, str]] = []  # (line, what was expected)
    for line, raw in TextSource(path).raw_lines():
        raw = raw.rstrip("\r\n")
        if not raw:  # blank line
            continue
        row = raw.split("\t")
        if fmt.header and line == 1:
            if not set(wanted) <= set(row):
                raise fail_at(path, line, f"expected GLUE's header row naming the columns ({fmt.describe}), "
                                          f"got '{raw[:60]}'")
            width, cols = len(row), [row.index(n) for n in wanted]
            continue
        if len(row) != width:
            layout = fmt.describe if width == len(fmt.names) else "as many as the header"
            problem = f"expected {width} tab-separated columns ({layout}), got {len(row)}"
        else:
            problem = next((f"expected a non-empty text in column {c + 1}" for c in cols[:-1] if not row[c].strip()), "")
        if problem and not fmt.skip_broken_rows:
            raise fail_at(path, line, problem)
        if problem:
            skipped.append((line, problem))
            continue
        texts = [row[c] for c in cols[:-1]]
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, _label(task, row[cols[-1]], path, line)))
    if len(skipped) > max(MAX_SKIPPED, len(out) // 1000):
        raise fail_at(path, skipped[0][0], f"{skipped[0][1]} ({len(skipped)} broken rows, more than a few to skip)")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} broken row(s), as GLUE's {task.name} file has a few "
                      f"(line {skipped[0][0]}: {skipped[0][1]}{', ...' if len(skipped) > 1 else ''})",
                      UserWarning, stacklevel=2)
    return out


def _read_jsonl(task: Task, path: Path) -> list[Example]:
    out: list[Example] = []
    for line, raw in TextSource(path).raw_lines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise fail_at(path, line, "expected a JSON object with fields 'text' and 'label'")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise fail_at(path, line, f"expected label {' or '.join(task.labels)}, got {label!r}")
        out.append(Example(_text(obj["text"], path, line, "'text'"), None, _label(task, str(label), path, line)))
    return out


def _load_hub(task: Task, spec: str, split: str) -> list[Example]:
    """`hf:` / `hf:PATH[:CONFIG]`: read a split with the optional `datasets` package (needs the network)."""
    if task.hub is None:
        raise DistilkitError(f"task {task.name} has no hub dataset; give a local --data-dir")
    path, config, split_map, fields = task.hub
    if spec:
        path, _, config = spec.partition(":")
        config = config or None
    try:
        import datasets
    except ImportError:
        raise DistilkitError("hf: data dirs need the 'datasets' package (pip install datasets)") from None
    split = split_name(task, split)
    where = f"hf:{path}{':' + config if config else ''}[{split_map[split]}]"
    try:
        rows = datasets.load_dataset(path, config, split=split_map[split])
    except (OSError, ValueError) as exc:  # ConnectionError / offline, no such dataset, config or split
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DistilkitError(f"{where}: expected a dataset the Hugging Face hub can provide "
                             f"(offline, or no such dataset/config/split?): {reason}") from None
    out = []
    for i, row in enumerate(rows, start=1):
        texts = [_text(row[f], Path(where), i, f"'{f}'") for f in fields]
        raw = row["label"]
        label = _label(task, str(raw) if not task.labels or task.labels[0] == "0" else task.labels[int(raw)], Path(where), i)
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    return out


# =========================================================================== truncation

#: head+tail truncation keeps this share of the content tokens from the start (128 of 510 at max length 512).
HEAD_TAIL_HEAD_SHARE = 128 / 510


def truncate_ids(ids: list[int], budget: int, strategy: str) -> list[int]:
    """Cut a single text's token ids (no special tokens) to `budget` tokens.

    "head": the first `budget` tokens. "head_tail" (Sun et al. 2019, "How to fine-tune BERT for text
    classification?"): the first 128 and the last 382 tokens at max length 512 (budget 510); the same
    1 : 2.98 split at other lengths.
    """
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    if strategy == "head_tail":
        head = round(budget * HEAD_TAIL_HEAD_SHARE)
        return ids[:head] + ids[len(ids) - (budget - head):]
    raise DistilkitError(f"unknown truncation '{strategy}'; expected head or head_tail")
