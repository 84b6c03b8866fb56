"""UTO against plain implementations written from the formulas (exp, then log: fine in fp64)."""

import os

import pytest
import torch

from userpipe.trainer.losses import log1p_sum_exp, score_signals, uto_loss, uto_queue_loss

MU, GAMMA = 90.0, 0.5


def unit(n: int, e: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def reference_batch_loss(v, t, mu, gamma):
    """L_mb exactly as written: double sums with i ≠ j, exp then log."""
    b = len(v)
    s = v @ t.T
    total = 0.0
    for j in range(b):
        total += torch.log(1 + sum(torch.exp(mu * (s[i, j] - gamma)) for i in range(b) if i != j)) / mu / b
    for i in range(b):
        total += torch.log(1 + sum(torch.exp(mu * (s[i, j] - gamma)) for j in range(b) if j != i)) / mu / b
    return total - sum(torch.log(1 + torch.relu(s[i, i])) for i in range(b)) / b


def reference_queue_loss(q, k, queue, mu, gamma, qids=None, kids=None):
    s = q @ queue.T
    e = torch.exp(mu * (s - gamma))
    if qids is not None:
        e = e * (qids[:, None] != kids[None, :])
    return (torch.log(1 + e.sum(1)) / mu - torch.log(1 + torch.relu((q * k).sum(1)))).mean()


def test_log1p_sum_exp_is_stable_where_exp_overflows():
    z = torch.tensor([[1000.0, 999.0], [-1000.0, -1000.0]], dtype=torch.float16)
    out = log1p_sum_exp(z.float())
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(1000 + torch.log1p(torch.exp(torch.tensor(-1.0))).item(), abs=1e-3)
    assert out[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("b, e, mu", [(4, 8, 10.0), (7, 16, 90.0)])
def test_batch_loss_value_and_gradients_match_the_formula(b, e, mu):
    v, t = unit(b, e, 0).requires_grad_(), unit(b, e, 1).requires_grad_()
    ours = uto_loss(v, t, mu, GAMMA)
    ref = reference_batch_loss(v, t, mu, GAMMA)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    g_ours = torch.autograd.grad(ours, (v, t))
    g_ref = torch.autograd.grad(ref, (v, t))
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-4, atol=1e-6)


def test_score_signals_count_what_the_batch_term_sees():
    v, t = unit(6, 8, 0), unit(6, 8, 1)
    t[2] = -v[2]  # a pair at S_ii = -1: no pull from the positive term
    t[3] = v[4]  # S_43 = 1 > γ: a negative with a gradient
    signals = score_signals(v, t, GAMMA)
    s = v @ t.T
    off = [s[i, j] for i in range(6) for j in range(6) if i != j]
    assert signals["positive_score"].item() == pytest.approx(s.diagonal().mean().item())
    assert signals["negative_score"].item() == pytest.approx(sum(off).item() / 30)
    assert signals["negatives_above_gamma"].item() == pytest.approx(sum(x > GAMMA for x in off).item() / 30)
    assert signals["negatives_above_gamma"].item() >= 1 / 30
    assert signals["positives_unpulled"].item() == pytest.approx(sum(x <= 0 for x in s.diagonal()).item() / 6)
    assert signals["positives_unpulled"].item() >= 1 / 6


def test_batch_loss_can_leave_same_image_pairs_out():
    v, t = unit(4, 8, 0), unit(4, 8, 1)
    v[1] = v[0]  # rows 0 and 1: one image with two captions that both describe it well
    t[0] = t[1] = v[0]
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    masked = uto_loss(v, t, MU, GAMMA, same_image=same)
    unmasked = uto_loss(v, t, MU, GAMMA)
    # 4 terms (rows 0, 1 and columns 0, 1) each drop a score-1 negative: μ(1 − γ)/μ = 0.5, over B = 4
    assert (unmasked - masked).item() == pytest.approx(4 * 0.5 / 4, abs=0.01)


BACKENDS = ["eager", "chunked", "triton"]
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b, m, e, tile", [(8, 40, 16, 16), (13, 100, 32, 7), (5, 64, 24, 64)])
def test_queue_loss_backends_match_the_formula(backend, b, m, e, tile):
    q, k, queue = unit(b, e, 0), unit(b, e, 1), unit(m, e, 2)
    q, queue = q.float().to(DEVICE).requires_grad_(), queue.float().to(DEVICE).requires_grad_()
    ours = uto_queue_loss(q, k.float().to(DEVICE), queue, MU, GAMMA, backend=backend, tile=tile)
    g_ours = torch.autograd.grad(ours, (q, queue))
    qd, queued = q.detach().cpu().double().requires_grad_(), queue.detach().cpu().double().requires_grad_()
    ref = reference_queue_loss(qd, k, queued, MU, GAMMA)
    g_ref = torch.autograd.grad(ref, (qd, queued))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_entries_of_the_querys_own_image_can_be_masked(backend):
    b, m, e = 6, 50, 16
    q, k, queue = unit(b, e, 3).float(), unit(b, e, 4).float(), unit(m, e, 5).float()
    qids = torch.arange(b) * 10
    kids = torch.randint(0, 60, (m,), generator=torch.Generator().manual_seed(0))
    kids[:6] = qids  # the queue holds keys of the queries' own images
    queue[:6] = q  # ... that match them perfectly
    q = q.to(DEVICE).requires_grad_()
    ours = uto_queue_loss(
        q,
        k.to(DEVICE),
        queue.to(DEVICE),
        MU,
        GAMMA,
        backend=backend,
        query_ids=qids.to(DEVICE),
        queue_ids=kids.to(DEVICE),
    )
    qd = q.detach().cpu().double().requires_grad_()
    ref = reference_queue_loss(qd, k.double(), queue.double(), MU, GAMMA, qids, kids)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(ours, q)[0].cpu().double(), torch.autograd.grad(ref, qd)[0], rtol=1e-4, atol=1e-6
    )
    unmasked = uto_queue_loss(q, k.to(DEVICE), queue.to(DEVICE), MU, GAMMA, backend=backend)
    assert unmasked.item() > ours.item() + 0.4  # each query had a score-1 "negative": μ(1 − γ)/μ = 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_finite_and_close_at_mu_90(backend, dtype):
    q, k, queue = unit(16, 64, 6), unit(16, 64, 7), unit(300, 64, 8)
    queue[:16] = 0.9 * q + 0.1 * queue[:16]  # scores near 1: exp(μ(s − γ)) ≈ e^40 overflows fp16
    qd = q.clone().requires_grad_()
    ref = reference_queue_loss(qd, k, queue, MU, GAMMA)
    low = q.to(dtype).to(DEVICE).requires_grad_()
    ours = uto_queue_loss(low, k.to(dtype).to(DEVICE), queue.to(dtype).to(DEVICE), MU, GAMMA, backend=backend)
    grad = torch.autograd.grad(ours, low)[0]
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    # inputs rounded to 8 (bf16) or 11 (fp16) mantissa bits; μ = 90 amplifies score errors
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert ours.item() == pytest.approx(ref.item(), abs=tolerance)
    torch.testing.assert_close(grad.cpu().double(), torch.autograd.grad(ref, qd)[0], rtol=0.2, atol=tolerance)


