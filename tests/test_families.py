"""Model families beyond BERT: RoBERTa -> DistilRoBERTa-style and GPT-2 -> DistilGPT2-style students.

Tiny random RoBERTa / GPT-2 teachers with byte-level BPE tokenizers trained in-process (no network): the
student with every layer kept equals the teacher, loads with the Auto classes with nothing missing, distils
(loss falls, SIGKILL + --resume is bit-identical) and fine-tunes; other families are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from distilkit import families
from distilkit.cli import main
from distilkit.config import DistillConfig, FinetuneConfig
from distilkit.corpus import BlockCorpus, prepare_corpus
from distilkit.distill import distill
from distilkit.finetune import evaluate, finetune
from distilkit.models import load_student, load_teacher, load_tokenizer
from distilkit.student import init_student
from distilkit.utils import DistilkitError
from test_distill import _metrics, sigkill_resume_matches_uninterrupted
from test_tasks import write_task_files

pytestmark = pytest.mark.usefixtures("one_thread")

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
EOT = "<|endoftext|>"


def tiny_bpe_tokenizer(specials: list[str], roberta_post: bool = False, **named):
    """A byte-level BPE tokenizer trained on the tiny vocabulary's words, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    if roberta_post:  # <s> A </s></s> B </s>, one token type
        tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")), ("<s>", tk.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tk, **named)


