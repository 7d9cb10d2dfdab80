"""Smoke tests of benchmarks/distill_throughput.py and benchmarks/corpus_memory.py on tiny models.

They check what the benchmarks compute (loss definitions, token counts, the FLOPs formula, the JSON),
never timings.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distilkit import losses, models
from distilkit.config import DistillConfig
from distilkit.corpus import BlockCorpus, load_text_lines, prepare_corpus
from distilkit.masking import IGNORE_INDEX
from distilkit.student import student_from_teacher

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
BLOCK = 32


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


dt = _load("distill_throughput")
cm = _load("corpus_memory")
ft = _load("finetune_throughput")


@pytest.fixture(scope="module")
def tiny(tiny_teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher, _ = models.load_teacher(str(tiny_teacher), warn_missing_head=False)
    teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, [0, 2])
    return teacher, student, models.load_tokenizer(str(tiny_teacher))


@pytest.fixture(scope="module")
def tiny_corpus(tiny_teacher, tiny_text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_corpus") / "corpus"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(out), block_size=BLOCK, progress=False)
    return out


def _naive_variant(tiny, text, cfg=None, batch_size=4):
    teacher, student, tok = tiny
    lines = list(load_text_lines(text))
    batches = dt.naive_batches(tok, lines, batch_size, BLOCK, seed=0)
    return dt.NaiveStep(student, teacher, tok, cfg or DistillConfig(smoothing=None), batches, seed=0)


def _reference_variant(tiny, text, kl_positions="all", batch_size=4):
    teacher, student, tok = tiny
    seqs = dt.reference_sequences(tok, list(load_text_lines(text)), BLOCK)
    batches = dt.reference_batches(seqs, batch_size, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, seed=0)
    return dt.ReferenceStep(student, teacher, tok, DistillConfig(smoothing=None, kl_positions=kl_positions), batches, seed=0)


def _padded_batch(variant):
    for _ in range(20):  # a batch that really has padding, so that padding exclusion is tested
        batch = next(variant.batches)
        if int(batch.attention_mask.sum()) < batch.attention_mask.numel():
            return batch
    raise AssertionError("no padded batch found")


def _close(a, b, tol=1e-5):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("kl_positions", ["all", "masked"])
@pytest.mark.parametrize("fused", [True, False])
def test_reference_loss_equals_distilkit_loss_with_the_same_kl_positions(tiny, tiny_text_file, kl_positions, fused):
    """On identical (padded, masked) inputs, the paper's full-logits loss (KL at all positions, or at the masked
    ones: --restrict_ce_to_mask) = compute_losses with the same kl_positions, fused or not."""
    teacher, _, _ = tiny
    ref = _reference_variant(tiny, tiny_text_file, kl_positions)
    ref.student.eval()
    batch = _padded_batch(ref)
    inputs = ref.mask(batch)
    assert (inputs["labels"] != IGNORE_INDEX).any()
    cfg = DistillConfig(kl_positions=kl_positions, smoothing=None)
    want = dt.reference_losses(ref.student, teacher, inputs, cfg, kl_positions)
    got = losses.compute_losses(ref.student, teacher, inputs, cfg, fused=fused)
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
        assert _close(got[key], want[key]), (key, float(got[key]), float(want[key]))
    assert got["n_tokens"] == want["n_tokens"] == int(batch.attention_mask.sum())


def test_reference_data_follow_the_paper_rules(tiny, tiny_text_file):
    """[CLS] line [SEP]; long lines split at the max length; <= 11 tokens dropped; batches from one length bin."""
    _, _, tok = tiny
    lines = list(load_text_lines(tiny_text_file))
    seqs = dt.reference_sequences(tok, lines, BLOCK)
    raw = [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]]
    pieces = [(n + BLOCK - 3) // (BLOCK - 2) for n in raw]  # pieces per line before dropping short ones
    assert len(seqs) < sum(pieces) and any(n > BLOCK - 2 for n in raw)  # some split, some dropped
    assert all(s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in seqs)
    assert all(dt.REFERENCE_MIN_TOKENS < len(s) <= BLOCK for s in seqs)
    assert sum(len(s) - 2 for s in seqs) == sum(n for n in raw) - sum(
        n for n in raw if n + 2 <= dt.REFERENCE_MIN_TOKENS) - _dropped_tail_tokens(raw)
    it = dt.reference_batches(seqs, 4, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, seed=0)
    for _ in range(10):
        b = next(it)
        lengths = b.attention_mask.sum(1)
        assert b.input_ids.shape == (4, int(lengths.max()))
        assert int(lengths.max() // dt.REFERENCE_BIN_WIDTH) == int(lengths.min() // dt.REFERENCE_BIN_WIDTH)
        assert int(b.input_ids[b.attention_mask == 0].ne(tok.pad_token_id).sum()) == 0


def _dropped_tail_tokens(raw):
    """Tokens in split pieces that end up too short (a long line's last piece of <= 9 tokens)."""
    body = BLOCK - 2
    return sum(n % body for n in raw if n > body and 0 < n % body and n % body + 2 <= dt.REFERENCE_MIN_TOKENS)


def test_partial_projection_equals_full_logits_at_masked_positions(tiny, tiny_corpus):
    """distilkit's step (projection only at masked positions) = the full-logits terms gathered at those positions."""
    teacher, student, tok = tiny
    blocks = BlockCorpus(tiny_corpus)
    cfg = DistillConfig(smoothing=None)  # kl_positions="masked"
    v = dt.DistilkitStep(student, teacher, tok, cfg, dt.block_batches(blocks, 4, tok.pad_token_id,
                                                                         tok.cls_token_id, tok.sep_token_id), seed=0)
    v.student.eval()
    batch = next(v.batches)
    assert batch.text_tokens == 4 * (BLOCK - 2) and batch.lengths == [BLOCK] * 4
    inputs = v.mask(batch)
    got = v.loss(inputs)
    masked = inputs["labels"].reshape(-1) != IGNORE_INDEX
    s_out = v.student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    vocab = s_out.logits.shape[-1]
    s_l, t_l = s_out.logits.reshape(-1, vocab)[masked], t_out.logits.reshape(-1, vocab)[masked]
    T = cfg.temperature
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_l / T, -1), torch.softmax(t_l / T, -1), reduction="batchmean") * T**2
    ce = torch.nn.functional.cross_entropy(s_l, inputs["labels"].reshape(-1)[masked])
    dim = s_out.hidden_states[-1].shape[-1]
    cos = 1 - torch.nn.functional.cosine_similarity(s_out.hidden_states[-1].reshape(-1, dim),
                                                    t_out.hidden_states[-1].reshape(-1, dim)).mean()
    assert _close(got["loss_ce"], kl) and _close(got["loss_mlm"], ce) and _close(got["loss_cos"], cos)
    assert v.projected(inputs, got) == int(masked.sum()) == got["n_masked"]


