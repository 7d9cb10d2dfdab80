"""Dynamic masking: selection rate, 80/10/10 split, exclusions, labels, determinism, frequency smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distilkit.masking import IGNORE_INDEX, MaskingConfig, mask_tokens, special_ids_of, token_weights
from distilkit.utils import DistilkitError

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def make_batch(batch=1600, seq=128, seed=12345, pad_max=40):
    """Random blocks [CLS] w... [SEP] [PAD]... with random amounts of right padding.

    The data seed differs from the masking seeds: the same seed would correlate data and masking draws.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    lengths = seq - torch.randint(0, pad_max + 1, (batch,), generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    attn = (pos < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attn == 0] = PAD
    return ids, attn


def run(ids, attn=None, cfg=None, weights=None, seed=0):
    cfg = cfg or MaskingConfig()
    return mask_tokens(
        ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, cfg=cfg, attention_mask=attn,
        weights=weights, generator=torch.Generator().manual_seed(seed),
    )


def test_selection_rate_and_80_10_10_split():
    ids, attn = make_batch()
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    n_eligible = int(eligible.sum())
    assert n_eligible > 150_000
    masked, labels = run(ids, attn)
    selected = labels != IGNORE_INDEX
    rate = selected.sum().item() / n_eligible
    assert abs(rate - 0.15) < 0.005, rate  # sd of the rate here is ~0.0008

    n_sel = int(selected.sum())
    as_mask = (masked == MASK) & selected
    unchanged = (masked == ids) & selected
    # a random replacement can draw the original token (prob 1/995): count those as "random"
    as_random = selected & ~as_mask & ~unchanged
    assert abs(as_mask.sum().item() / n_sel - 0.8) < 0.01
    assert abs(as_random.sum().item() / n_sel - 0.1 * (1 - 1 / (VOCAB - 5))) < 0.01
    assert abs(unchanged.sum().item() / n_sel - 0.1) < 0.01
    # random replacements are never special tokens
    assert not torch.isin(masked[as_random], torch.tensor(SPECIALS)).any()
    assert masked[as_random].min() >= 5 and masked[as_random].max() < VOCAB


def test_specials_and_padding_never_selected_and_labels_correct():
    ids, attn = make_batch(batch=400)
    # put some special tokens inside the text and a non-special id under padding
    ids[:, 5] = UNK
    ids[:, 6] = MASK
    ids_padded_word = ids.clone()
    ids_padded_word[attn == 0] = 77  # padding positions must be excluded via attention_mask alone
    for inp in (ids, ids_padded_word):
        masked, labels = run(inp, attn)
        selected = labels != IGNORE_INDEX
        assert not selected[attn == 0].any()
        assert not selected[torch.isin(inp, torch.tensor(SPECIALS))].any()
        assert torch.equal(labels[selected], inp[selected])
        assert (labels[~selected] == IGNORE_INDEX).all()
        # unselected positions are untouched; the input tensor itself is not modified
        assert torch.equal(masked[~selected], inp[~selected])
    assert (ids[:, 5] == UNK).all()


def test_at_least_one_selected_per_sequence():
    ids, attn = make_batch(batch=2000, seq=8, pad_max=6)  # few eligible tokens: many rows would draw none
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    _, labels = run(ids, attn)
    has = (labels != IGNORE_INDEX).any(dim=1)
    assert torch.equal(has, eligible.any(dim=1))
    assert (~eligible.any(dim=1)).any()  # the batch does contain rows with nothing eligible


def test_same_seed_same_output_other_seed_differs():
    ids, attn = make_batch(batch=64)
    for weights in (None, token_weights(np.arange(VOCAB) + 1, 0.7, SPECIALS)):
        a = run(ids, attn, weights=weights, seed=3)
        b = run(ids, attn, weights=weights, seed=3)
        c = run(ids, attn, weights=weights, seed=4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], c[1])


def test_token_weights():
    counts = np.array([0, 5, 100, 1, 0, 10, 1000], dtype=np.int64)
    assert token_weights(counts, None, [0]) is None
    w = token_weights(counts, 0.7, [0, 1])
    assert w.dtype == torch.float32 and w.shape == (7,)
    assert w[0] == 0 and w[1] == 0
    np.testing.assert_allclose(w[2:].numpy(), np.array([100, 1, 1, 10, 1000], dtype=np.float64) ** -0.7, rtol=1e-6)


def test_smoothing_favours_rare_tokens():
    # Zipf-like corpus: token t appears with frequency ~ 1/t
    vocab = VOCAB
    g = torch.Generator().manual_seed(12345)
    p = 1.0 / torch.arange(1, vocab - 4, dtype=torch.float64)
    ids = 5 + torch.multinomial(p, 200 * 128, replacement=True, generator=g).view(200, 128)
    counts = np.bincount(ids.flatten().numpy(), minlength=vocab)
    rare, frequent = 50, 5  # token 5 is ~45x more frequent than token 50
    assert counts[frequent] > 20 * counts[rare] > 0

    def selection_freq(weights):
        sel_frequent = sel_rare = 0
        for seed in range(5):
            _, labels = run(ids, None, cfg=MaskingConfig(smoothing=0.7 if weights is not None else None), weights=weights, seed=seed)
            sel = labels != IGNORE_INDEX
            sel_frequent += int((sel & (ids == frequent)).sum())
            sel_rare += int((sel & (ids == rare)).sum())
        return sel_rare / (5 * counts[rare]), sel_frequent / (5 * counts[frequent])

    rare_u, freq_u = selection_freq(None)
    rare_s, freq_s = selection_freq(token_weights(counts, 0.7, SPECIALS))
    # uniform: both ~0.15; smoothed: the rare token is selected many times more often than the frequent one
    # (expected ratio ~ (count_frequent / count_rare) ** 0.7 ~ 14 before saturation)
    assert abs(freq_u - 0.15) < 0.02 and abs(rare_u - 0.15) < 0.06
    assert rare_s > 5 * freq_s
    assert freq_s < 0.5 * freq_u


def test_smoothing_selects_exact_count():
    ids, attn = make_batch(batch=100)
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    w = token_weights(np.ones(VOCAB), 0.7, SPECIALS)
    _, labels = run(ids, attn, cfg=MaskingConfig(smoothing=0.7), weights=w)
    sel = labels != IGNORE_INDEX
    assert int(sel.sum()) == round(0.15 * int(eligible.sum()))
    assert not sel[~eligible].any()


def test_config_validation_and_missing_weights():
    with pytest.raises(DistilkitError):
        MaskingConfig(mlm_prob=0.0)
    with pytest.raises(DistilkitError):
        MaskingConfig(mask_frac=0.9, random_frac=0.2)
    ids, attn = make_batch(batch=2)
    with pytest.raises(ValueError, match="weights"):
        run(ids, attn, cfg=MaskingConfig(smoothing=0.7))


def test_special_ids_of_tiny_tokenizer(tmp_path):
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path)
    assert special_ids_of(tok) == [0, 1, 2, 3, 4]
