"""Model cards: every saved model folder gets a README.md with YAML front matter the Hub's parser reads."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, DistilBertForSequenceClassification

from distilkit.distill import write_model_dir
from distilkit.finetune import META_FILE, _save
from distilkit.modelcard import lineage, read_card_data
from distilkit.student import init_student
from distilkit.utils import provenance


def _card(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return ModelCard.load(folder / "README.md"), text


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "student"
    init_student(tiny_teacher, out, layers=[0, 2])
    return out


def test_init_student_card(student, tiny_teacher):
    card, text = _card(student)
    d = card.data.to_dict()
    assert d["base_model"] == str(tiny_teacher)  # a local teacher without a card: its path
    assert d["library_name"] == "transformers"
    assert {"distillation", "distilkit"} <= set(d["tags"])
    assert "license" not in d  # unknown
    assert read_card_data(student) == d
    assert "teacher layers [0, 2]" in text and "distilkit " in text and provenance()["distilkit_version"] in text


def test_lineage_of_the_bundled_minilm_and_of_a_distilkit_folder(tmp_path):
    assert lineage("minilm") == {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "license": "apache-2.0"}
    assert lineage("bert-base-uncased") == {"base_model": "bert-base-uncased"}  # a hub id
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("---\nbase_model: org/root\nlicense: mit\ntags: [distilkit]\n---\nbody\n")
    assert lineage(folder) == {"base_model": "org/root", "license": "mit"}
    (folder / "README.md").write_text("---\n: [unclosed\n---\n")  # a card that does not parse: ignored
    assert lineage(folder) == {"base_model": str(folder), "license": None}


def test_distill_card_reports_tokens_and_mlm_accuracy(student, tmp_path):
    from distilkit.models import load_student, load_tokenizer

    info = {"command": "distill", "teacher": "minilm", "corpus": "runs/c", "steps": 30, "tokens": 61440,
            "world_size": 1, "corpus_meta": {"sources": {"train": [{"path": "/d/wikitext/wiki.train.raw.gz"}]}},
            "config": {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0, "temperature": 2.0, "steps": 30},
            "eval": {"teacher": {"mlm_accuracy": 0.2, "perplexity": 50.0},
                     "student_before": {"mlm_accuracy": 0.1, "perplexity": 300.0},
                     "student_after": {"mlm_accuracy": 0.185, "perplexity": 80.0}}, **provenance()}
    out = tmp_path / "final"
    write_model_dir(load_student(student), load_tokenizer(student), out, info, "distilkit_distill.json")
    card, text = _card(out)
    d = card.data.to_dict()
    assert d["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and d["license"] == "apache-2.0"
    assert d["datasets"] == ["Salesforce/wikitext"] and d["metrics"] == ["accuracy", "perplexity"]
    assert "61,440 tokens seen" in text and "teacher 20.00% top-1" in text and "after 18.50% top-1" in text
    assert "alpha_ce: 5.0" in text  # the config, as YAML


def test_finetune_card_inherits_base_model_and_lists_task(student, tmp_path):
    torch.manual_seed(0)
    net = DistilBertForSequenceClassification.from_pretrained(student, num_labels=2)
    meta = {"task": "mrpc", "base_model": str(student), "seed": 1, "hparams": {"lr": 2e-5, "max_length": 128},
            "metrics": {"f1": 0.8, "accuracy": 0.7}, "score": 75.0, **provenance()}
    _save(net, AutoTokenizer.from_pretrained(student), tmp_path / "model", meta)
    assert json.loads((tmp_path / "model" / META_FILE).read_text())["task"] == "mrpc"
    card, text = _card(tmp_path / "model")
    d = card.data.to_dict()
    assert d["base_model"] == read_card_data(student)["base_model"]  # the student's root, not the student
    assert d["datasets"] == ["nyu-mll/glue"] and d["metrics"] == ["accuracy", "f1"]
    assert d["pipeline_tag"] == "text-classification"
    assert "score x100 75.00" in text and "f1 0.8000" in text