@pytest.mark.parametrize("kind", ["naive", "reference", "reference_masked", "distilkit", "distilkit_kl_all"])
def test_flops_formula_matches_torch_flop_counter(tiny, tiny_text_file, tiny_corpus, kind):
    """The analytic matmul FLOPs of a step (executed work) = what torch's FlopCounterMode counts."""
    teacher, student, tok = tiny
    if kind == "naive":
        v = _naive_variant(tiny, tiny_text_file)
        batch = _padded_batch(v)
    elif kind.startswith("reference"):
        v = _reference_variant(tiny, tiny_text_file, "masked" if kind == "reference_masked" else "all")
        batch = next(v.batches)
    else:
        blocks = BlockCorpus(tiny_corpus)
        cfg = DistillConfig(kl_positions="all" if kind == "distilkit_kl_all" else "masked", smoothing=None)
        v = dt.DistilkitStep(student, teacher, tok, cfg, dt.block_batches(blocks, 4, 0, tok.cls_token_id, tok.sep_token_id), 0)
        batch = next(v.batches)
    inputs = v.mask(batch)
    box = {}

    def fwd_bwd():
        box["result"] = v.loss(inputs)
        box["result"]["loss"].backward()

    counted = dt.count_flops(fwd_bwd)
    n = v.projected(inputs, box["result"])
    shape = dt.Shape.of(teacher, v.student)
    stats = dt.StepStats(batch.text_tokens, batch.lengths, batch.input_ids.shape[1], box["result"]["n_masked"], n, 0.0)
    assert counted == pytest.approx(dt.executed_flops(shape, stats), rel=1e-9)
    if kind == "naive":  # useful work: real lengths and masked positions only, less than what ran
        assert dt.model_flops(shape, stats) < dt.executed_flops(shape, stats)
        assert n == batch.input_ids.numel()
    elif kind.startswith("reference"):  # full logits everywhere: at least the useful work of its objective
        assert dt.model_flops(shape, stats, v.credit) <= dt.executed_flops(shape, stats)
    else:
        assert dt.model_flops(shape, stats, v.credit) == pytest.approx(counted, rel=1e-9)


