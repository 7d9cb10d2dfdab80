"""Triple loss: each term against reference implementations, switched-off terms not computed,
projection at masked positions only == full projection then indexing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distilkit import models
from distilkit.losses import (
    IGNORE_INDEX,
    LossConfig,
    TripleLoss,
    compute_losses,
    cosine_loss,
    kl_distill,
    masked_lm_loss,
)
from distilkit.masking import MaskingConfig, mask_tokens
from distilkit.student import student_from_teacher

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- pure term functions


def test_kl_matches_torch_kl_div_and_hand_written():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(37, 101, generator=g) * 3, torch.randn(37, 101, generator=g) * 3
    for temperature in (1.0, 2.0, 4.0):
        ours = kl_distill(s, t, temperature)
        ref = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
        ref = ref * temperature**2
        p_t = F.softmax(t / temperature, -1)
        hand = (p_t * (p_t.log() - F.log_softmax(s / temperature, -1))).sum(-1).mean() * temperature**2
        assert abs(ours.item() - ref.item()) < TOL
        assert abs(ours.item() - hand.item()) < TOL
    assert kl_distill(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_mlm_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 30, generator=g)
    labels = torch.randint(0, 30, (50,), generator=g)
    labels[::3] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    ref = F.cross_entropy(logits[keep], labels[keep])
    hand = -(F.log_softmax(logits[keep], -1).gather(1, labels[keep, None])).mean()
    assert abs(masked_lm_loss(logits, labels).item() - ref.item()) < TOL
    assert abs(masked_lm_loss(logits, labels).item() - hand.item()) < TOL


def test_cosine_matches_cosine_embedding_loss():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    ref = nn.CosineEmbeddingLoss()(a, b, torch.ones(40))
    hand = (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    assert abs(cosine_loss(a, b).item() - ref.item()) < TOL
    assert abs(cosine_loss(a, b).item() - hand.item()) < TOL
    assert cosine_loss(a, a * 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_empty_selection_gives_zero_with_a_graph():
    x = torch.randn(0, 10, requires_grad=True)
    for value in (kl_distill(x, x.detach(), 2.0), masked_lm_loss(x, torch.zeros(0, dtype=torch.long)), cosine_loss(x, x.detach())):
        assert value.item() == 0.0 and value.requires_grad


# --------------------------------------------------------------------------- on real (tiny) models


@pytest.fixture(scope="module")
def pair(tiny_teacher):
    teacher, _ = models.load_teacher(tiny_teacher)
    teacher.eval()
    student = student_from_teacher(teacher, [0, 2])
    with torch.no_grad():  # make the student differ from a plain layer copy
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    student.eval()  # deterministic forward for the equivalence checks
    return teacher, student


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 20), generator=g)
    attention = torch.ones_like(ids)
    for row, length in enumerate([20, 15, 9, 4]):
        ids[row, length:] = 0
        attention[row, length:] = 0
    ids[:, 0] = 2
    masked, labels = mask_tokens(ids, mask_token_id=4, vocab_size=vocab, special_ids=[0, 1, 2, 3, 4],
                                 cfg=MaskingConfig(mlm_prob=0.3), attention_mask=attention, generator=g)
    return {"input_ids": masked, "attention_mask": attention, "labels": labels}


def _reference(student, teacher, batch, cfg):
    """Full-vocabulary projection everywhere, then indexing; torch.nn reference losses."""
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s_out = student(input_ids=ids, attention_mask=att, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=att, token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
    valid = att.bool()
    sel = valid if cfg.kl_positions == "all" else (labels != IGNORE_INDEX) & valid
    T = cfg.temperature
    ce = F.kl_div(F.log_softmax(s_out.logits[sel] / T, -1), F.softmax(t_out.logits[sel] / T, -1), reduction="batchmean") * T**2
    mlm = F.cross_entropy(s_out.logits.view(-1, s_out.logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)
    hs, ht = s_out.hidden_states[-1][valid], t_out.hidden_states[-1][valid]
    cos = nn.CosineEmbeddingLoss()(hs, ht, torch.ones(hs.shape[0]))
    return {"loss_ce": ce, "loss_mlm": mlm, "loss_cos": cos,
            "loss": cfg.alpha_ce * ce + cfg.alpha_mlm * mlm + cfg.alpha_cos * cos}


@pytest.mark.parametrize("kl_positions", ["masked", "all"])
def test_projection_at_selected_positions_equals_full_projection(pair, kl_positions):
    teacher, student = pair
    cfg = LossConfig(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, kl_positions=kl_positions)
    for seed in range(3):
        batch = _batch(teacher.config.vocab_size, seed)
        ours = compute_losses(student, teacher, batch, cfg)
        ref = _reference(student, teacher, batch, cfg)
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            assert abs(ours[key].item() - ref[key].item()) < TOL, (key, ours[key].item(), ref[key].item())
        assert ours["n_masked"] == int((batch["labels"] != IGNORE_INDEX).sum())
        assert ours["n_tokens"] == int(batch["attention_mask"].sum())


def test_gradients_reach_the_student_only(pair):
    teacher, student = pair
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    out = TripleLoss(LossConfig())(student, teacher, _batch(teacher.config.vocab_size))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    student.zero_grad(set_to_none=True)


class _Counter:
    """Counts models.mlm_logits / models.encoder_hidden calls per model class."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real_logits, real_hidden = models.mlm_logits, models.encoder_hidden

        def logits(model, hidden):
            self.calls.append(("logits", type(model).__name__))
            return real_logits(model, hidden)

        def hidden(model, ids, att):
            self.calls.append(("hidden", type(model).__name__))
            return real_hidden(model, ids, att)

        monkeypatch.setattr(models, "mlm_logits", logits)
        monkeypatch.setattr(models, "encoder_hidden", hidden)

    def count(self, what: str, cls: str) -> int:
        return sum(c == (what, cls) for c in self.calls)


