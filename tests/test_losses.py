"""Triple loss: each term against reference implementations, switched-off terms not computed,
projection at masked positions only == full projection then indexing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distilkit import models
from torch.utils._python_dispatch import TorchDispatchMode

from distilkit.losses import (
    IGNORE_INDEX,
    LossConfig,
    TripleLoss,
    chunk_rows,
    compute_losses,
    cosine_loss,
    fused_vocab_losses,
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
    """Counts MLM head applications (models.mlm_transform, used by the fused and the plain path) and
    models.encoder_hidden calls per model class."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real_transform, real_hidden = models.mlm_transform, models.encoder_hidden

        def transform(model, hidden):
            self.calls.append(("logits", type(model).__name__))
            return real_transform(model, hidden)

        def hidden(model, ids, att):
            self.calls.append(("hidden", type(model).__name__))
            return real_hidden(model, ids, att)

        monkeypatch.setattr(models, "mlm_transform", transform)
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
@pytest.mark.parametrize("fused", [True, False])
def test_switched_off_terms_are_not_computed(pair, monkeypatch, weights, student_logits, teacher_forward, teacher_logits,
                                             fused):
    teacher, student = pair
    counter = _Counter(monkeypatch)
    a_ce, a_mlm, a_cos = weights
    cfg = LossConfig(alpha_ce=a_ce, alpha_mlm=a_mlm, alpha_cos=a_cos)
    out = compute_losses(student, teacher if teacher_forward else None, _batch(teacher.config.vocab_size), cfg,
                         fused=fused)
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
    real = models.mlm_transform
    monkeypatch.setattr(models, "mlm_transform", lambda m, h: (counter_rows.append(h.shape[0]), real(m, h))[1])
    batch = _batch(teacher.config.vocab_size)
    compute_losses(student, teacher, batch, LossConfig())
    n_masked = int((batch["labels"] != IGNORE_INDEX).sum())
    assert counter_rows == [n_masked, n_masked] and n_masked < batch["attention_mask"].sum() / 2


def test_missing_teacher_is_an_error(pair):
    _, student = pair
    with pytest.raises(ValueError, match="teacher"):
        compute_losses(student, None, _batch(student.config.vocab_size), LossConfig())


# --------------------------------------------------------------------------- the fused vocabulary loss


