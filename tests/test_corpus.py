"""Corpus preparation: round trip, packing, dtypes, counts, held-out splits, gzip, atomicity, errors, memory."""

from __future__ import annotations

import copy
import gzip
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from distilkit.cli import main
from distilkit.corpus import (
    BlockCorpus,
    clean_line,
    dtype_for_vocab,
    load_text_lines,
    measure_prepare_memory,
    prepare_corpus,
)
from distilkit.models import load_tokenizer
from distilkit.utils import DistilkitError

BS = 32  # block size used with the tiny tokenizer


def stream_ids(tok, path) -> np.ndarray:
    """The reference token stream: each text line tokenized on its own, concatenated."""
    ids = tok(list(load_text_lines(path)), add_special_tokens=False)["input_ids"]
    return np.array([i for line in ids for i in line], dtype=np.int64)


def all_blocks(corpus: BlockCorpus) -> np.ndarray:
    return corpus.batch(np.arange(len(corpus))).numpy()


def shard_bytes(folder: Path, split="train") -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob(f"{split}-*.bin")))


def write_words(path: Path, n_lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_lines):
            fh.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + " .\n")
    return path


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    return load_tokenizer(tiny_teacher)


# --------------------------------------------------------------------------- text reading


def test_clean_line_and_wikitext_headings(tiny_text_file):
    assert clean_line(" = Valkyria Chronicles III = \n") == "Valkyria Chronicles III"
    assert clean_line(" = = Gameplay = = ") == "Gameplay"
    assert clean_line(" = = = Music = = = ") == "Music"
    assert clean_line(" a = b ") == "a = b"
    assert clean_line(" \n") == ""
    raw = tiny_text_file.read_text().splitlines()
    lines = list(load_text_lines(tiny_text_file))
    assert len(lines) == sum(1 for l in raw if l.strip())  # empty lines skipped, nothing else
    heads = [l for l in raw if l.strip().startswith("= ")]
    assert len(heads) == 8
    for h in heads:
        assert h.strip()[2:-2] in lines  # the title text is kept ...
    assert not any(l.startswith("=") for l in lines)  # ... without its markers


# --------------------------------------------------------------------------- round trip and layout