def test_flops_formula_by_hand():
    shape = dt.Shape(teacher_layers=6, student_layers=3, d=384, f=1536, vocab=30522)
    per_layer = 128 * (8 * 384**2 + 4 * 384 * 1536) + 4 * 128**2 * 384
    head = 100 * (2 * 384**2 + 2 * 384 * 30522)
    assert dt.step_flops(shape, [128], 100, 100) == 6 * per_layer + head + 3 * (3 * per_layer + head)


def test_benchmark_end_to_end(tiny_teacher, tiny_text_file, tiny_corpus, tmp_path):
    out = tmp_path / "results" / "dt.json"
    r = dt.main(["--teacher", str(tiny_teacher), "--text", str(tiny_text_file), "--corpus", str(tiny_corpus),
                 "--layers", "0,2", "--batch-size", "4", "--max-length", str(BLOCK), "--rounds", "2", "--steps", "2",
                 "--variants", "reference,reference_masked,distilkit,distilkit_kl_all,distilkit_bf16,distilkit_unfused",
                 "--peak-size", "64", "--peak-repeats", "2", "--block-peak-size", "48", "--attention-dropout", "0",
                 "--profile", "--micro", "--out", str(out), "--quiet"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    res = r["results"]
    assert set(res) == {"reference", "reference_masked", "distilkit", "distilkit_kl_all", "distilkit_bf16",
                        "distilkit_unfused", "distilkit_attention_dropout"}
    # the tiny teacher's attention dropout is already 0: the variant computes exactly distilkit's step
    assert res["distilkit_attention_dropout"]["last_loss"] == res["distilkit"]["last_loss"]
    assert res["distilkit_unfused"]["last_loss"] == pytest.approx(res["distilkit"]["last_loss"], rel=1e-4)
    assert res["distilkit_bf16"]["precision"] == "bf16" and res["distilkit"]["precision"] == "fp32"
    assert res["distilkit_bf16"]["last_loss"] == pytest.approx(res["distilkit"]["last_loss"], rel=5e-2)
    assert res["distilkit"]["text_tokens_per_step"] == 4 * (BLOCK - 2)
    assert res["distilkit"]["padded_positions_per_step"] == res["distilkit"]["positions_per_step"] == 4 * BLOCK
    assert res["reference"]["projected_per_step"] == res["reference"]["padded_positions_per_step"]
    assert res["reference"]["padding_share"] < 0.1  # length-grouped: at most 3 pad tokens per sequence
    assert res["distilkit"]["projected_per_step"] == res["distilkit"]["masked_per_step"]
    assert res["distilkit_kl_all"]["projected_per_step"] == 4 * BLOCK
    assert res["reference"]["kl_positions"] == "all" and res["reference_masked"]["kl_positions"] == "masked"
    for v in res.values():
        assert len(v["tokens_per_s"]["rounds"]) == 2 and len(v["step_seconds_per_round"][0]) == 2
        assert v["tokens_per_s"]["median"] > 0 and 0 < v["mfu"] and np.isfinite(v["last_loss"])
        assert v["model_flops_per_text_token"] <= v["executed_flops_per_text_token"]
    sp = r["speedup"]
    ratio = res["distilkit"]["tokens_per_s"]["median"] / res["reference_masked"]["tokens_per_s"]["median"]
    assert sp["distilkit_vs_reference"]["ratio_of_medians"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)
    assert sp["distilkit_vs_reference"]["denominator"] == "reference_masked"
    assert sp["distilkit_kl_all_vs_reference"]["denominator"] == "reference"
    assert sp["distilkit_default_bf16_vs_reference"]["precision"] == {"distilkit_bf16": "bf16", "reference": "fp32"}
    assert {"bf16_vs_fp32", "fused_vs_unfused"} <= set(sp) and "distilkit_vs_naive" not in sp
    t = r["targets"]
    assert t["speedup"] == sp["distilkit_vs_reference"]["ratio_of_medians"] and t["speedup_met"] == (t["speedup"] >= 2.5)
    assert t["mfu_vs_best_peak"] == res["distilkit"]["mfu_vs_best_peak"]
    if r["machine"]["cpu_bf16"]:
        assert t["bf16_speedup"] == sp["bf16_vs_fp32"]["ratio_of_medians"] and t["bf16_mfu_vs_bf16_peak"] is not None
    else:
        assert t["bf16_speedup"] is None and t["bf16_speedup_met"] is None
    measured = r["peak"]["measurements"]
    assert set(r["peak"]["gflops"]) == {"fp32", "bf16"}
    assert r["peak"]["gflops"]["fp32"] == pytest.approx(max(m["gflops"] for m in measured if m["dtype"] == "float32"), rel=1e-9)
    assert len(measured) == 2 * 2 + 2 * 2 * 7  # fp32 and bf16 at start and end, before and after every block
    for v in res.values():  # MFU of a block is against the better of the peaks measured around it
        assert v["mfu"] == pytest.approx(float(np.median(v["mfu_rounds"])), abs=1e-4)
        assert all(p <= r["peak"]["gflops"][v["precision"]] + 1e-6 for p in v["matched_peak_gflops_rounds"])
    assert r["data"]["corpus_blocks"] == len(BlockCorpus(tiny_corpus)) and len(r["data"]["corpus_sha256"]) == 64
    assert "git_commit" in r and "torch" in r and r["machine"]["torch_threads"] >= 1
    m = r["machine"]
    assert m["cpu_model"] and isinstance(m["cpu_flags"], list) and "malloc_tuning" in m["allocator"]
    assert len(m["load_after_each_round"]) == 2
    for name in ("reference", "reference_masked"):
        assert (out.parent / r["profile"][name]["table"]).is_file()
        assert sum(r["profile"][name]["self_cpu_share_by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(r["micro"]["adamw_step_ms"]) == {"default", "foreach", "fused"}
    assert r["micro"]["loss_terms"]["positions"] > 0 and r["micro"]["loss_terms"]["eager_ms"] > 0


def test_unknown_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        dt.parse_args(["--variants", "distilkit,bogus"])
    assert exc.value.code == 2 and "bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_variant_computes_the_same_step(tiny_teacher, tiny_text_file, tiny_corpus, tmp_path):
    """--compile: the torch.compile'd encoders give distilkit's losses (tiny teacher: dropout 0, same data)."""
    r = dt.main(["--teacher", str(tiny_teacher), "--text", str(tiny_text_file), "--corpus", str(tiny_corpus),
                 "--layers", "0,2", "--batch-size", "4", "--max-length", str(BLOCK), "--rounds", "2", "--steps", "2",
                 "--peak-size", "64", "--peak-repeats", "2", "--block-peak-size", "48", "--compile",
                 "--variants", "naive,distilkit", "--out", str(tmp_path / "dt.json"), "--quiet"])
    res = r["results"]
    assert set(res) == {"naive", "distilkit", "distilkit_compiled"}
    assert res["distilkit_compiled"]["last_loss"] == pytest.approx(res["distilkit"]["last_loss"], rel=1e-4)
    assert res["distilkit_compiled"]["masked_per_step"] == res["distilkit"]["masked_per_step"]


def test_read_memory_reads_every_block_once(tiny_corpus):
    r = cm.measure_read_memory(str(tiny_corpus), batch_size=5, isolated=False)
    blocks = BlockCorpus(tiny_corpus)
    assert r["blocks"] == len(blocks) and r["batches"] == -(-len(blocks) // 5)
    assert r["checksum"] == int(blocks.batch(np.arange(len(blocks))).sum())
    assert r["shard_bytes"] == len(blocks) * BLOCK * 2


@pytest.mark.slow
def test_corpus_memory_end_to_end(tiny_teacher, tiny_text_file, tmp_path):
    out = tmp_path / "cm.json"
    r = cm.main(["--tokenizer", str(tiny_teacher), "--text", str(tiny_text_file), "--copies", "1,3",
                 "--block-size", str(BLOCK), "--out", str(out), "--quiet", "--tmp-dir", str(tmp_path)])
    assert json.loads(out.read_text())["flat"] == r["flat"]
    one, three = r["runs"]
    assert three["prepare"]["tokens"] >= 3 * one["prepare"]["tokens"] - 2 * BLOCK
    assert three["read"]["blocks"] >= 3 * one["read"]["blocks"] - 2
    assert r["flat"]["token_ratio"] == pytest.approx(3.0, rel=0.01)


@pytest.mark.slow
def test_allocator_side_by_side_runs_both_settings_in_fresh_processes(tiny_teacher, tiny_text_file, tiny_corpus, tmp_path):
    """--allocator-rounds: each round, one process with DISTILKIT_MALLOC_TUNING=1 and one with =0."""
    import platform

    r = dt.main(["--teacher", str(tiny_teacher), "--text", str(tiny_text_file), "--corpus", str(tiny_corpus),
                 "--layers", "0,2", "--batch-size", "4", "--max-length", str(BLOCK), "--rounds", "1", "--steps", "1",
                 "--variants", "distilkit", "--peak-size", "64", "--peak-repeats", "1", "--block-peak-size", "48",
                 "--allocator-rounds", "1", "--allocator-steps", "1", "--out", str(tmp_path / "dt.json"), "--quiet"])
    a = r["allocator"]
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert a["tuning_applied"] == {"on": [glibc], "off": [False]}
    assert a["tokens_per_s"]["on"]["median"] > 0 and a["tokens_per_s"]["off"]["median"] > 0
    assert len(a["ratio_on_vs_off"]["per_round"]) == 1


@pytest.mark.slow  # ~60 s on a shared 2-core machine
def test_finetune_benchmark_end_to_end(tiny_teacher, shared_data, tmp_path):
    """finetune_throughput on the real CoLA / MRPC train files with a tiny teacher and its cut student:
    every (task, model, precision) timed each round through finetune.train, ratios from the medians."""
    out = tmp_path / "ft.json"
    r = ft.main(["--data-dir", str(shared_data), "--teacher", str(tiny_teacher), "--layers", "0,2", "--rounds", "2",
                 "--steps", "1", "--out", str(out), "--quiet"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    names = {f"{t}/{m}/{p}" for t in ("cola", "mrpc") for m in ("teacher", "student") for p in ("fp32", "bf16")}
    assert set(r["results"]) == names
    for name, v in r["results"].items():
        assert v["steps_per_round"] == 1 and v["examples_per_round"] == v["batch_size"]
        assert len(v["examples_per_s"]["rounds"]) == 2 and v["examples_per_s"]["median"] > 0
        assert v["accelerator_precision"] == ("bf16" if name.endswith("bf16") else "no") and np.isfinite(v["last_loss"])
    assert r["results"]["cola/student/fp32"]["params"] < r["results"]["cola/teacher/fp32"]["params"]
    a, b = r["results"]["mrpc/teacher/bf16"], r["results"]["mrpc/teacher/fp32"]
    assert r["ratios"]["mrpc/teacher/bf16_vs_fp32"]["ratio_of_medians"] == pytest.approx(
        a["examples_per_s"]["median"] / b["examples_per_s"]["median"], rel=1e-2)
    assert len(r["machine"]["load_after_each_round"]) == 2 and r["machine"]["cpu_model"]
