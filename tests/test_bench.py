"""Benchmark: JSON format, parameter counts (Table 3), alternated rounds, sentence loading. No timed assertions."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, BertConfig, DistilBertConfig

from distilkit.bench import bench, load_sentences, param_counts, read_sentences_file
from distilkit.cli import main
from distilkit.models import count_parameters
from distilkit.student import init_student, student_config
from distilkit.utils import DistilkitError, sha256_file, sha256_text

SENTENCES = [
    ("the film was good", None),
    ("a bad movie", "the story was not very good"),
    ("he was in the city that year", None),
    ("they had been there", "she would like the song"),
    ("the first season of the series was great", None),
]


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "student"
    init_student(tiny_teacher, out)
    return out


@pytest.fixture(scope="module")
def result(tiny_teacher, tiny_student):
    source = {"source": "inline", "n": len(SENTENCES), "sha256": None}
    return bench(str(tiny_teacher), str(tiny_student), SENTENCES, source, rounds=3, batch_size=2, warmup=2, progress=False,
                 onnx=False, bf16=False)  # the paper's protocol alone (extra rows: tests/test_export.py)


def test_bench_json_keys_and_param_counts(result, tiny_teacher, tiny_student):
    for role in ("teacher", "student"):
        m = result[role]
        assert {"model", "params", "params_with_head", "layers", "bs1_seconds", "bs32_sentences_per_s"} <= set(m)
        for key in ("bs1_seconds", "bs32_sentences_per_s"):
            assert set(m[key]) == {"median", "min", "max", "rounds"}
            assert len(m[key]["rounds"]) == 3
            assert m[key]["min"] <= m[key]["median"] <= m[key]["max"]
            assert m[key]["median"] == statistics.median(m[key]["rounds"])
    assert {"speedup_bs1", "speedup_bs32", "param_ratio", "sentences", "protocol", "threads", "cpu", "device",
            "git_commit", "torch"} <= set(result)
    assert result["device"] == "cpu" and result["threads"] == torch.get_num_threads()
    json.dumps(result)  # serialisable as is

    # parameters: exactly those of the loaded encoders (BertModel with pooler / DistilBertModel) and MLM models
    t_enc = AutoModel.from_pretrained(tiny_teacher)
    s_enc = AutoModel.from_pretrained(tiny_student)
    assert result["teacher"]["params"] == count_parameters(t_enc)
    assert result["student"]["params"] == count_parameters(s_enc)
    assert result["teacher"]["params_with_head"] == count_parameters(AutoModelForMaskedLM.from_pretrained(tiny_teacher))
    assert result["student"]["params_with_head"] == count_parameters(AutoModelForMaskedLM.from_pretrained(tiny_student))
    assert result["student"]["params"] < result["teacher"]["params"]
    assert (result["teacher"]["layers"], result["student"]["layers"]) == (4, 2)
    assert result["param_ratio"] == pytest.approx(result["student"]["params"] / result["teacher"]["params"])


def test_bench_speedup_is_ratio_of_medians_and_rounds_alternate(result):
    t, s = result["teacher"], result["student"]
    assert result["speedup_bs1"] == pytest.approx(t["bs1_seconds"]["median"] / s["bs1_seconds"]["median"])
    assert result["speedup_bs32"] == pytest.approx(
        s["bs32_sentences_per_s"]["median"] / t["bs32_sentences_per_s"]["median"])
    # teacher and student alternate within every pass type, and the order flips each round
    assert result["schedule"] == [
        "teacher:bs1", "student:bs1", "teacher:bs2", "student:bs2",
        "student:bs1", "teacher:bs1", "student:bs2", "teacher:bs2",
        "teacher:bs1", "student:bs1", "teacher:bs2", "student:bs2",
    ]


def test_param_counts_of_bert_base_match_table3():
    """Table 3: BERT-base 110M (BertModel with pooler: 109.5M), DistilBERT 66M (66.4M), 40% fewer."""
    teacher_cfg = BertConfig()
    t_enc, t_mlm = param_counts(teacher_cfg, with_head=True)
    s_enc, s_mlm = param_counts(student_config(teacher_cfg, 6), with_head=True)
    assert t_enc == 109_482_240 and abs(t_enc / 1e6 - 110) < 1  # the paper rounds 109.5M to "110M"
    assert s_enc == 66_362_880 and round(s_enc / 1e6) == 66
    assert s_enc == param_counts(DistilBertConfig(), with_head=False)[0]
    assert param_counts(teacher_cfg, with_head=False)[1] is None
    # the MLM models: no pooler, tied decoder counted once, + head transform and output bias
    h, v = teacher_cfg.hidden_size, teacher_cfg.vocab_size
    assert t_mlm == t_enc - (h * h + h) + (h * h + h) + 2 * h + v
    assert s_mlm == s_enc + (h * h + h) + 2 * h + v
    assert 1 - s_enc / t_enc == pytest.approx(0.394, abs=1e-3)


def test_read_sentences_plain_text(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("one sentence\n\nfirst of a pair\tsecond of it\n")
    assert read_sentences_file(f) == [("one sentence", None), ("first of a pair", "second of it")]
    examples, source = load_sentences(f, max_sentences=1)
    assert examples == [("one sentence", None)]
    assert source["source"] == str(f) and source["n"] == 1 and source["n_total"] == 2
    assert source["sha256"] == sha256_file(f) and source["text_sha256"] == sha256_text("one sentence\t\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\na\tb\tc\n")
    with pytest.raises(DistilkitError, match=r"bad.txt:2: one sentence, or two"):
        read_sentences_file(bad)
    with pytest.raises(DistilkitError, match="not both"):
        load_sentences(f, task="mrpc", data_dir=tmp_path)
    with pytest.raises(DistilkitError, match="no sentences"):
        load_sentences()


def test_load_sentences_task_missing_stsb_says_so(tmp_path):
    with pytest.raises(DistilkitError, match="STS-B.*absent"):
        load_sentences(task="stsb", data_dir=tmp_path)


def test_load_sentences_mrpc_dev_pairs(shared_data):
    examples, source = load_sentences(task="mrpc", data_dir=shared_data)
    assert source["source"] == "mrpc/dev.tsv" and source["n"] == len(examples) == 408
    assert source["sha256"] == "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17"
    assert all(b is not None for _, b in examples) and source["pairs"]


def test_bench_cli_writes_json(tiny_teacher, tiny_student, tmp_path, capsys):
    sent = tmp_path / "s.txt"
    sent.write_text("\n".join(a for a, _ in SENTENCES) + "\n")
    out = tmp_path / "b" / "bench.json"
    rc = main(["bench", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--sentences", str(sent),
               "--rounds", "1", "--max-sentences", "3", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["sentences"]["n"] == 3 and data["rounds"] == 1
    assert "speedup" in capsys.readouterr().out
    rc = main(["bench", "--teacher", str(tiny_teacher), "--student", str(tiny_student),
               "--sentences", str(tmp_path / "missing.txt")])
    assert rc == 2


def test_bench_cli_task_needs_data_dir(tiny_teacher, tiny_student, capsys):
    assert main(["bench", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--task", "mrpc"]) == 2
    assert "--task needs --data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_minilm_on_mrpc_then_report(shared_data, tmp_path):
    """Real model, real sentences: MiniLM (22.7M with pooler) vs its 3-layer student, then the report's Table 3."""
    from distilkit.report import write_report

    student = tmp_path / "student"
    with pytest.warns(UserWarning, match="no masked-LM head"):
        init_student("minilm", student)
    examples, source = load_sentences(task="mrpc", data_dir=shared_data, max_sentences=24)
    result = bench("minilm", str(student), examples, source, rounds=1, progress=False)
    assert result["teacher"]["params"] == 22_713_216 and result["teacher"]["params_with_head"] is None
    assert result["student"]["layers"] == 3 and result["student"]["params"] < result["teacher"]["params"]
    run = tmp_path / "run"
    (run / "bench").mkdir(parents=True)
    (run / "bench" / "bench.json").write_text(json.dumps(result))
    rep = write_report(run)
    assert rep["bench"]["param_ratio"] == pytest.approx(result["param_ratio"])
    assert "| teacher | `minilm` | 6 | 22.7M |" in (run / "report.md").read_text()