def test_round_trip_blocks_equal_token_stream(tiny_teacher, tiny_text_file, tok, tmp_path):
    meta = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=BS, shard_blocks=50)
    corpus = BlockCorpus(tmp_path / "c")
    blocks = all_blocks(corpus)
    expected = stream_ids(tok, tiny_text_file)
    body = BS - 2
    n = len(expected) // body
    assert n > 100 and len(corpus) == n == meta["splits"]["train"]["blocks"]
    assert blocks.shape == (n, BS)
    # [CLS] body [SEP], no padding, and the bodies concatenated are exactly the tokenized text
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    assert not (blocks == tok.pad_token_id).any()
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), expected[: n * body])
    assert meta["tokens_dropped"]["train"] == len(expected) - n * body < body
    # several shards; getitem / batch / negative index agree
    assert len(meta["splits"]["train"]["shards"]) == -(-n // 50)
    assert meta["dtype"] == "uint16" and (tmp_path / "c" / "train-00000.bin").stat().st_size == 50 * BS * 2
    np.testing.assert_array_equal(corpus[n - 1], blocks[-1])
    np.testing.assert_array_equal(corpus[-1], blocks[-1])
    assert corpus[7].dtype == np.int64 and corpus[7].shape == (BS,)
    b = corpus.batch([55, 3, 49, 50, 99])
    assert b.dtype == torch.int64 and b.shape == (5, BS)
    np.testing.assert_array_equal(b.numpy(), blocks[[55, 3, 49, 50, 99]])
    with pytest.raises(IndexError):
        corpus[n]
    # decoding a block gives back the text (lower-cased by the uncased tokenizer)
    text = "".join("".join(load_text_lines(tiny_text_file)).lower().split())
    decoded = "".join(tok.decode(blocks[0, 1:-1]).split())
    assert len(decoded) > 60 and text.startswith(decoded)
    # counts: over train bodies only, sum equals the token count
    counts = corpus.token_counts()
    assert counts.dtype == np.int64 and counts.shape == (corpus.vocab_size,) == (len(tok),)
    np.testing.assert_array_equal(counts, np.bincount(blocks[:, 1:-1].ravel(), minlength=len(tok)))
    assert counts.sum() == meta["splits"]["train"]["tokens"] == n * body == corpus.num_tokens
    # meta records what produced it
    on_disk = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert on_disk["splits"] == meta["splits"] and on_disk["block_size"] == BS
    assert on_disk["sources"]["train"][0]["sha256"] == __import__("hashlib").sha256(tiny_text_file.read_bytes()).hexdigest()
    assert len(on_disk["vocab_sha256"]) == 64 and on_disk["provenance"]["distilkit_version"]
    assert on_disk["special_ids"]["all"] == [0, 1, 2, 3, 4] and corpus.special_ids == [0, 1, 2, 3, 4]
    # readers survive pickling (DataLoader workers) without copying the data: deepcopy goes through the same
    # __reduce_ex__ / __setstate__ protocol as a pickle round trip, without unpickling bytes
    clone = copy.deepcopy(corpus)
    assert len(pickle.dumps(corpus)) < 10_000
    np.testing.assert_array_equal(clone[5], corpus[5])


def test_chunking_does_not_change_output(tiny_teacher, tiny_text_file, tmp_path):
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "a"), block_size=BS)
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "b"), block_size=BS, chunk_lines=7, shard_blocks=13)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_gz_input_same_as_plain_and_files_concatenate(tiny_teacher, tiny_text_file, tok, tmp_path):
    gz = tmp_path / "tiny.raw.gz"
    gz.write_bytes(gzip.compress(tiny_text_file.read_bytes()))
    plain = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "p"), block_size=BS)
    packed = prepare_corpus(str(tiny_teacher), [str(gz)], str(tmp_path / "g"), block_size=BS)
    assert shard_bytes(tmp_path / "p") == shard_bytes(tmp_path / "g")
    assert plain["splits"] == packed["splits"]
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "counts.npy"), np.load(tmp_path / "g" / "counts.npy"))
    assert packed["sources"]["train"][0]["sha256"] == __import__("hashlib").sha256(gz.read_bytes()).hexdigest()
    # two files form one continuous stream (no separator between them)
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file), str(gz)], str(tmp_path / "two"), block_size=BS)
    both = all_blocks(BlockCorpus(tmp_path / "two"))[:, 1:-1].reshape(-1)
    stream = np.concatenate([stream_ids(tok, tiny_text_file)] * 2)
    np.testing.assert_array_equal(both, stream[: len(both)])
    assert len(stream) - len(both) < BS - 2


def test_dtype_uint32_for_large_vocabulary(tmp_path):
    from transformers import BertConfig, BertTokenizerFast

    assert dtype_for_vocab(30522) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    folder = tmp_path / "bigtok"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(70_000)]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)  # transformers 5: `vocab`
    BertConfig(vocab_size=len(vocab)).save_pretrained(folder)
    rng = random.Random(0)
    text = tmp_path / "big.txt"
    text.write_text("\n".join(" ".join(f"w{rng.randrange(60_000, 70_000)}" for _ in range(50)) for _ in range(20)) + "\n")
    meta = prepare_corpus(str(folder), [str(text)], str(tmp_path / "c"), block_size=BS)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_005
    corpus = BlockCorpus(tmp_path / "c")
    assert (tmp_path / "c" / "train-00000.bin").stat().st_size == len(corpus) * BS * 4
    tok = load_tokenizer(folder)
    blocks = all_blocks(corpus)
    assert blocks[:, 1:-1].min() >= 60_005 and (blocks > 65_535).mean() > 0.4  # ids beyond uint16 survive
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), stream_ids(tok, text)[: blocks[:, 1:-1].size])


# --------------------------------------------------------------------------- held-out split