def _save(folder: Path, model: torch.nn.Module, tokenizer) -> Path:
    with torch.no_grad():  # break the symmetric init so that copies are really tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_roberta_teacher(folder: Path, layers: int = 4) -> Path:
    from transformers import RobertaConfig, RobertaForMaskedLM

    tok = tiny_bpe_tokenizer(ROBERTA_SPECIALS, roberta_post=True, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                             sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _save(folder, RobertaForMaskedLM(cfg), tok)


def make_gpt2_teacher(folder: Path, layers: int = 4) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_bpe_tokenizer([EOT], bos_token=EOT, eos_token=EOT, unk_token=EOT)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _save(folder, GPT2LMHeadModel(cfg), tok)


MAKERS = {"roberta": make_roberta_teacher, "gpt2": make_gpt2_teacher}
FAMILY_NAMES = list(MAKERS)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    return {name: make(tmp_path_factory.mktemp(name) / "teacher") for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def corpora(teachers, tiny_text_file, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, teacher in teachers.items():
        out[name] = tmp_path_factory.mktemp(f"corpus-{name}") / "c"
        prepare_corpus(str(teacher), [str(tiny_text_file)], str(out[name]), block_size=32, heldout_fraction=0.15,
                       progress=False)
    return out


@pytest.fixture(scope="module")
def students(teachers, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, teacher in teachers.items():
        out[name] = tmp_path_factory.mktemp(f"student-{name}") / "s"
        init_student(str(teacher), str(out[name]))  # layers 0, 2
    return out


def _padded_batch(tokenizer) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(["the film was very good and the story", "a man", "they were in the city"],
                     padding=True, return_tensors="pt")


# --------------------------------------------------------------------------- students


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_layer_kept_equals_teacher_and_loads_with_auto_classes(name, teachers, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    teacher = teachers[name]
    summary = init_student(str(teacher), str(tmp_path / "all"), layers=[0, 1, 2, 3])
    assert summary.student_params == summary.teacher_params
    t_model, _ = load_teacher(str(teacher))
    s_model = load_student(str(tmp_path / "all"))
    batch = _padded_batch(load_tokenizer(str(teacher)))
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        t_logits = t_model.eval()(**batch).logits
        s_logits = s_model.eval()(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(s_logits[keep], t_logits[keep], atol=1e-4, rtol=0)

    # a cut student: the expected class, loads with no missing or unexpected weights, layer 1 = teacher layer 2
    init_student(str(teacher), str(tmp_path / "cut"), layers=[0, 2])
    auto = AutoModelForCausalLM if name == "gpt2" else AutoModelForMaskedLM
    model, info = auto.from_pretrained(tmp_path / "cut", use_safetensors=True, output_loading_info=True)
    assert type(model).__name__ == ("GPT2LMHeadModel" if name == "gpt2" else "RobertaForMaskedLM")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_hidden_layers == 2
    fam = families.family_of(model)
    t_layers = families._attr(fam.backbone(t_model), fam.layers_attr)
    s_layers = families._attr(fam.backbone(model), fam.layers_attr)
    for (k, v), (k2, v2) in zip(t_layers[2].state_dict().items(), s_layers[1].state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    if name == "gpt2":  # final norm copied, head still tied to the word embeddings
        norm = families._attr(fam.backbone(model), fam.final_norm_attr)
        assert norm is model.transformer.ln_f and torch.equal(norm.weight, t_model.transformer.ln_f.weight)
        assert families._attr(fam.backbone(model), fam.embeddings_attr) is model.get_input_embeddings()
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    meta = json.loads((tmp_path / "cut" / "distilkit_student.json").read_text())
    assert meta["family"] == name and meta["layers"] == [0, 2]


def test_other_families_are_refused_in_one_line(tmp_path, capsys):
    from transformers import ElectraConfig, ElectraForMaskedLM

    folder = tmp_path / "electra"
    ElectraForMaskedLM(ElectraConfig(vocab_size=50, embedding_size=16, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    capsys.readouterr()
    assert main(["init-student", "--teacher", str(folder), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "electra" in err and "bert" in err and "roberta" in err and "gpt2" in err
    assert not (tmp_path / "s").exists()
    with pytest.raises(DistilkitError, match="student model_type 'electra'"):
        load_student(str(folder))


def test_causal_labels_are_the_next_token():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert families.causal_labels(ids).tolist() == [[6, 7, 8, -100], [10, 1, 1, -100]]
    assert families.causal_labels(ids, mask).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]


def test_gpt2_corpus_has_bare_blocks_with_end_of_text_between_lines(teachers, corpora, tiny_text_file):
    blocks = BlockCorpus(corpora["gpt2"])
    tok = load_tokenizer(str(teachers["gpt2"]))
    assert blocks.meta["splits"]["train"]["tokens"] == len(blocks) * 32  # no [CLS]/[SEP] in the block
    stream = []
    from distilkit.corpus import load_text_lines

    for line in load_text_lines(tiny_text_file):
        stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first_train = BlockCorpus(corpora["gpt2"])[0]
    assert tok.eos_token_id in first_train.tolist()
    # the train split's first block is one of the stream's consecutive 32-token slices
    starts = {tuple(stream[i : i + 32]) for i in range(0, len(stream) - 31, 32)}
    assert tuple(first_train.tolist()) in starts
    roberta = BlockCorpus(corpora["roberta"])[0]
    assert roberta[0] == 0 and roberta[-1] == 2  # <s> ... </s>


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_distill_loss_falls_and_scores_improve(name, teachers, students, corpora, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    out = tmp_path / "run"
    cfg = DistillConfig(steps=30, batch_size=8, lr=2e-3, save_every=30, log_every=5, eval_batches=None)
    r = distill(str(teachers[name]), str(students[name]), str(corpora[name]), str(out), cfg)
    rows = _metrics(out)
    assert np.mean([m["loss"] for m in rows[-2:]]) < rows[0]["loss"] - 0.1
    ev = json.loads((out / "eval.json").read_text())
    assert ev["student_after"]["perplexity"] < ev["student_before"]["perplexity"]
    if name == "gpt2":  # causal LM: next-token scores over every position that has a next token
        assert set(ev["student_after"]) >= {"next_token_accuracy", "perplexity", "n_predicted"}
        assert ev["student_after"]["n_predicted"] == ev["teacher"]["n_predicted"] == ev["teacher"]["n_blocks"] * 31
        assert rows[-1]["tokens"] == 30 * 8 * 32 == r["tokens"]
    else:
        assert ev["student_after"]["n_masked"] > 0
    auto = AutoModelForCausalLM if name == "gpt2" else AutoModelForMaskedLM
    model = auto.from_pretrained(out / "final", use_safetensors=True)
    assert model.config.num_hidden_layers == 2
    # the report names the held-out evaluation after the objective
    from distilkit.report import write_report

    (tmp_path / "report").mkdir()
    out.rename(tmp_path / "report" / "distill")
    write_report(tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("## Next-token (causal-LM) evaluation" in md) == (name == "gpt2")
    assert ("## Masked-LM evaluation" in md) == (name != "gpt2")


def test_gpt2_objective_is_causal_cross_entropy_plus_kl_everywhere(teachers, students, corpora):
    """One step's loss terms, recomputed by hand from the two models' logits."""
    import torch.nn.functional as F

    from distilkit import losses
    from distilkit.distill import loss_config

    cfg = DistillConfig(alpha_ce=5.0, alpha_mlm=0.0, alpha_clm=2.0, alpha_cos=1.0, kl_positions="masked")
    lcfg = loss_config(cfg, families.FAMILIES["gpt2"])
    assert (lcfg.alpha_mlm, lcfg.kl_positions) == (2.0, "all")  # alpha_clm takes the hard-target slot; KL everywhere
    teacher, _ = load_teacher(str(teachers["gpt2"]))
    student = load_student(str(students["gpt2"]))
    ids = BlockCorpus(corpora["gpt2"]).batch([0, 1])
    ids, attention, labels = families.causal_batch(ids, load_tokenizer(str(students["gpt2"])), families.FAMILIES["gpt2"])
    assert bool(attention.all())  # end-of-text inside a block is input, not padding
    out = losses.compute_losses(student.eval(), teacher.eval(), {"input_ids": ids, "attention_mask": attention,
                                                                "labels": labels}, lcfg)
    with torch.no_grad():
        s = student(input_ids=ids, output_hidden_states=True)
        t = teacher(input_ids=ids, output_hidden_states=True)
    clm = F.cross_entropy(s.logits[:, :-1].reshape(-1, s.logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl = F.kl_div(F.log_softmax(s.logits / 2, -1).reshape(-1, s.logits.shape[-1]),
                  F.log_softmax(t.logits / 2, -1).reshape(-1, s.logits.shape[-1]), reduction="batchmean", log_target=True) * 4
    torch.testing.assert_close(out["loss_mlm"].detach(), clm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_ce"].detach(), kl, atol=1e-5, rtol=1e-5)
    assert out["n_masked"] == 2 * 31


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sigkill_then_resume_matches_uninterrupted_run(name, teachers, students, corpora, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return ["distill", "--teacher", str(teachers[name]), "--student", str(students[name]), "--corpus",
                str(corpora[name]), "--out", str(out), "--set", "steps=60", "--set", "batch_size=4",
                "--set", "save_every=10", "--set", "lr=1e-3", "--set", "eval_batches=1", *extra]

    sigkill_resume_matches_uninterrupted(args, tmp_path, steps=60)


def test_student_and_teacher_of_different_families_are_refused(teachers, students, corpora, tmp_path):
    with pytest.raises(DistilkitError, match="gpt2 student|vocabulary size"):
        distill(str(teachers["roberta"]), str(students["gpt2"]), str(corpora["gpt2"]), str(tmp_path / "x"),
                DistillConfig(steps=1))


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("name,task", [("roberta", "mrpc"), ("gpt2", "sst2"), ("gpt2", "mrpc")])
def test_finetune_end_to_end(name, task, students, tmp_path):
    data = write_task_files(tmp_path / "data")
    cfg = FinetuneConfig(seeds=[1], epochs=3, lr=2e-3, batch_size=8, max_length=48, eval_batch_size=16)
    r = finetune(str(students[name]), task, str(data), str(tmp_path / "run"), cfg)
    train_loss = r["seeds"][0]["train_loss"]
    assert len(train_loss) == 3 and train_loss[-1] < train_loss[0]
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [("GPT2" if name == "gpt2" else "Roberta") + "ForSequenceClassification"]
    if name == "gpt2":
        assert config["pad_token_id"] == 0  # end-of-text: the last non-padding token is the one classified
    ev = evaluate(str(model_dir), task, str(data), batch_size=5)  # another batch size: other padding, same scores
    for k, v in r["seeds"][0]["metrics"].items():
        assert ev["metrics"][k] == pytest.approx(v, abs=1e-5)


# --------------------------------------------------------------------------- bench, adapt-teacher


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bench_counts_and_times_both_families(name, teachers, students):
    from distilkit.bench import bench

    sentences = [("the film was very good", None), ("a man in the city", "the story was bad")] * 4
    r = bench(str(teachers[name]), str(students[name]), sentences, {}, rounds=1, batch_size=4, warmup=1)
    t, s = r["teacher"], r["student"]
    assert (t["layers"], s["layers"]) == (4, 2) and s["params"] < t["params"]
    # GPT-2's head is tied to its word embeddings: the causal-LM model has no more parameters than the decoder
    assert (s["params_with_head"] == s["params"]) if name == "gpt2" else (s["params_with_head"] > s["params"] - 1000)


def test_adapt_teacher_gives_a_headless_roberta_a_trained_head(tmp_path, tiny_text_file):
    from transformers import RobertaModel

    from distilkit.adapt import adapt_teacher
    from distilkit.config import AdaptConfig

    teacher = make_roberta_teacher(tmp_path / "t")
    RobertaModel.from_pretrained(teacher).save_pretrained(tmp_path / "headless")  # a sentence-encoder-like checkpoint
    load_tokenizer(str(teacher)).save_pretrained(tmp_path / "headless")
    prepare_corpus(str(teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=32, heldout_fraction=0.15,
                   progress=False)
    with pytest.warns(UserWarning, match="no masked-LM head"):
        load_teacher(str(tmp_path / "headless"))
    r = adapt_teacher(str(tmp_path / "headless"), str(tmp_path / "c"), str(tmp_path / "adapted"),
                      AdaptConfig(steps=20, batch_size=8, lr=5e-3, eval_batches=None))
    assert r["after"]["perplexity"] < r["before"]["perplexity"]
    model, had_head = load_teacher(str(tmp_path / "adapted"))
    assert had_head and type(model).__name__ == "RobertaForMaskedLM"


def test_xlm_roberta_shaped_teacher_is_the_roberta_family(teachers, tmp_path):
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    config = XLMRobertaConfig(**{k: v for k, v in json.loads((teachers["roberta"] / "config.json").read_text()).items()
                                 if k not in ("model_type", "architectures", "transformers_version")})
    torch.manual_seed(1)
    model = XLMRobertaForMaskedLM(config)
    _save(tmp_path / "xlmr", model, load_tokenizer(str(teachers["roberta"])))
    init_student(str(tmp_path / "xlmr"), str(tmp_path / "s"), layers=[0, 1, 2, 3])
    student = load_student(str(tmp_path / "s"))
    assert type(student).__name__ == "XLMRobertaForMaskedLM" and families.family_of(student).name == "roberta"
    batch = _padded_batch(load_tokenizer(str(tmp_path / "xlmr")))
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(**batch).logits, model.eval()(**batch).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["roberta", "gpt2"])
def test_fused_loss_head_pieces_equal_the_family_head(name, teachers):
    """models.mlm_transform + mlm_decoder (what the fused vocabulary loss uses) equal the family's own LM head."""
    from distilkit import models
    from distilkit.families import load_model

    model, fam = load_model(str(teachers[name]), "teacher", name)
    hidden = torch.randn(5, model.config.hidden_size if name == "roberta" else model.config.n_embd)
    want = fam.lm_logits(model, hidden)
    got = models.mlm_decoder(model)(models.mlm_transform(model, hidden))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
