"""Bad input never gives a traceback or a silent wrong result (issue 14, items 2, 3, 4 and 11).

Every case runs the CLI in-process (`cli.main`), as a user would, and checks: the exit code (2 for bad
input, 1 for an environment fault such as a full disk), ONE line on stderr naming the file / key and
what was expected, and nothing half-written (the output does not exist afterwards).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distilkit.cli import main
from distilkit.corpus import prepare_corpus
from distilkit.finetune import finetune
from distilkit.config import FinetuneConfig
from distilkit.student import init_student
from test_tasks import write_task_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("data"), n_train=16, n_dev=8)


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "s"
    init_student(str(tiny_teacher), str(out))
    return out


@pytest.fixture(scope="module")
def corpus(tiny_teacher, tiny_text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "c"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(out), block_size=32, progress=False)
    return out


@pytest.fixture(scope="module")
def sst2_model(tiny_teacher, data, tmp_path_factory) -> Path:
    """A teacher fine-tuned on SST-2 (one quick epoch): its eval.json must survive `evaluate --task mrpc`."""
    out = tmp_path_factory.mktemp("ft") / "sst2"
    finetune(str(tiny_teacher), "sst2", str(data), str(out), FinetuneConfig(seeds=[1], epochs=1, batch_size=8, max_length=32))
    return out / "model"


def _variant(src: Path, dst: Path, change) -> Path:
    """A copy of the model folder `src` at `dst`, changed by `change(dst)`."""
    shutil.copytree(src, dst)
    change(dst)
    return dst


def run(capsys, *argv: str, code: int = 2) -> str:
    """Run the CLI; assert its exit code and a one-line stderr without a traceback. Returns that line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folders left


# --------------------------------------------------------------------------- model folders (item 2 and 11)


def _no_tokenizer(d: Path) -> None:
    for f in d.iterdir():
        if f.name not in ("config.json", "model.safetensors", "distilkit_finetune.json"):
            f.unlink()


def _tiny_vocab(d: Path) -> None:  # tokenizer files present but degenerate: only the special tokens
    from transformers import BertTokenizerFast

    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "vocab.txt").unlink(missing_ok=True)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}).save_pretrained(d)


def _truncate_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _random_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _pickle_only(d: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


MODEL_CASES = [
    ("no_tokenizer", _no_tokenizer, "expected tokenizer files beside config.json"),
    ("tiny_vocab", _tiny_vocab, "expected a tokenizer covering the model's vocabulary of"),
    ("bad_config", lambda d: (d / "config.json").write_text('{"model_type": "bert", '), "cannot load the config (config.json)"),
    ("config_no_type", lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), "cannot load the config"),
    ("truncated_weights", _truncate_weights, "cannot load the model weights: Error while deserializing header"),
    ("random_weights", _random_weights, "cannot load the model weights: Error while deserializing header"),
    ("config_shapes", lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "max_position_embeddings": 16})),
     "cannot load the teacher: the shapes of the stored weights do not match config.json"),
    ("pickle_only", _pickle_only, "expected model.safetensors; pytorch_model.bin is a pickle file, which distilkit never loads"),
]