def test_backend_choice_and_argument_errors():
    from userpipe.trainer.losses import choose_backend

    small, large = torch.zeros(128, 8), torch.zeros(1 << 18, 8)
    assert choose_backend(small, small) == "eager" and choose_backend(small, large) == "chunked"
    q = unit(4, 8, 0).float()
    with pytest.raises(ValueError, match="unknown queue-loss backend 'fast'"):
        uto_queue_loss(q, q, q, MU, GAMMA, backend="fast")
    with pytest.raises(ValueError, match="pass both query_ids and queue_ids"):
        uto_queue_loss(q, q, q, MU, GAMMA, query_ids=torch.arange(4))


def test_scores_and_both_uto_terms_stay_fp32_under_bf16_autocast():
    """Negatives near γ (off-diagonal cosines ≈ 0.45): bf16 rounds their scores by up to 4e-3, which
    μ = 90 turns into a gradient error of several percent; the losses must not see autocast."""
    torch.manual_seed(7)
    shared, own = torch.randn(1, 256), torch.randn(32, 256)
    img = torch.nn.functional.normalize(shared + own, dim=1)
    txt = torch.nn.functional.normalize(shared + own + 0.3 * torch.randn(32, 256), dim=1)
    queue = torch.nn.functional.normalize(shared + torch.randn(512, 256), dim=1)

    def image_grad(batch_loss, queue_loss, autocast: bool) -> torch.Tensor:
        q = img.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = batch_loss(q, txt, 90.0, 0.5) + queue_loss(q, txt, queue, 90.0, 0.5, "eager")
        assert loss.dtype == torch.float32
        loss.backward()
        return q.grad

    exact = image_grad(uto_loss, uto_queue_loss, autocast=False)
    torch.testing.assert_close(
        image_grad(uto_loss, uto_queue_loss, autocast=True), exact, rtol=1e-6, atol=1e-7
    )
    unguarded = image_grad(uto_loss.__wrapped__, uto_queue_loss.__wrapped__, autocast=True)
    assert (unguarded - exact).norm() / exact.norm() > 0.01  # what autocast alone would have done
