"""`distilkit export`, the ONNX / bf16 rows of `bench`, the reproduce export stage and the report's section.

Tiny random models (hidden 128, so that int8 weights dominate the file) built in-process; a tiny SST-2
data folder written by the tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, DistilBertForMaskedLM, DistilBertForSequenceClassification

from conftest import WORDS, make_tiny_teacher
from distilkit import export as export_mod
from distilkit.bench import bench
from distilkit.cli import main
from distilkit.export import INT8_FILE, ONNX_FILE, OrtRunner, export_model
from distilkit.student import init_student

pytest.importorskip("onnxruntime")

SENTENCES = [("the film was good", None), ("a bad movie", "the story was not very good"),
             ("he was in the city that year", None), ("they had been there", "she would like the song")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("exp") / "teacher", layers=4, hidden=128, ffn=256, seed=3)


@pytest.fixture(scope="module")
def student(teacher):
    """The default student (teacher layers 0 and 2), saved beside the teacher."""
    return Path(init_student(teacher, teacher.parent / "student").out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An SST-2 dev split of 48 random sentences in GLUE format."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("data")
    (root / "sst2").mkdir()
    rows = ["sentence\tlabel"] + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + f" .\t{i % 2}"
                                  for i in range(48)]
    for split in ("train", "dev"):
        (root / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier(student, tmp_path_factory):
    """The student with a random 2-way classification head, saved like a fine-tuned model."""
    torch.manual_seed(0)
    net = DistilBertForSequenceClassification.from_pretrained(student, num_labels=2)
    out = tmp_path_factory.mktemp("exp") / "cls"
    net.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mlm_export(student, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("exp") / "onnx-mlm"
    return out, export_model(student, out, int8=True)


def test_masked_lm_export_equals_pytorch_and_int8_is_smaller(mlm_export, student):
    out, r = mlm_export
    assert r["kind"] == "masked-lm" and r["inputs"] == ["input_ids", "attention_mask"]
    assert r["check"]["passed"] and r["check"]["max_abs_diff"] <= 1e-4
    assert json.loads((out / "export.json").read_text())["check"] == r["check"]
    for name in (ONNX_FILE, INT8_FILE, "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert AutoConfig.from_pretrained(out).model_type == "distilbert"
    assert r["files"][ONNX_FILE] / r["files"][INT8_FILE] == pytest.approx(r["int8_size_ratio"])
    assert r["int8_size_ratio"] >= 2.5

    # dynamic axes: another batch size and length than the traced one, with padding
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (3, 37))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    mask[2, 3:] = 0
    model = DistilBertForMaskedLM.from_pretrained(student).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    got = OrtRunner(out / ONNX_FILE)(input_ids=ids, attention_mask=mask)
    assert got.shape == ref.shape == (3, 37, model.config.vocab_size)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    int8 = OrtRunner(out / INT8_FILE)(input_ids=ids, attention_mask=mask)
    assert int8.shape == ref.shape and 0 < np.abs(int8 - ref).max() < 1.0  # quantized: close, not equal


def test_classifier_export_with_task_writes_three_metrics(classifier, data_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "onnx-cls"
    rc = main(["export", "--model", str(classifier), "--out", str(out), "--int8", "--task", "sst2",
               "--data-dir", str(data_dir)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "export.json").read_text())
    assert r["kind"] == "sequence-classification" and r["check"]["passed"]
    assert r["check"]["inputs"].startswith("first 32 examples of sst2")
    ev = r["eval"]
    assert ev["task"] == "sst2" and ev["n_eval"] == 48
    for name in ("pytorch_fp32", "onnx_fp32", "onnx_int8"):
        assert set(ev[name]["metrics"]) == {"accuracy"} and 0 <= ev[name]["score"] <= 100
    assert ev["onnx_fp32"]["score"] == ev["pytorch_fp32"]["score"]  # logits equal to 1e-4: same predictions
    assert r["int8_cost"] == pytest.approx(ev["onnx_fp32"]["score"] - ev["onnx_int8"]["score"])
    printed = capsys.readouterr().out
    assert "pytorch_fp32" in printed and "int8 cost" in printed


def test_export_check_failure_exits_1_with_the_number(student, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "max_abs_diff", lambda a, b, batch: 0.5)
    rc = main(["export", "--model", str(student), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "differ from PyTorch by 5.000e-01" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "export.json").read_text())["check"]["passed"] is False


def test_export_bad_input_one_line_exit_2_nothing_written(student, classifier, tmp_path, capsys):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((student / "config.json").read_text())
    gpt = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(gpt)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((student / name).read_bytes())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    capsys.readouterr()
    cases = [
        (["--model", str(no_weights)], "no safetensors weights"),
        (["--model", str(tmp_path / "missing")], "no such model folder"),
        (["--model", str(gpt)], "model_type 'gpt2' is not supported"),
        (["--model", str(no_tokenizer)], "no usable tokenizer"),
        (["--model", str(student), "--task", "sst2", "--data-dir", str(tmp_path)], "needs a fine-tuned sequence classifier"),
        (["--model", str(classifier), "--task", "sst2"], "--task needs --data-dir"),
        (["--model", str(classifier), "--task", "sst2", "--data-dir", str(tmp_path)], "sst2"),
        (["--model", str(classifier), "--task", "stsb", "--data-dir", str(tmp_path)], "needs 1"),
        (["--model", str(student), "--threads", "0"], "--threads: expected a positive number"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        rc = main(["export", *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert not out.exists()
    rc = main(["export", "--model", str(student), "--out", str(tmp_path / "full")])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    before = sorted(p.name for p in student.iterdir())
    for out in (student, student / "onnx"):  # --overwrite must never replace the model being exported
        rc = main(["export", "--model", str(student), "--out", str(out), "--overwrite"])
        assert rc == 2 and "must not be the model folder" in capsys.readouterr().err
    assert sorted(p.name for p in student.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


@pytest.fixture(scope="module")
def bench_result(teacher, student, one_thread):
    source = {"source": "inline", "n": len(SENTENCES), "sha256": None}
    return bench(str(teacher), str(student), SENTENCES, source, rounds=2, batch_size=2, warmup=2, progress=False,
                 onnx=True, bf16=True)


def test_bench_onnx_and_bf16_rows(bench_result):
    r = bench_result
    assert list(r["rows"]) == ["student_onnx_fp32", "student_onnx_int8", "teacher_bf16", "student_bf16"]
    t = r["teacher"]
    for name, row in r["rows"].items():
        assert len(row["bs1_seconds"]["rounds"]) == 2 and len(row["bs32_sentences_per_s"]["rounds"]) == 2
        assert row["speedup_bs1"] == pytest.approx(t["bs1_seconds"]["median"] / row["bs1_seconds"]["median"])
        assert row["speedup_bs32"] == pytest.approx(row["bs32_sentences_per_s"]["median"] / t["bs32_sentences_per_s"]["median"])
    fp32, int8 = r["rows"]["student_onnx_fp32"], r["rows"]["student_onnx_int8"]
    assert (fp32["runtime"], fp32["precision"], int8["precision"]) == ("onnxruntime", "fp32", "int8")
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["file_bytes"] > int8["file_bytes"]
    assert r["rows"]["teacher_bf16"]["precision"] == "bf16"
    # every row is timed in every round, the order reversed each round
    first = [e for e in r["schedule"][:6]]
    assert first == ["teacher:bs1", "student:bs1", "student_onnx_fp32:bs1", "student_onnx_int8:bs1",
                     "teacher_bf16:bs1", "student_bf16:bs1"]
    assert r["schedule"][12:18] == [e for e in reversed(first)]
    json.dumps(r)


def test_reproduce_export_stage_and_report(classifier, data_dir, bench_result, tmp_path, one_thread):
    import shutil

    from distilkit.pipeline import Pipeline, ReproduceConfig
    from distilkit.report import write_report

    cfg = ReproduceConfig()
    cfg.finetune.tasks = ["sst2"]
    cfg.finetune.per_task = {"sst2": {"max_eval": 40}}
    cfg.export.enabled = True
    run = tmp_path / "run"
    shutil.copytree(classifier, run / "finetune" / "student" / "sst2" / "model")
    pipe = Pipeline(cfg, data_dir, run, log=lambda m: None)
    out = pipe.stage_export("key1")
    r = json.loads((run / "export" / "student" / "sst2" / "export.json").read_text())
    assert r["eval"]["n_eval"] == 40 and "sst2 int8 cost" in out["note"]
    before = (run / "export" / "student" / "sst2" / "export.json").stat().st_mtime_ns
    pipe.stage_export("key1")  # up to date: not redone
    assert (run / "export" / "student" / "sst2" / "export.json").stat().st_mtime_ns == before
    cfg.export.tasks = ["cola"]
    with pytest.raises(Exception, match=r"export.tasks: \['cola'\] not fine-tuned"):
        pipe.stage_export("key1")

    (run / "bench").mkdir()
    (run / "bench" / "bench.json").write_text(json.dumps(bench_result))
    rep = write_report(run)
    d = rep["deployment"]
    assert [row["key"] for row in d["rows"]] == ["teacher", "student", "student_onnx_fp32", "student_onnx_int8",
                                                 "teacher_bf16", "student_bf16"]
    assert d["rows"][0]["speedup_bs1"] == pytest.approx(1.0)
    assert d["exports"]["sst2"]["int8_cost"] == pytest.approx(r["int8_cost"])
    assert d["mean_int8_cost"] == pytest.approx(r["int8_cost"])
    md = (run / "report.md").read_text()
    assert "## Deployment: ONNX, int8 and bf16 (extended Table 3)" in md
    assert "| student | ONNX Runtime | int8 (dynamic) |" in md
    assert f"| sst2 | acc x100 | {r['eval']['pytorch_fp32']['score']:.2f} |" in md
