"""Task registry, loaders (fixtures in the real file formats, and the real data) and metrics."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from distilkit import tasks
from distilkit.cli import main
from distilkit.tasks import TASKS, Example, get_task, load_split, truncate_ids
from distilkit.utils import DistilkitError

# --------------------------------------------------------------------------- fixture files in the real formats

GOOD = ["the film was good", "a great and good story", "good movie , very good", 'he said " good " to them']
BAD = ["the film was bad", "a bad story", "not good , very bad", "bad bad movie"]
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
PAIR_HEADER = "index\tsentence1\tsentence2\tlabel"
MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                     "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1", "label1\tlabel2\tlabel3\tlabel4\tlabel5")
QNLI_HEADER = "index\tquestion\tsentence\tlabel"
QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
NLI = ["contradiction", "entailment", "neutral"]  # MNLI gold label by (label + i % 2): all three occur


def _rows(n: int, seed: int) -> list[tuple[str, str, int]]:
    """n (sentence1, sentence2, label) triples; label 1 when sentence1 says 'good' (learnable by a tiny model)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(2))
        a = (GOOD if label else BAD)[i % 4] + f" {' '.join(rng.choice(['the', 'of', 'and', 'it', 'is'], size=i % 5))}"
        b = (GOOD if rng.integers(2) else BAD)[(i + 1) % 4]
        out.append((a.strip(), b, label))
    return out


def _write(path: Path, lines: list[str], final_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")


def write_task_files(root: Path, n_train: int = 48, n_dev: int = 24) -> Path:
    """Write every task's train/eval files under `root` in the real formats. Returns root."""
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        rows = _rows(n, seed)
        cola = [f"gj04\t{y}\t{'' if y else '*'}\t{a}" for a, _, y in rows]
        _write(root / "cola/glue" / f"{split}.tsv", cola)
        if split == "train":
            _write(root / "cola/raw/in_domain_train.tsv", cola)
        else:
            half = len(cola) // 2
            _write(root / "cola/raw/in_domain_dev.tsv", cola[:half])
            _write(root / "cola/raw/out_of_domain_dev.tsv", cola[half:], final_newline=False)  # as released
        _write(root / "mrpc" / f"{split}.tsv", [MRPC_HEADER] + [f"{y}\t{100 + i}\t{200 + i}\t{a}\t{b}" for i, (a, b, y) in enumerate(rows)])
        _write(root / "sst2" / f"{split}.tsv", ["sentence\tlabel"] + [f"{a} \t{y}" for a, _, y in rows])
        rte = ["entailment", "not_entailment"]
        _write(root / "rte" / f"{split}.tsv", [PAIR_HEADER] + [f"{i}\t{a}\t{b}\t{rte[y]}" for i, (a, b, y) in enumerate(rows)])
        _write(root / "wnli" / f"{split}.tsv", [PAIR_HEADER] + [f"{i}\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(rows)])
        stsb = [f"{i}\tmain-news\tfile\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{(4.0 * y + 0.2 * (i % 5)):.3f}" for i, (a, b, y) in enumerate(rows)]
        _write(root / "stsb" / f"{split}.tsv", [STSB_HEADER] + stsb)
        _write(root / "qnli" / f"{split}.tsv", [QNLI_HEADER] + [f"{i}\t{a} ?\t{b}\t{rte[y]}" for i, (a, b, y) in enumerate(rows)])
        _write(root / "qqp" / f"{split}.tsv", [QQP_HEADER] + [f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(rows)])
        mnli = lambda i, a, b, y, labels: "\t".join([str(i), "31193n", f"{i}n", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})",  # noqa: E731
                                                    f"(ROOT {b})", a, b, *[NLI[y + i % 2]] * labels])
        for name, header, labels in ([("train", MNLI_TRAIN_HEADER, 2)] if split == "train" else
                                     [("dev_matched", MNLI_DEV_HEADER, 6), ("dev_mismatched", MNLI_DEV_HEADER, 6)]):
            _write(root / "mnli" / f"{name}.tsv", [header] + [mnli(i, a, b, y, labels) for i, (a, b, y) in enumerate(rows)])
    for split, seed in (("train", 2), ("test", 3)):
        rows = _rows(n_train if split == "train" else n_dev, seed)
        for shard in range(2):  # IMDb: gzip JSON lines, several shards
            path = root / "imdb" / f"{split}-0000{shard}-of-00002.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                for a, b, y in rows[shard::2]:
                    fh.write(json.dumps({"text": f"{a} <br /><br /> {b} . {a}", "label": y, "id": 0, "rating": 8}) + "\n")
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("tasks"))