@pytest.mark.parametrize(
    "weights, student_logits, teacher_forward, teacher_logits",
    [
        ((5.0, 2.0, 1.0), 1, 1, 1),  # all three terms
        ((0.0, 0.0, 1.0), 0, 1, 0),  # cosine only: no vocabulary projection at all
        ((0.0, 2.0, 1.0), 1, 1, 0),  # no KL: the teacher is not projected
        ((0.0, 2.0, 0.0), 1, 0, 0),  # MLM only: the teacher is not run
        ((5.0, 0.0, 0.0), 1, 1, 1),  # KL only
    ],
)
def test_switched_off_terms_are_not_computed(pair, monkeypatch, weights, student_logits, teacher_forward, teacher_logits):
    teacher, student = pair
    counter = _Counter(monkeypatch)
    a_ce, a_mlm, a_cos = weights
    cfg = LossConfig(alpha_ce=a_ce, alpha_mlm=a_mlm, alpha_cos=a_cos)
    out = compute_losses(student, teacher if teacher_forward else None, _batch(teacher.config.vocab_size), cfg)
    assert counter.count("logits", "DistilBertForMaskedLM") == student_logits
    assert counter.count("hidden", "BertForMaskedLM") == teacher_forward
    assert counter.count("logits", "BertForMaskedLM") == teacher_logits
    for key, a in zip(("loss_ce", "loss_mlm", "loss_cos"), weights):
        assert (out[key] is None) == (a == 0)
    expected = sum(a * out[k].item() for k, a in zip(("loss_ce", "loss_mlm", "loss_cos"), weights) if a > 0)
    assert abs(out["loss"].item() - expected) < TOL


def test_projection_sees_only_masked_rows(pair, monkeypatch):
    teacher, student = pair
    counter_rows = []
    real = models.mlm_logits
    monkeypatch.setattr(models, "mlm_logits", lambda m, h: (counter_rows.append(h.shape[0]), real(m, h))[1])
    batch = _batch(teacher.config.vocab_size)
    compute_losses(student, teacher, batch, LossConfig())
    n_masked = int((batch["labels"] != IGNORE_INDEX).sum())
    assert counter_rows == [n_masked, n_masked] and n_masked < batch["attention_mask"].sum() / 2


def test_missing_teacher_is_an_error(pair):
    _, student = pair
    with pytest.raises(ValueError, match="teacher"):
        compute_losses(student, None, _batch(student.config.vocab_size), LossConfig())