def test_heldout_fraction_is_deterministic_and_partitions_blocks(tiny_teacher, tiny_text_file, tok, tmp_path):
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "full"), block_size=BS)
    full = all_blocks(BlockCorpus(tmp_path / "full"))
    a = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "a"), block_size=BS, heldout_fraction=0.2, seed=1)
    b = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "b"), block_size=BS, heldout_fraction=0.2,
                       seed=1, chunk_lines=11)
    c = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=BS, heldout_fraction=0.2, seed=2)
    for split in ("train", "heldout"):
        assert shard_bytes(tmp_path / "a", split) == shard_bytes(tmp_path / "b", split)
    assert shard_bytes(tmp_path / "a", "heldout") != shard_bytes(tmp_path / "c", "heldout")
    train, held = all_blocks(BlockCorpus(tmp_path / "a")), all_blocks(BlockCorpus(tmp_path / "a", split="heldout"))
    n = len(full)
    assert len(train) + len(held) == n and a["splits"]["heldout"]["blocks"] == len(held)
    assert 0.1 * n < len(held) < 0.3 * n
    # every block lands in exactly one split, order preserved within each
    rows = {r.tobytes(): i for i, r in enumerate(full)}
    ti = [rows[r.tobytes()] for r in train]
    hi = [rows[r.tobytes()] for r in held]
    assert sorted(ti + hi) == list(range(n)) and ti == sorted(ti) and hi == sorted(hi)
    # counts cover the train split only
    np.testing.assert_array_equal(BlockCorpus(tmp_path / "a").token_counts(),
                                  np.bincount(train[:, 1:-1].ravel(), minlength=len(tok)))
    assert c["splits"]["train"]["blocks"] + c["splits"]["heldout"]["blocks"] == n
    with pytest.raises(DistilkitError, match="no 'heldout' split"):
        BlockCorpus(tmp_path / "full", split="heldout")


def test_heldout_files(tiny_teacher, tiny_text_file, tmp_path):
    other = write_words(tmp_path / "valid.txt", 60, seed=5)
    gz = tmp_path / "valid.txt.gz"
    gz.write_bytes(gzip.compress(other.read_bytes()))
    meta = prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=BS, heldout_inputs=[str(gz)])
    prepare_corpus(str(tiny_teacher), [str(other)], str(tmp_path / "v"), block_size=BS)
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "t"), block_size=BS)
    assert shard_bytes(tmp_path / "c", "heldout") == shard_bytes(tmp_path / "v", "train")
    assert shard_bytes(tmp_path / "c", "train") == shard_bytes(tmp_path / "t", "train")
    assert meta["sources"]["heldout"][0]["path"] == str(gz)
    assert len(BlockCorpus(tmp_path / "c", "heldout")) == meta["splits"]["heldout"]["blocks"] > 0
    with pytest.raises(DistilkitError, match="not both"):
        prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "x"), heldout_fraction=0.1,
                       heldout_inputs=[str(gz)])


# --------------------------------------------------------------------------- atomicity and errors


def test_existing_output_refused_and_overwrite(tiny_teacher, tiny_text_file, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DistilkitError, match="exists and is not empty"):
        prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(out), block_size=BS)
    assert (out / "keep.txt").read_text() == "x"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(out), block_size=BS, overwrite=True)
    assert not (out / "keep.txt").exists() and len(BlockCorpus(out)) > 0


def test_failure_leaves_nothing_and_names_file_and_line(tiny_teacher, tiny_text_file, tmp_path):
    bad = tmp_path / "in" / "bad.txt"
    bad.parent.mkdir()
    bad.write_bytes(tiny_text_file.read_bytes() * 3 + b"fine line\nbroken \xff\xfe line\nmore\n")
    bad_line = tiny_text_file.read_text().count("\n") * 3 + 2
    out_parent = tmp_path / "runs"
    with pytest.raises(DistilkitError) as err:
        prepare_corpus(str(tiny_teacher), [str(tiny_text_file), str(bad)], str(out_parent / "c"), block_size=BS, chunk_lines=10)
    assert str(err.value).startswith(f"{bad}:{bad_line}: expected UTF-8")
    assert "\n" not in str(err.value)
    assert list(out_parent.iterdir()) == []  # no output folder, no temp folder left behind
    # a failing overwrite leaves the previous corpus intact
    good = out_parent / "good"
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(good), block_size=BS)
    before = shard_bytes(good)
    with pytest.raises(DistilkitError):
        prepare_corpus(str(tiny_teacher), [str(bad)], str(good), block_size=BS, overwrite=True)
    assert shard_bytes(good) == before and sorted(p.name for p in out_parent.iterdir()) == ["good"]


