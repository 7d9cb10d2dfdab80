"""prepare-corpus from dataset files: JSONL / CSV / Parquet (`--text-field`) give the same blocks and counts as
the same text in a plain file; bad records stop with one line naming the file and record, nothing written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from distilkit.cli import main
from distilkit.corpus import BlockCorpus, load_text_lines, prepare_corpus
from distilkit.sources import RecordSource, builder_of, is_hub_id

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lines(tiny_text_file) -> list[str]:
    return [line for line in tiny_text_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def containers(lines, tmp_path_factory) -> dict[str, Path]:
    """The tiny text file's lines as records (one line per record) in every container."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("containers")
    frame = pd.DataFrame({"id": range(len(lines)), "body": lines})
    paths = {"jsonl": folder / "c.jsonl", "jsonl.gz": folder / "c.jsonl.gz", "csv": folder / "c.csv",
             "parquet": folder / "c.parquet"}
    text = "".join(json.dumps({"id": i, "body": line}) + "\n" for i, line in enumerate(lines))
    paths["jsonl"].write_text(text)
    paths["jsonl.gz"].write_bytes(gzip.compress(text.encode()))
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    return paths


def _prepare(tokenizer, inputs, out, **kw) -> dict:
    return prepare_corpus(str(tokenizer), [str(p) for p in inputs], str(out), block_size=32, progress=False, **kw)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "csv", "parquet"])
def test_same_text_same_blocks_and_counts_whatever_the_container(kind, containers, tiny_teacher, tiny_text_file, tmp_path):
    plain = _prepare(tiny_teacher, [tiny_text_file], tmp_path / "plain", heldout_fraction=0.2)
    records = _prepare(tiny_teacher, [containers[kind]], tmp_path / "records", heldout_fraction=0.2, text_field="body")
    for key in ("splits", "tokens_dropped", "counts", "vocab_sha256"):
        if key == "splits":
            for split in plain["splits"]:
                assert records["splits"][split]["blocks"] == plain["splits"][split]["blocks"]
                assert records["splits"][split]["tokens"] == plain["splits"][split]["tokens"]
        else:
            assert records[key] == plain[key], key
    for split in ("train", "heldout"):
        a, b = BlockCorpus(tmp_path / "plain", split), BlockCorpus(tmp_path / "records", split)
        assert np.array_equal(a.batch(np.arange(len(a))).numpy(), b.batch(np.arange(len(b))).numpy())
    assert np.array_equal(np.load(tmp_path / "plain" / "counts.npy"), np.load(tmp_path / "records" / "counts.npy"))
    assert records["text_field"] == "body" and records["sources"]["train"][0]["sha256"]


def test_multi_line_records_are_split_like_a_text_file(tmp_path, tiny_teacher, lines):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "\n".join(lines[:150])}) + "\n"
                                      + json.dumps({"text": "\n".join(lines[150:])}) + "\n")
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    assert [t for _, t in RecordSource(tmp_path / "c.jsonl")] == list(load_text_lines(tmp_path / "c.txt"))
    a = _prepare(tiny_teacher, [tmp_path / "c.jsonl"], tmp_path / "a")  # default field: text
    b = _prepare(tiny_teacher, [tmp_path / "c.txt"], tmp_path / "b")
    assert a["splits"]["train"]["tokens"] == b["splits"]["train"]["tokens"] > 0


def test_cli_text_field(containers, tiny_teacher, tmp_path, capsys):
    assert main(["prepare-corpus", "--tokenizer", str(tiny_teacher), "--input", str(containers["parquet"]),
                 "--text-field", "body", "--out", str(tmp_path / "c"), "--block-size", "32", "--no-progress"]) == 0
    assert "train:" in capsys.readouterr().out and BlockCorpus(tmp_path / "c").block_size == 32


@pytest.mark.parametrize(
    "name,content,field,expected",
    [
        ("missing.jsonl", ['{"text": "the film"}', '{"body": "a man"}'], None, r"missing.jsonl:record 2: expected a string in field 'text', got nothing \(missing or null\)"),
        ("number.jsonl", ['{"text": 12}'] * 3, None, r"number.jsonl:record 1: expected a string in field 'text', got int"),
        ("null.jsonl", ['{"text": null}'], None, r"null.jsonl:record 1: expected a string in field 'text', got nothing"),
        ("broken.jsonl", ['{"text": "the film"}', '{"text": '], None, r"broken.jsonl"),
        ("wrongfield.csv", ["text,label", "the film,1"], "body", r"wrongfield.csv:record 1: expected a field 'body'"),
        ("empty.jsonl", ['{"text": ""}', '{"text": "   "}'], None, r"empty.jsonl: expected at least \d+ tokens"),
    ],
)
def test_bad_records_stop_with_one_line_and_write_nothing(name, content, field, expected, tiny_teacher, tmp_path, capsys):
    path = tmp_path / name
    path.write_text("\n".join(content) + "\n")
    out = tmp_path / "out"
    args = ["prepare-corpus", "--tokenizer", str(tiny_teacher), "--input", str(path), "--out", str(out),
            "--block-size", "32", "--no-progress"] + (["--text-field", field] if field else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    import re

    assert re.search(expected, err), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [name]


def test_builders_and_hub_ids(tmp_path):
    assert builder_of("a/b.JSONL") == "json" and builder_of("x.csv.gz") == "csv" and builder_of("y.parquet") == "parquet"
    assert builder_of("wiki.train.raw.gz") is None
    assert is_hub_id("wikitext") and is_hub_id("owner/name")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./local") and not is_hub_id("data.jsonl")