# --------------------------------------------------------------------------- registry


def test_registry_has_every_task_with_consistent_fields():
    assert set(TASKS) == {"cola", "cola-v1.1", "mrpc", "sst2", "imdb", "rte", "stsb", "wnli", "mnli", "qnli", "qqp"}
    for name, t in TASKS.items():
        assert get_task(name) is t
        assert t.eval_split in t.splits and "train" in t.splits
        assert t.num_labels == (1 if t.is_regression else len(t.labels))
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert [n for n, t in TASKS.items() if t.is_pair] == ["mrpc", "rte", "stsb", "wnli", "mnli", "qnli", "qqp"]
    assert TASKS["mnli"].eval_split == "dev_matched" and TASKS["mnli"].also_eval == ("dev_mismatched",)
    assert TASKS["mnli"].num_labels == 3 and TASKS["qqp"].score_name == TASKS["mrpc"].score_name
    assert TASKS["imdb"].eval_split == "test" and TASKS["imdb"].defaults.truncation == "head_tail"
    assert {t.defaults.max_length for n, t in TASKS.items() if n != "imdb"} == {128}


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DistilkitError, match=r"unknown task 'qqp2'; known tasks: cola, cola-v1.1, mrpc"):
        get_task("qqp2")


# --------------------------------------------------------------------------- metrics

Y = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
P = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1])
YS = np.array([0.0, 1.2, 3.4, 2.2, 5.0, 4.1, 0.6, 2.9, 3.3, 1.0])
PS = np.array([0.3, 1.0, 2.9, 2.8, 4.2, 4.4, 1.5, 2.1, 3.9, 0.2])


def test_metrics_agree_with_sklearn_and_scipy():
    assert tasks.matthews(P, Y)["matthews_corr"] == pytest.approx(matthews_corrcoef(Y, P), abs=1e-12)
    f1 = tasks.f1_and_accuracy(P, Y)
    assert f1["f1"] == pytest.approx(f1_score(Y, P), abs=1e-12)
    assert f1["accuracy"] == pytest.approx(accuracy_score(Y, P), abs=1e-12)
    assert tasks.accuracy(P, Y)["accuracy"] == pytest.approx(8 / 12)
    corr = tasks.pearson_and_spearman(PS, YS)
    assert corr["pearson"] == pytest.approx(pearsonr(PS, YS).statistic, abs=1e-12)
    assert corr["spearman"] == pytest.approx(spearmanr(PS, YS).statistic, abs=1e-12)


