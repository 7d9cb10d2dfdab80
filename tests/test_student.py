"""Student extraction: equivalence with the teacher, Table 3 parameter counts, heads, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel, DistilBertForMaskedLM

from distilkit.cli import main
from distilkit.models import count_parameters, load_teacher
from distilkit.student import default_layers, init_student, student_from_teacher
from distilkit.utils import DistilkitError


def _random_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([24, 17, 9, 3]):  # padded rows of different lengths
        ids[row, length:] = 0
        mask[row, length:] = 0
    ids[:, 0] = 2  # [CLS]
    return ids, mask


def test_all_layers_kept_gives_teacher_logits(tiny_teacher):
    teacher, had_head = load_teacher(tiny_teacher)
    assert had_head
    teacher.eval()
    student = student_from_teacher(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    for seed in range(3):
        ids, mask = _random_batch(teacher.config.vocab_size, seed)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask).logits
            s = student(input_ids=ids, attention_mask=mask).logits
        diff = (t - s)[mask.bool()].abs().max().item()
        assert diff < 1e-4, diff
        # and the embedding output matches too (token-type row 0 folded into positions)
        with torch.no_grad():
            te = teacher.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            se = student.distilbert.embeddings(ids)
        assert (te - se).abs().max().item() < 1e-5


def test_layer_subset_copies_the_chosen_layers(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    student = student_from_teacher(teacher, [1, 3])
    assert student.config.n_layers == 2
    assert torch.equal(student.distilbert.transformer.layer[0].attention.q_lin.weight,
                       teacher.bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(student.distilbert.transformer.layer[1].ffn.lin2.bias, teacher.bert.encoder.layer[3].output.dense.bias)
    assert not torch.equal(student.distilbert.transformer.layer[1].ffn.lin2.bias, teacher.bert.encoder.layer[2].output.dense.bias)
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.bias)


def test_default_layers_are_one_out_of_two():
    assert default_layers(12) == [0, 2, 4, 6, 8, 10]
    assert default_layers(6) == [0, 2, 4]
    assert default_layers(6, every=3) == [0, 3]


def test_bert_base_parameter_counts_match_table3(capsys):
    """Paper Table 3: BERT-base 110M parameters, DistilBERT 66M (random weights from the bert-base config)."""
    teacher = BertForMaskedLM(BertConfig())  # bert-base-uncased shape
    student = student_from_teacher(teacher, default_layers(12))
    encoder_with_pooler = count_parameters(BertModel(BertConfig()))
    t_head, s_head = count_parameters(teacher), count_parameters(student)
    s_enc = count_parameters(student.distilbert)
    print(f"BERT-base encoder (+pooler) {encoder_with_pooler:,}  with MLM head {t_head:,}")
    print(f"DistilBERT encoder {s_enc:,}  with MLM head {s_head:,}")
    assert round(encoder_with_pooler / 1e6) == 109 and abs(encoder_with_pooler / 1e6 - 110) < 1.0
    assert round(s_enc / 1e6) == 66
    assert 0.39 < 1 - s_enc / encoder_with_pooler < 0.41  # "40% smaller"
    assert s_head - s_enc == t_head - count_parameters(teacher.bert)  # same MLM head on both


def test_init_student_saves_loadable_safetensors(tiny_teacher, tmp_path):
    out = tmp_path / "student"
    summary = init_student(tiny_teacher, out)
    assert summary.layers == [0, 2]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, DistilBertForMaskedLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not hasattr(model.distilbert.embeddings, "token_type_embeddings")
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    meta = json.loads((out / "distilkit_student.json").read_text())
    assert meta["layers"] == [0, 2] and meta["student_params"] < meta["teacher_params"]
    teacher, _ = load_teacher(tiny_teacher)
    ids, mask = _random_batch(teacher.config.vocab_size)
    direct = student_from_teacher(teacher, [0, 2]).eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids, attention_mask=mask).logits,
                              direct(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_teacher_without_head_gets_fresh_head_and_warning(tiny_teacher_no_head, tmp_path):
    with pytest.warns(UserWarning, match="no masked-LM head"):
        summary = init_student(tiny_teacher_no_head, tmp_path / "s")
    assert summary.teacher_had_mlm_head is False
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "s")
    assert model.vocab_projector.weight.data_ptr() == model.distilbert.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "0,9"], "out of range"),
        (["--layers", "1,1"], "expected teacher layers in increasing order, each once"),
        (["--layers", "2,0"], "expected teacher layers in increasing order, each once (such as 0,2,4), got '2,0'"),
        (["--layers", ","], "comma-separated integers"),
        (["--layers", "0,,2"], "expected comma-separated integers such as 0,2,4, got '0,,2'"),
        (["--layers", "a,b"], "comma-separated integers"),
    ],
)
def test_cli_layer_errors_exit_2_with_one_line(tiny_teacher, tmp_path, capsys, extra, message):
    rc = main(["init-student", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()


def test_parse_layers():
    from distilkit.student import check_layers, parse_layers

    assert parse_layers("0,2,4,7,9,11") == [0, 2, 4, 7, 9, 11] and parse_layers(" 1 , 3") == [1, 3]
    with pytest.raises(DistilkitError, match="repeats a layer"):  # the library path (init_student(layers=...))
        check_layers([1, 1], 4)


def test_cli_refuses_non_empty_output_and_non_bert(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["init-student", "--teacher", str(tiny_teacher), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["init-student", "--teacher", str(tiny_teacher), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()

    student_dir = out  # a DistilBERT folder is not a BERT-family teacher
    assert main(["init-student", "--teacher", str(student_dir), "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BERT-family" in err[0]
    with pytest.raises(DistilkitError):
        init_student(tmp_path / "missing", tmp_path / "s3")