@pytest.mark.parametrize("name,change,expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_teacher_folder_init_student(tmp_path, capsys, tiny_teacher, name, change, expected):
    teacher = _variant(tiny_teacher, tmp_path / name, change)
    out = tmp_path / "student"
    line = run(capsys, "init-student", "--teacher", teacher, "--out", out)
    assert f"{teacher}: " in line and expected in line
    assert_nothing_written(out)


@pytest.mark.parametrize("name", ["no_tokenizer", "tiny_vocab"])
def test_missing_or_degenerate_tokenizer_everywhere(tmp_path, capsys, tiny_teacher, tiny_text_file, data, sst2_model, name):
    """Before the fix prepare-corpus, finetune and evaluate all exited 0 with every word [UNK]."""
    change = dict((c[0], c[1]) for c in MODEL_CASES)[name]
    model = _variant(tiny_teacher, tmp_path / name, change)
    out = tmp_path / "out"
    expected = f"{model}: expected tokenizer files" if name == "no_tokenizer" else f"{model}: expected a tokenizer covering"
    line = run(capsys, "prepare-corpus", "--tokenizer", model, "--input", tiny_text_file, "--out", out, "--block-size", "32")
    assert expected in line
    assert_nothing_written(out)
    line = run(capsys, "finetune", "--model", model, "--task", "sst2", "--data-dir", data, "--out", out, "--epochs", "1")
    assert expected in line
    assert_nothing_written(out)
    finetuned = _variant(sst2_model, tmp_path / "ft" / "model", change)
    line = run(capsys, "evaluate", "--model", finetuned, "--task", "sst2", "--data-dir", data)
    assert f"{finetuned}: expected" in line and "tokenizer" in line
    assert not (finetuned.parent / "eval.json").exists()


def test_unknown_hub_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "s"
    line = run(capsys, "init-student", "--teacher", "no-such-org/no-such-model", "--out", out)
    assert line.startswith("distilkit init-student: error: no-such-org/no-such-model: no such local folder, and the "
                           "Hugging Face hub could not provide")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- wrong task / teacher (item 3)


def test_evaluate_wrong_task_keeps_the_right_eval_json(tmp_path, capsys, data, sst2_model):
    assert main(["evaluate", "--model", str(sst2_model), "--task", "sst2", "--data-dir", str(data)]) == 0
    eval_json = sst2_model.parent / "eval.json"
    before = eval_json.read_bytes()
    line = run(capsys, "evaluate", "--model", sst2_model, "--task", "mrpc", "--data-dir", data)
    assert f"{sst2_model}: the model was fine-tuned on sst2 (its distilkit_finetune.json), not mrpc" in line
    assert "--allow-task-mismatch" in line
    assert eval_json.read_bytes() == before
    # asked for explicitly: scored, into a file of its own (the SST-2 eval.json still untouched)
    assert main(["evaluate", "--model", str(sst2_model), "--task", "mrpc", "--data-dir", str(data), "--allow-task-mismatch"]) == 0
    assert json.loads((sst2_model.parent / "eval-mrpc.json").read_text())["task"] == "mrpc"
    assert eval_json.read_bytes() == before


def test_distill_from_wrong_or_unfinetuned_teacher(tmp_path, capsys, data, student, tiny_teacher, sst2_model):
    out = tmp_path / "ft"
    base = ["finetune", "--model", student, "--data-dir", data, "--out", out, "--epochs", "1"]
    line = run(capsys, *base, "--task", "mrpc", "--distill-from", sst2_model)
    assert "the --distill-from teacher was fine-tuned on sst2 (its distilkit_finetune.json), not mrpc" in line
    assert_nothing_written(out)
    line = run(capsys, *base, "--task", "sst2", "--distill-from", tiny_teacher)
    assert f"{tiny_teacher}: expected a model fine-tuned on sst2 (no distilkit_finetune.json" in line
    assert_nothing_written(out)
    # the explicit way around it: MRPC and SST-2 both have two labels
    assert main([str(a) for a in base] + ["--task", "mrpc", "--distill-from", str(sst2_model), "--allow-task-mismatch",
                                          "--max-train", "8"]) == 0
    assert json.loads((out / "results.json").read_text())["allow_task_mismatch"] is True


# --------------------------------------------------------------------------- data files (items 4 and 11)


def test_glue_tsv_without_header(tmp_path, capsys, student):
    root = write_task_files(tmp_path / "d", n_train=8, n_dev=4)
    dev = root / "mrpc/dev.tsv"
    dev.write_text("".join(dev.read_text(encoding="utf-8-sig").splitlines(keepends=True)[1:]), encoding="utf-8")
    out = tmp_path / "out"
    line = run(capsys, "finetune", "--model", student, "--task", "mrpc", "--data-dir", root, "--out", out)
    assert f"{dev}:1: expected GLUE's header row naming the columns (Quality, #1 ID, #2 ID, #1 String, #2 String)" in line
    assert_nothing_written(out)


def test_latin1_tsv_and_truncated_imdb(tmp_path, capsys, student):
    root = write_task_files(tmp_path / "d", n_train=8, n_dev=4)
    train = root / "sst2/train.tsv"
    train.write_bytes(train.read_bytes() + "un film très bon\t1\n".encode("latin-1"))
    out = tmp_path / "out"
    line = run(capsys, "finetune", "--model", student, "--task", "sst2", "--data-dir", root, "--out", out)
    assert f"{train}:10: expected UTF-8 text" in line
    shard = root / "imdb/train-00000-of-00002.jsonl.gz"
    shard.write_bytes(shard.read_bytes()[:-12])
    line = run(capsys, "finetune", "--model", student, "--task", "imdb", "--data-dir", root, "--out", out)
    assert f"{shard}:" in line and "expected a readable gzip stream" in line
    assert_nothing_written(out)


def test_bench_sentence_files_and_numbers(tmp_path, capsys, tiny_teacher, student):
    binary = tmp_path / "sentences.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    line = run(capsys, "bench", "--teacher", tiny_teacher, "--student", student, "--sentences", binary)
    assert f"{binary}:1: expected text, found a NUL byte (a binary file?)" in line
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a fine line\nun film très bon\n".encode("latin-1"))
    line = run(capsys, "bench", "--teacher", tiny_teacher, "--student", student, "--sentences", latin1)
    assert f"{latin1}:2: expected UTF-8 text" in line
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a fine line\nab\x00cd\n")
    assert f"{nul}:2: expected text, found a NUL byte" in run(capsys, "bench", "--teacher", tiny_teacher, "--student",
                                                              student, "--sentences", nul)
    good = tmp_path / "s.txt"
    good.write_text("the film was good\n")
    for flag, value, expected in [("--batch-size", "0", "--batch-size must be >= 1, got 0"),
                                  ("--threads", "0", "--threads must be >= 1, got 0"),
                                  ("--rounds", "0", "--rounds must be >= 1, got 0"),
                                  ("--device", "gpu7", "--device: expected a torch device")]:
        out = tmp_path / "bench.json"
        line = run(capsys, "bench", "--teacher", tiny_teacher, "--student", student, "--sentences", good, flag, value,
                   "--out", out)
        assert expected in line
        assert not out.exists()


def test_evaluate_numbers(tmp_path, capsys, data, sst2_model):
    for flag, expected in [("--batch-size", "batch_size: expected a positive number"),
                           ("--max-length", "max_length: expected a positive value, got 0"),
                           ("--max-eval", "max_eval: expected a positive number")]:
        out = tmp_path / "e.json"
        line = run(capsys, "evaluate", "--model", sst2_model, "--task", "sst2", "--data-dir", data, flag, "0", "--out", out)
        assert expected in line
        assert not out.exists()


@pytest.mark.parametrize("spec,expected", [
    ("0,,2", "--layers: expected comma-separated integers such as 0,2,4, got '0,,2'"),
    ("2,0", "--layers: expected teacher layers in increasing order, each once (such as 0,2,4), got '2,0'"),
    ("1,1", "in increasing order, each once"),
    ("0,9", "layer 9 out of range: the teacher has layers 0..3"),
])
def test_init_student_layers(tmp_path, capsys, tiny_teacher, spec, expected):
    out = tmp_path / "s"
    assert expected in run(capsys, "init-student", "--teacher", tiny_teacher, "--out", out, "--layers", spec)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- corpus / distill


def test_block_size_larger_than_positions(tmp_path, capsys, tiny_teacher, tiny_text_file, student, corpus):
    out = tmp_path / "c"
    line = run(capsys, "prepare-corpus", "--tokenizer", tiny_teacher, "--input", tiny_text_file, "--out", out,
               "--block-size", "200")
    assert "block_size 200 exceeds the 128 positions of the model" in line
    assert_nothing_written(out)
    # a corpus made for a bigger model (or an older distilkit): distill refuses it before writing anything
    big = tmp_path / "big"
    shutil.copytree(corpus, big)
    small = _variant(student, tmp_path / "small_student", _positions_16)
    out = tmp_path / "d"
    line = run(capsys, "distill", "--teacher", tiny_teacher, "--student", small, "--corpus", big, "--out", out,
               "--set", "steps=1", "--set", "alpha_cos=0")
    assert f"{big}: blocks of 32 tokens exceed the model's 16 positions" in line
    assert_nothing_written(out)


def _positions_16(d: Path) -> None:
    """The student re-made with 16 positions (random weights)."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig.from_pretrained(d)
    cfg.max_position_embeddings = 16
    DistilBertForMaskedLM(cfg).save_pretrained(d)


def test_missing_counts_with_smoothing(tmp_path, capsys, tiny_teacher, student, corpus):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    (broken / "counts.npy").unlink()
    out = tmp_path / "d"
    line = run(capsys, "distill", "--teacher", tiny_teacher, "--student", student, "--corpus", broken, "--out", out,
               "--set", "steps=1", "--set", "smoothing=0.7")
    assert f"{broken / 'counts.npy'}: expected the token counts that masking smoothing needs" in line
    assert_nothing_written(out)
    (broken / "meta.json").write_text(json.dumps({**json.loads((broken / "meta.json").read_text()), "splits": None}))
    line = run(capsys, "distill", "--teacher", tiny_teacher, "--student", student, "--corpus", broken, "--out", out,
               "--set", "steps=1")
    assert f"{broken / 'meta.json'}: expected the fields distilkit prepare-corpus writes" in line


# --------------------------------------------------------------------------- full disk (exit 1, says so)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "x/model.safetensors"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save on a full disk
])
def test_full_disk_is_exit_1_and_says_so(tmp_path, capsys, monkeypatch, tiny_teacher, error):
    from transformers import DistilBertForMaskedLM

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(DistilBertForMaskedLM, "save_pretrained", full)
    out = tmp_path / "s"
    line = run(capsys, "init-student", "--teacher", tiny_teacher, "--out", out, code=1)
    assert line.startswith("distilkit init-student: error: disk full while writing ")
    assert "environment fault, not bad input" in line
    if isinstance(error, OSError):
        assert "x/model.safetensors (No space left on device)" in line
    assert_nothing_written(out)


def test_other_errors_still_raise(monkeypatch, tiny_teacher, tmp_path):
    """Only a full disk is turned into exit 1: a bug keeps its traceback (it must not be hidden)."""
    from transformers import DistilBertForMaskedLM

    def broken(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(DistilBertForMaskedLM, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        main(["init-student", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s")])


# --------------------------------------------------------------------------- more flags and paths


def test_hub_data_dir_offline(tmp_path, capsys, monkeypatch, student):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "o"
    line = run(capsys, "finetune", "--model", student, "--task", "sst2", "--data-dir", "hf:", "--out", out)
    assert "hf:nyu-mll/glue:sst2[train]: expected a dataset the Hugging Face hub can provide" in line
    assert_nothing_written(out)


def test_seeds_with_an_empty_item(tmp_path, capsys, data, student):
    out = tmp_path / "o"
    line = run(capsys, "finetune", "--model", student, "--task", "sst2", "--data-dir", data, "--out", out, "--seeds", "1,,2")
    assert "--seeds: expected comma-separated integers such as 1,2,3, got '1,,2'" in line
    assert_nothing_written(out)


def test_output_path_that_cannot_be_made(tmp_path, capsys, tiny_teacher, student):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    good = tmp_path / "s.txt"
    good.write_text("the film was good\n")
    line = run(capsys, "bench", "--teacher", tiny_teacher, "--student", student, "--sentences", good, "--rounds", "1",
               "--warmup", "0", "--out", blocker / "bench.json")
    assert line.startswith(f"distilkit bench: error: {blocker}")
    assert blocker.read_text() == "not a folder"