def test_metrics_by_hand():
    # Y/P confusion: tp 5, tn 3, fp 2, fn 2
    tp, tn, fp, fn = 5, 3, 2, 2
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert tasks.matthews(P, Y)["matthews_corr"] == pytest.approx(mcc, abs=1e-12)
    assert tasks.f1_and_accuracy(P, Y)["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # constant predictions: correlation undefined -> 0, not NaN
    assert tasks.matthews(np.ones_like(Y), Y)["matthews_corr"] == 0.0
    assert tasks.pearson_and_spearman(np.full(10, 2.0), YS) == {"pearson": 0.0, "spearman": 0.0}


def test_paper_scores():
    assert TASKS["cola"].score_fn({"matthews_corr": 0.513}) == pytest.approx(51.3)
    assert TASKS["mrpc"].score_fn({"f1": 0.9, "accuracy": 0.85}) == pytest.approx(87.5)
    assert TASKS["stsb"].score_fn({"pearson": 0.87, "spearman": 0.868}) == pytest.approx(86.9)
    assert TASKS["sst2"].score_fn({"accuracy": 0.913}) == pytest.approx(91.3)
    assert TASKS["imdb"].score_name == "acc x100" and TASKS["cola"].score_name == "mcc x100"


# --------------------------------------------------------------------------- loaders on fixtures


@pytest.mark.parametrize("name", sorted(TASKS))
def test_load_every_task(task_dir, name):
    t = get_task(name)
    train = load_split(t, task_dir, "train")
    ev = load_split(name, task_dir, "eval")
    assert len(train) == 48 and len(ev) == 24
    rows = _rows(48, 2 if name == "imdb" else 0)
    if name == "imdb":  # shards hold every other row
        rows = rows[0::2] + rows[1::2]
    for i, (ex, (a, b, y)) in enumerate(zip(train, rows)):
        if name == "imdb":
            assert ex.text_a == f"{a} <br /><br /> {b} . {a}" and ex.text_b is None and ex.label == y
        elif name == "stsb":
            assert (ex.text_a, ex.text_b) == (a, b) and isinstance(ex.label, float) and 0 <= ex.label <= 5
        elif name == "mnli":
            assert (ex.text_a, ex.text_b, ex.label) == (a, b, t.labels.index(NLI[y + i % 2]))
        elif name == "qnli":
            assert (ex.text_a, ex.text_b, ex.label) == (a + " ?", b, y)
        else:
            assert ex.text_a.strip() == a and ex.text_b == (b if t.is_pair else None) and ex.label == y


def test_quotes_are_not_csv_quoting(task_dir):
    """A bare '"' inside a sentence must not swallow the following lines (csv.QUOTE_NONE)."""
    train = load_split("cola", task_dir, "train")
    quoted = [e for e in train if '"' in e.text_a]
    assert quoted and all(e.text_a.count('"') == 2 and "\n" not in e.text_a for e in quoted)


def test_mrpc_bom_header_and_cola_v11_dev_concatenation(task_dir):
    mrpc = load_split("mrpc", task_dir, "dev")
    assert not any("Quality" in e.text_a for e in mrpc) and mrpc[0].text_a == _rows(24, 1)[0][0]
    assert load_split("cola-v1.1", task_dir, "dev") == load_split("cola", task_dir, "dev")
    with pytest.raises(DistilkitError, match="no split 'test'"):
        load_split("cola", task_dir, "test")


def test_rte_labels_map_to_ids(task_dir):
    dev = load_split("rte", task_dir, "dev")
    assert [e.label for e in dev] == [y for _, _, y in _rows(24, 1)]
    assert TASKS["rte"].labels[0] == "entailment"


# --------------------------------------------------------------------------- malformed files

# (task, file to corrupt, 1-based line to replace, replacement, expected message part)
BAD_CASES = [
    ("cola", "cola/glue/train.tsv", 3, "gj04\t1\tjust three", "expected 4 tab-separated columns"),
    ("cola", "cola/glue/dev.tsv", 5, "gj04\t2\t\tsome sentence", "expected label 0 or 1, got '2'"),
    ("cola", "cola/glue/train.tsv", 7, "gj04\t1\t\t   ", "expected a non-empty text in column 4"),
    ("cola-v1.1", "cola/raw/out_of_domain_dev.tsv", 2, "x\t1\t\ta\tb", "expected 4 tab-separated columns"),
    ("mrpc", "mrpc/train.tsv", 4, "1\t1\t2\tonly one string", "expected 5 tab-separated columns"),
    ("mrpc", "mrpc/dev.tsv", 2, "1\t1\t2\ta sentence\t", "expected a non-empty text in column 5"),
    ("sst2", "sst2/train.tsv", 9, "a sentence\tpositive", "expected label 0 or 1, got 'positive'"),
    ("rte", "rte/dev.tsv", 3, "1\ta\tb\tentails", "expected label entailment or not_entailment, got 'entails'"),
    ("stsb", "stsb/train.tsv", 6, "\t".join(["1"] * 7 + ["a", "b", "5.5"]), "expected a score between 0 and 5, got '5.5'"),
    ("stsb", "stsb/dev.tsv", 2, "\t".join(["1"] * 9), "expected 10 tab-separated columns"),
    ("wnli", "wnli/train.tsv", 1, "index\tsentence1\tsentence2", "expected GLUE's header row naming the columns"),
    # a GLUE file without its header row would silently lose its first example
    ("rte", "rte/train.tsv", 1, "0\tA man sleeps.\tA man rests.\tentailment", "expected GLUE's header row naming the "
     "columns (index, sentence1, sentence2, label), got '0\tA man sleeps."),
    ("sst2", "sst2/dev.tsv", 1, "a fine film\t1", "expected GLUE's header row"),
    ("mnli", "mnli/dev_mismatched.tsv", 3, "\t".join(["x"] * 12), "expected 16 tab-separated columns (as many as the header), got 12"),
    ("mnli", "mnli/train.tsv", 2, "\t".join(["x"] * 11 + ["contradicts"]), "expected label entailment or neutral or contradiction"),
    ("mnli", "mnli/dev_matched.tsv", 1, MNLI_DEV_HEADER.replace("gold_label", "label"), "expected GLUE's header row"),
    ("qnli", "qnli/dev.tsv", 4, "3\t\tan answer\tentailment", "expected a non-empty text in column 2"),
    ("qqp", "qqp/dev.tsv", 2, "1\t2\t3\tq one\tq two\tyes", "expected label 0 or 1, got 'yes'"),
]


def _corrupt(root: Path, rel: str, line: int, text: str) -> None:
    path = root / rel
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("task,rel,line,text,expected", BAD_CASES)
def test_malformed_tsv_names_file_and_line(tmp_path, task, rel, line, text, expected):
    root = write_task_files(tmp_path, n_train=12, n_dev=8)
    _corrupt(root, rel, line, text)
    split = "train" if "train" in rel else Path(rel).stem if task == "mnli" else "eval"
    with pytest.raises(DistilkitError) as err:
        load_split(task, root, split)
    assert str(err.value) == f"{root / rel}:{line}: " + str(err.value).split(": ", 1)[1]
    assert f"{rel}:{line}: " in str(err.value) and expected in str(err.value)


def test_malformed_imdb(tmp_path):
    root = write_task_files(tmp_path, n_train=12, n_dev=8)
    path = root / "imdb/test-00001-of-00002.jsonl.gz"
    for bad, expected in [
        ('{"text": "fine", "label": 2}', "expected label 0 or 1, got '2'"),
        ('{"text": "  ", "label": 1}', "expected a non-empty 'text'"),
        ('{"text": "cut', "expected a JSON object with fields 'text' and 'label'"),
    ]:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write('{"text": "ok", "label": 0}\n' + bad + "\n")
        with pytest.raises(DistilkitError, match=re.escape(f"test-00001-of-00002.jsonl.gz:2: {expected}")):
            load_split("imdb", root, "eval")


def test_missing_split(tmp_path):
    root = write_task_files(tmp_path, n_train=12, n_dev=8)
    (root / "rte/dev.tsv").unlink()
    with pytest.raises(DistilkitError, match=r"rte/dev\.tsv: expected the rte dev split file\(s\) here \(not found\)"):
        load_split("rte", root, "eval")
    for f in (root / "imdb").glob("train-*"):
        f.unlink()
    with pytest.raises(DistilkitError, match=r"imdb/train-\*\.jsonl\.gz: expected the imdb train split"):
        load_split("imdb", root, "train")


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, tiny_teacher, capsys, command):
    root = write_task_files(tmp_path / "data", n_train=12, n_dev=8)
    _corrupt(root, "mrpc/dev.tsv", 4, "1\t1\t2\ta")
    out = tmp_path / "out"
    argv = [command, "--model", str(tiny_teacher), "--task", "mrpc", "--data-dir", str(root)]
    argv += ["--out", str(out)] if command == "finetune" else ["--out", str(out / "eval.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"mrpc/dev.tsv:4: expected 5 tab-separated columns" in err
    assert not out.exists()


def test_cli_unknown_task_exits_2(tmp_path, tiny_teacher, capsys):
    rc = main(["finetune", "--model", str(tiny_teacher), "--task", "qnli2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'qnli2'; known tasks: cola, cola-v1.1, mrpc, sst2, rte, stsb, wnli, mnli, qnli, qqp, imdb" in err


# --------------------------------------------------------------------------- truncation


def test_head_tail_truncation():
    ids = list(range(1000))
    kept = truncate_ids(ids, 510, "head_tail")
    assert kept == list(range(128)) + list(range(1000 - 382, 1000))
    assert truncate_ids(ids, 30, "head") == list(range(30))
    assert truncate_ids(ids[:20], 30, "head_tail") == ids[:20]
    short = truncate_ids(ids, 126, "head_tail")
    assert len(short) == 126 and short[:32] == list(range(32)) and short[-1] == 999
    with pytest.raises(DistilkitError):
        truncate_ids(ids, 30, "middle")


# --------------------------------------------------------------------------- real data


@pytest.mark.data
@pytest.mark.parametrize(
    "name,split,n,n_pos",
    [
        ("cola", "train", 8551, 6023), ("cola", "dev", 1043, 721),
        ("cola-v1.1", "train", 8551, 6023), ("cola-v1.1", "dev", 1043, 719),
        ("mrpc", "train", 3668, 2474), ("mrpc", "dev", 408, 279),
        ("sst2", "train", 67349, 37569), ("sst2", "dev", 872, 444),
        ("imdb", "test", 25000, 12500),
        ("rte", "train", 2490, 1241), ("rte", "dev", 277, 131),  # label 1 = not_entailment
    ],
)
def test_real_data_counts(shared_data, name, split, n, n_pos):
    examples = load_split(name, shared_data, split)
    assert len(examples) == n
    assert sum(e.label for e in examples) == n_pos
    assert all(isinstance(e, Example) and e.text_a.strip() for e in examples)
    assert all((e.text_b is not None) == get_task(name).is_pair for e in examples)


@pytest.mark.data
def test_real_stsb_scores(shared_data):
    for split, n in (("train", 5749), ("dev", 1500)):
        examples = load_split("stsb", shared_data, split)
        assert len(examples) == n and all(0.0 <= e.label <= 5.0 and e.text_b for e in examples)
    assert load_split("stsb", shared_data, "dev")[0] == Example(
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)


# --------------------------------------------------------------------------- MNLI, QNLI, QQP (no real data: fixtures)


def test_new_glue_tasks_read_by_header_names(task_dir):
    rows = _rows(24, 1)
    for split in ("dev_matched", "dev_mismatched"):  # 16 columns (label1..label5) vs train's 12: same loader
        got = load_split("mnli", task_dir, split)
        assert [(e.text_a, e.text_b) for e in got] == [(a, b) for a, b, _ in rows]
        assert [e.label for e in got] == [TASKS["mnli"].labels.index(NLI[y + i % 2]) for i, (_, _, y) in enumerate(rows)]
    assert load_split("mnli", task_dir, "eval") == load_split("mnli", task_dir, "dev_matched")
    assert len(load_split("mnli", task_dir, "train")) == 48
    qnli = load_split("qnli", task_dir, "eval")
    assert qnli[0] == Example(rows[0][0] + " ?", rows[0][1], rows[0][2])  # not_entailment = 1, as in the file
    qqp = load_split("qqp", task_dir, "eval")
    assert [(e.text_a, e.text_b, e.label) for e in qqp] == rows


def test_non_utf8_and_truncated_gzip_name_file_and_line(tmp_path):
    root = write_task_files(tmp_path, n_train=12, n_dev=8)
    path = root / "sst2/dev.tsv"
    path.write_bytes(path.read_bytes().replace(b"the film", "thé film".encode("latin-1"), 1))
    line = path.read_bytes().split(b"\n").index(next(x for x in path.read_bytes().split(b"\n") if b"th\xe9" in x)) + 1
    with pytest.raises(DistilkitError, match=re.escape(f"{path}:{line}: expected UTF-8 text")):
        load_split("sst2", root, "eval")
    shard = root / "imdb/test-00001-of-00002.jsonl.gz"
    shard.write_bytes(shard.read_bytes()[:-30])
    with pytest.raises(DistilkitError, match=re.escape(f"{shard}:") + r"\d+: expected a readable gzip stream"):
        load_split("imdb", root, "eval")


def test_qqp_skips_a_few_broken_rows_as_in_glue(tmp_path):
    """GLUE's QQP train.tsv has a question split over two lines and two empty questions: skipped, with a warning."""
    root = write_task_files(tmp_path, n_train=40, n_dev=8)
    path = root / "qqp/train.tsv"
    lines = path.read_text().split("\n")
    lines[5] = "5\t10\t11\tHow do I learn\tthis question was"  # split over two lines, as line 97,931 of GLUE's file
    lines.insert(6, "\tcut in two?\t0")
    lines[10] = "9\t18\t19\tHow can I create an Android app?\t\t0"  # an empty question2
    path.write_text("\n".join(lines))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 3 broken row(s), as GLUE's qqp file has a few "
                                                   "(line 6: expected 6 tab-separated columns")):
        got = load_split("qqp", root, "train")
    assert len(got) == 40 - 2 and all(e.text_a.strip() and e.text_b.strip() for e in got)
    path.write_text("\n".join(lines[:1] + ["1\t2\tjunk"] * 11 + lines[1:]))  # more than a few: an error
    with pytest.raises(DistilkitError, match=re.escape(f"{path}:2: expected 6 tab-separated columns") + r".*\(14 broken rows, more than a few to skip\)"):
        load_split("qqp", root, "train")
    _corrupt(root, "qnli/train.tsv", 4, "3\t\tan answer\tentailment")  # other tasks stay strict
    with pytest.raises(DistilkitError, match="qnli/train.tsv:4: expected a non-empty text in column 2"):
        load_split("qnli", root, "train")
