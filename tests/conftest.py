"""Shared fixtures: tiny random BERT teachers built in-process, a tiny WordPiece tokenizer, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILKIT_DATA", REPO.parent / "shared" / "data"))

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an of to and in is was it that for on with as by at from his her he she they this are be "
    "film movie good bad great story not very one which were have had been would there their what "
    "about who will more when up out so all no if some like time only can could into than then them "
    "new first two also after year years people man world war city state game song series season"
).split()


def write_tiny_vocab(folder: Path) -> Path:
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-=")
    vocab = SPECIALS + WORDS + letters + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def make_tiny_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab_file = write_tiny_vocab(folder)
    vocab = {tok: i for i, tok in enumerate(vocab_file.read_text().splitlines())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)  # transformers 5.x: `vocab`, not `vocab_file`


def make_tiny_teacher(
    folder: Path, *, layers: int = 4, hidden: int = 32, heads: int = 4, ffn: int = 64, seed: int = 0, with_head: bool = True
) -> Path:
    """Save a tiny random BERT teacher (BertForMaskedLM, or BertModel when with_head=False) + tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = (BertForMaskedLM if with_head else BertModel)(cfg)
    with torch.no_grad():  # break the symmetric init (LayerNorm 1/0, token types) so copies are really tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 4-layer, 32-wide random BERT with an MLM head and a tiny tokenizer, saved as a model folder."""
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_teacher_no_head(tmp_path_factory) -> Path:
    """The same kind of teacher saved as a plain BertModel (no MLM head), like a sentence encoder."""
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher_nohead"), with_head=False, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set DISTILKIT_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    """A small WikiText-like raw text file made of the tiny vocabulary's words."""
    import random

    rng = random.Random(0)
    lines = []
    for i in range(300):
        if i % 40 == 0:
            lines.append(f" = {rng.choice(WORDS)} {rng.choice(WORDS)} = ")
        else:
            lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " .")
        lines.append(" ")
    path = tmp_path_factory.mktemp("text") / "tiny.raw"
    path.write_text("\n".join(lines) + "\n")
    return path