def _loss_and_grads(student, teacher, batch, cfg, **kw):
    student.zero_grad(set_to_none=True)
    out = compute_losses(student, teacher, batch, cfg, **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out, grads


def _assert_same(a, b, grads_a, grads_b, rel=TOL):
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
        assert (a[key] is None) == (b[key] is None), key
        if a[key] is not None:
            assert abs(a[key].item() - b[key].item()) <= rel * max(1.0, abs(b[key].item())), (key, a[key], b[key])
    assert set(grads_a) == set(grads_b) and grads_a
    for name in grads_b:
        scale = max(1.0, float(grads_b[name].abs().max()))
        assert float((grads_a[name] - grads_b[name]).abs().max()) <= rel * scale, name


@pytest.mark.parametrize("kl_positions", ["masked", "all"])
@pytest.mark.parametrize("weights", [(5.0, 2.0, 1.0), (0.0, 2.0, 1.0), (5.0, 0.0, 1.0), (1.0, 3.0, 0.0), (0.0, 2.0, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_fused_equals_unfused_values_and_gradients(pair, kl_positions, weights, temperature):
    """fp32: every term and every student gradient of the fused path = the plain full-logits path (1e-5),
    with chunks small enough (7 rows) that each batch spans several, and rows without a label (all)."""
    teacher, student = pair
    cfg = LossConfig(*weights, temperature=temperature, kl_positions=kl_positions)
    uses_teacher = weights[0] > 0 or weights[2] > 0
    for seed in range(2):
        batch = _batch(teacher.config.vocab_size, seed)
        fused, g_fused = _loss_and_grads(student, teacher if uses_teacher else None, batch, cfg, fused=True, chunk=7)
        plain, g_plain = _loss_and_grads(student, teacher if uses_teacher else None, batch, cfg, fused=False)
        _assert_same(fused, plain, g_fused, g_plain)
        assert "vocab_projector.bias" in g_fused and "distilbert.embeddings.word_embeddings.weight" in g_fused


def test_fused_backward_of_one_term_alone_recomputes(pair):
    """Backward through loss_ce alone (not in the alpha ratio the forward pre-computed) is still exact."""
    teacher, student = pair
    batch = _batch(teacher.config.vocab_size, 3)
    grads = []
    for fused in (True, False):
        student.zero_grad(set_to_none=True)
        out = compute_losses(student, teacher, batch, LossConfig(kl_positions="all"), fused=fused, chunk=5)
        (out["loss_ce"] * 3.0).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    student.zero_grad(set_to_none=True)
    assert set(grads[0]) == set(grads[1])
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=TOL), name


def test_fused_handles_empty_and_unlabelled_selections(pair):
    teacher, student = pair
    vocab = teacher.config.vocab_size
    decoder = models.mlm_decoder(student)
    rows = torch.randn(0, decoder.in_features, requires_grad=True)
    kl, ce = fused_vocab_losses(rows, decoder, torch.zeros(0, dtype=torch.long), 2.0, rows.detach(),
                                models.mlm_decoder(teacher))
    assert kl.item() == 0.0 and ce.item() == 0.0 and kl.requires_grad
    (kl + ce).backward()
    rows = torch.randn(6, decoder.in_features, requires_grad=True)
    kl, ce = fused_vocab_losses(rows, decoder, torch.full((6,), IGNORE_INDEX), 2.0, None, None, 0.0, 1.0)
    assert kl is None and ce.item() == 0.0
    ce.backward()
    assert float(rows.grad.abs().max()) == 0.0
    assert chunk_rows(30522) >= 1000 and chunk_rows(vocab) >= 16


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_fused_never_materialises_full_logits(pair):
    """kl_positions=all: with chunks of 8 rows, no tensor of more than 8 rows x vocab is created in forward or
    backward (checked on every op's output), and nothing vocab-sized per row is saved for backward; the plain
    path creates (n, vocab) tensors. How: a TorchDispatchMode sees every op output; saved_tensors_hooks every
    tensor autograd keeps."""
    teacher, student = pair
    vocab = teacher.config.vocab_size
    batch = _batch(vocab, 0)
    n = int(batch["attention_mask"].sum())
    assert n > 8 and n != student.config.dim
    cfg = LossConfig(kl_positions="all")
    for fused, expect_big in ((True, False), (False, True)):
        saved: list[tuple[int, ...]] = []
        with _Shapes() as seen, torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1],
                                                                         lambda t: t):
            out = compute_losses(student, teacher, batch, cfg, fused=fused, chunk=8)
            out["loss"].backward()
        student.zero_grad(set_to_none=True)
        dim = student.config.dim  # (dim, vocab): the decoder weight's transposed view, not rows
        vocab_rows = [s[0] for s in seen.shapes if len(s) == 2 and s[1] == vocab and s[0] != dim]
        assert max(vocab_rows) == (n if expect_big else 8), (fused, max(vocab_rows))
        saved_vocab_rows = [s[0] for s in saved if len(s) == 2 and s[1] == vocab]
        assert (max(saved_vocab_rows, default=0) == n) == expect_big


def test_fused_under_bf16_autocast_is_finite_and_close(pair):
    """bf16 autocast: projections in bf16, softmaxes in fp32; the fused terms match the plain path's to 1e-2."""
    teacher, student = pair
    batch = _batch(teacher.config.vocab_size, 1)
    cfg = LossConfig(kl_positions="all")
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(student, teacher, batch, cfg, fused=fused, chunk=16))
    (a, ga), (b, gb) = results
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
        assert torch.isfinite(a[key]) and a[key].dtype == torch.float32
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-2), key
    for name in gb:
        assert torch.isfinite(ga[name]).all()
        assert float((ga[name] - gb[name]).norm()) <= 2e-2 * max(float(gb[name].norm()), 1e-3), name
