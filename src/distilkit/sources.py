"""Corpus text from dataset files (JSONL, CSV, Parquet) and hub datasets, for `prepare-corpus --text-field`.

Read with the `datasets` library in streaming mode (records are read a batch at a time, so memory stays
flat whatever the file size). Each record's text field is split into lines and cleaned exactly like a
line of a plain text file (`corpus.clean_line`), so the same text gives the same token stream, blocks and
counts whatever the container. A record whose field is missing or not a string stops with one line naming
the file and the record (1-based), and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator

from .utils import DistilkitError, fail_at

DEFAULT_TEXT_FIELD = "text"
#: file name endings -> the `datasets` builder that reads them
BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".csv": "csv",
            ".csv.gz": "csv", ".parquet": "parquet"}


def builder_of(path: str | os.PathLike) -> str | None:
    """The `datasets` builder for a record file, None for plain text."""
    name = str(path).lower()
    for ending in sorted(BUILDERS, key=len, reverse=True):
        if name.endswith(ending):
            return BUILDERS[ending]
    return None


def is_hub_id(path: str) -> bool:
    """`owner/name` (or `name`) that is not an existing path: a hub dataset id."""
    return not Path(path).exists() and not path.startswith((".", "/", "~")) and builder_of(path) is None


def is_record_source(path: str | os.PathLike, text_field: str | None) -> bool:
    return builder_of(path) is not None or (text_field is not None and is_hub_id(str(path)))


class RecordSource:
    """One dataset file (or hub dataset), streamed as (record_number, line) pairs of non-empty cleaned lines.

    The same interface as `corpus.TextSource`: after full iteration `sha256`, `nbytes` and `lines` are set.
    """

    def __init__(self, path: str | os.PathLike, text_field: str | None = None,
                 on_bytes: Callable[[int], None] | None = None):
        self.path = str(path)
        self.text_field = text_field or DEFAULT_TEXT_FIELD
        self.on_bytes = on_bytes
        self.sha256: str | None = None
        self.nbytes = 0
        self.lines = 0

    def _records(self):
        import datasets

        builder = builder_of(self.path)
        try:
            if builder is None:  # hub id (needs the network)
                return iter(datasets.load_dataset(self.path, split="train", streaming=True))
            return iter(datasets.load_dataset(builder, data_files=self.path, split="train", streaming=True))
        except Exception as exc:  # noqa: BLE001 - any reader failure is bad input, reported in one line
            raise fail_at(self.path, None, f"expected a readable {builder or 'hub'} dataset ({_first_line(exc)})") from None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        import datasets

        verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)  # its reader errors come back as one line here
        datasets.disable_progress_bars()
        try:
            yield from self._read()
        finally:
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()

    def _read(self) -> Iterator[tuple[int, str]]:
        from .corpus import clean_line

        records = self._records()
        number = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - malformed JSON / CSV / Parquet
                raise fail_at(self.path, f"record {number + 1}", f"expected well-formed records from here on ({_first_line(exc)})") from None
            number += 1
            if self.text_field not in record:
                have = ", ".join(map(str, record)) or "none"
                raise fail_at(self.path, f"record {number}", f"expected a field '{self.text_field}' (fields: {have}); "
                              "choose one with --text-field")
            text = record[self.text_field]
            if not isinstance(text, str):  # a field absent from some records reads as None (schema of the file)
                got = "nothing (missing or null)" if text is None else type(text).__name__
                raise fail_at(self.path, f"record {number}", f"expected a string in field '{self.text_field}', got {got}")
            for line in text.splitlines():
                line = clean_line(line)
                if line:
                    self.lines += 1
                    yield number, line
        if Path(self.path).is_file():
            self.sha256, self.nbytes = _sha256(self.path)
            if self.on_bytes is not None:
                self.on_bytes(self.nbytes)
        elif number == 0:
            raise DistilkitError(f"{self.path}: expected at least one record")


def _sha256(path: str) -> tuple[str, int]:
    sha, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), n


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