def test_bad_inputs(tiny_teacher, tiny_text_file, tmp_path):
    t = str(tiny_teacher)
    with pytest.raises(DistilkitError, match="missing.txt: no such file"):
        prepare_corpus(t, [str(tiny_text_file), str(tmp_path / "missing.txt")], str(tmp_path / "o1"))
    short = tmp_path / "short.txt"
    short.write_text("\n the film was good .\n\n")
    with pytest.raises(DistilkitError, match=r"short.txt: expected at least 30 tokens to fill one block of 32 \(got 5 tokens"):
        prepare_corpus(t, [str(short)], str(tmp_path / "o2"), block_size=BS)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n \n")
    with pytest.raises(DistilkitError, match="empty.txt: expected at least"):
        prepare_corpus(t, [str(empty)], str(tmp_path / "o3"), block_size=BS)
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(tiny_text_file.read_bytes())[:-200])
    with pytest.raises(DistilkitError, match=r"cut.gz:\d+: expected a readable gzip stream"):
        prepare_corpus(t, [str(truncated)], str(tmp_path / "o4"), block_size=BS)
    with pytest.raises(DistilkitError, match="heldout fraction"):
        prepare_corpus(t, [str(tiny_text_file)], str(tmp_path / "o5"), heldout_fraction=1.0)
    with pytest.raises(DistilkitError, match="block_size"):
        prepare_corpus(t, [str(tiny_text_file)], str(tmp_path / "o6"), block_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gz", "empty.txt", "short.txt"]
    with pytest.raises(DistilkitError, match="meta.json"):
        BlockCorpus(tmp_path)


def test_truncated_shard_detected(tiny_teacher, tiny_text_file, tmp_path):
    prepare_corpus(str(tiny_teacher), [str(tiny_text_file)], str(tmp_path / "c"), block_size=BS)
    shard = tmp_path / "c" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DistilkitError, match="incomplete"):
        BlockCorpus(tmp_path / "c")


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_corpus(tiny_teacher, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["prepare-corpus", "--tokenizer", str(tiny_teacher), "--input", str(tiny_text_file), "--out", str(out),
               "--block-size", str(BS), "--heldout-fraction", "0.1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert f"train: {meta['splits']['train']['tokens']:,} tokens in {meta['splits']['train']['blocks']:,} blocks" in printed
    assert "heldout:" in printed
    # errors: exit 2 with one line naming the file
    for argv, needle in [
        (["--input", str(tiny_text_file), "--out", str(out)], "output folder exists"),
        (["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")], "nope.txt: no such file"),
        (["--input", str(tmp_path), "--out", str(tmp_path / "d")], f"{tmp_path}: expected a text file, got a folder"),
        (["--input", str(tiny_text_file), "--out", str(tmp_path / "d"), "--block-size", "1000"],
         "block_size 1000 exceeds the 128 positions of the model"),
    ]:
        rc = main(["prepare-corpus", "--tokenizer", str(tiny_teacher), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and err.count("\n") == 1 and err.startswith("distilkit prepare-corpus: error:")


# --------------------------------------------------------------------------- memory stays flat


def test_memory_stays_flat_as_corpus_grows(tiny_teacher, tmp_path):
    """Python/numpy peak allocation while preparing 1x and 8x the text: the same, while the data grew 8x."""
    base = write_words(tmp_path / "x1.txt", 2000, seed=1)
    big = tmp_path / "x8.txt"
    big.write_text("".join(write_words(tmp_path / f"part{i}.txt", 2000, seed=i).read_text() for i in range(1, 9)))
    r1 = measure_prepare_memory(str(tiny_teacher), [str(base)], str(tmp_path / "o1"), tracemalloc=True, isolated=False, block_size=BS)
    r8 = measure_prepare_memory(str(tiny_teacher), [str(big)], str(tmp_path / "o8"), tracemalloc=True, isolated=False, block_size=BS)
    assert r8["input_bytes"] > 7.5 * r1["input_bytes"] and r8["tokens"] > 7.5 * r1["tokens"]
    growth_bytes = (r8["python_peak_mib"] - r1["python_peak_mib"]) * 2**20
    # holding even the uint16 blocks of the extra text would cost 2 bytes/token (~0.9 MiB); allow a quarter
    # of that (run-to-run noise of the peak is ~60 KiB; a Python list of the ids would cost >8 bytes/token)
    assert growth_bytes < 0.25 * 2 * (r8["tokens"] - r1["tokens"]), (r1, r8)
    assert r8["python_peak_mib"] < 1.2 * r1["python_peak_mib"], (r1, r8)


@pytest.mark.slow
def test_memory_stays_flat_rss_subprocess(tiny_teacher, tmp_path):
    """Peak RSS of a fresh process preparing 1x and 8x a ~1.2 MB text (tokenizer and imports loaded first)."""
    base = write_words(tmp_path / "x1.txt", 8000, seed=1)
    big = tmp_path / "x8.txt"
    with open(big, "w") as fh:
        for _ in range(8):
            fh.write(base.read_text())
    r1 = measure_prepare_memory(str(tiny_teacher), [str(base)], str(tmp_path / "o1"), block_size=BS)
    r8 = measure_prepare_memory(str(tiny_teacher), [str(big)], str(tmp_path / "o8"), block_size=BS)
    assert r8["tokens"] > 7.9 * r1["tokens"] > 1_000_000
    growth_mib = (r8["peak_rss_mib"] - r8["rss_before_mib"]) - (r1["peak_rss_mib"] - r1["rss_before_mib"])
    # the 8x corpus as int64 would be ~8 bytes x 2M tokens = ~16 MiB more
    assert growth_mib < 8, (r1, r8)


# --------------------------------------------------------------------------- real data


WIKI = "wikitext/wikitext-2-raw"


@pytest.mark.data
def test_wikitext2_valid_with_minilm(shared_data, tmp_path):
    src = shared_data / WIKI / "wiki.valid.raw.gz"
    meta = prepare_corpus("minilm", [str(src)], str(tmp_path / "c"), block_size=128, progress=False)
    tok = load_tokenizer("minilm")
    expected = stream_ids(tok, src)
    # pinned: 235,732 minilm (uncased BERT WordPiece) tokens in the 2,461 non-empty lines of wiki.valid.raw
    assert len(expected) == 235_732 and meta["sources"]["train"][0]["lines"] == 2461
    assert meta["splits"]["train"]["tokens"] == 1870 * 126 and meta["tokens_dropped"]["train"] == 112
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 30522
    corpus = BlockCorpus(tmp_path / "c")
    blocks = all_blocks(corpus)
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), expected[: 1870 * 126])
    first = tok.decode(corpus[0])
    assert first.startswith("[CLS] homarus gammarus homarus gammarus, known as the european lobster or common lobster")
    assert first.endswith("[SEP]")
    with pytest.raises(DistilkitError, match="model_max_length 512"):
        prepare_corpus("minilm", [str(src)], str(tmp_path / "d"), block_size=1024)


def test_no_too_long_warning_with_minilm(tmp_path, capfd):
    """Lines longer than the model's 512 positions are fine (blocks are cut later): no transformers warning."""
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["the lobster is blue ."] * 300) + "\n")
    capfd.readouterr()
    meta = prepare_corpus("minilm", [str(long)], str(tmp_path / "c"), progress=False)
    assert meta["splits"]["train"]["tokens"] == 11 * 126 and meta["tokens_dropped"]["train"] == 1500 - 11 * 126
    assert "longer than the specified maximum" not in capfd.readouterr().err
