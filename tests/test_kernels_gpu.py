"""The compiled Triton queue kernel on a CUDA GPU against the formula in fp64, at the tolerances of the
interpreter test (tests/test_losses.py) and at the sizes a GPU runs (B = 128, E = 1024, long queues,
several backward chunks).

tests/conftest.py sets TRITON_INTERPRET=1 unless it is already set, so on a GPU machine run
`TRITON_INTERPRET=0 python -m pytest tests/test_kernels_gpu.py`. Without a GPU the module is skipped.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU; the interpreter test in tests/test_losses.py covers the CPU",
        allow_module_level=True,
    )
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "TRITON_INTERPRET=1 (tests/conftest.py's default) interprets the kernel; run with "
        "TRITON_INTERPRET=0 to test the compiled one",
        allow_module_level=True,
    )

import userpipe.trainer.kernels.queue_lse as kernel  # noqa: E402
from userpipe.trainer.losses import uto_queue_loss  # noqa: E402

MU, GAMMA = 90.0, 0.5
CUDA = torch.device("cuda")


def unit(n: int, e: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(CUDA)


def leaning_queue(q: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """Queue rows that lean towards one query each (cosines up to about 0.83): the softmax has mass."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, q.shape[1], generator=gen, dtype=torch.float64).to(CUDA)
    lean = (torch.rand(m, 1, generator=gen, dtype=torch.float64) * 1.5 * math.sqrt(q.shape[1])).to(CUDA)
    return torch.nn.functional.normalize(noise + lean * q[torch.arange(m, device=CUDA) % len(q)], dim=1)


def reference_queue_loss(q, k, queue, qids=None, kids=None):
    """The formula as written (exp, then log; fine in fp64), as in tests/test_losses.py."""
    e = torch.exp(MU * (q @ queue.T - GAMMA))
    if qids is not None:
        e = e * (qids[:, None] != kids[None, :])
    return (torch.log(1 + e.sum(1)) / MU - torch.log(1 + torch.relu((q * k).sum(1)))).mean()


def check_against_formula(b, m, e, dtype=torch.float32, ids=False, queue_grad=True, seed=0):
    q, k = unit(b, e, seed), unit(b, e, seed + 1)
    queue = leaning_queue(q, m, seed + 2)
    qids = kids = None
    if ids:
        qids = torch.arange(b, device=CUDA)
        kids = torch.randint(0, b + 10, (m,), generator=torch.Generator().manual_seed(seed)).to(CUDA)
    ours_q = q.to(dtype).requires_grad_()
    ours_queue = queue.to(dtype).requires_grad_(queue_grad)
    ours = uto_queue_loss(
        ours_q, k.to(dtype), ours_queue, MU, GAMMA, backend="triton", query_ids=qids, queue_ids=kids
    )
    inputs = (ours_q, ours_queue) if queue_grad else (ours_q,)
    grads = torch.autograd.grad(ours, inputs)
    # the reference sees the same rounded inputs
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_q = ref_inputs[0]
    ref_queue = ref_inputs[1] if queue_grad else ours_queue.detach().double()
    ref = reference_queue_loss(ref_q, k.to(dtype).double(), ref_queue, qids, kids)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    return ours, grads, ref, ref_grads


def assert_fp32_tolerances(ours, grads, ref, ref_grads):
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in grads)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for ours_grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b, m, e", [(128, 65536 + 4096, 1024), (13, 5000, 24), (130, 3001, 1000)])
def test_fp32_matches_the_formula(b, m, e):
    assert_fp32_tolerances(*check_against_formula(b, m, e))


def test_tf32x3_dots_keep_fp32_tolerances(monkeypatch):
    monkeypatch.setattr(kernel, "FP32_DOT_PRECISION", "tf32x3")
    assert_fp32_tolerances(*check_against_formula(128, 20000, 1024))


def test_several_backward_chunks_and_a_ragged_last_one(monkeypatch):
    monkeypatch.setattr(
        kernel, "BACKWARD_CHUNK_BYTES", 64 * 4096 * 4
    )  # fp32 chunks of 4096 rows: dq's split product
    assert_fp32_tolerances(*check_against_formula(64, 3 * 4096 + 300, 512))


def test_queue_entries_of_the_querys_own_image_are_masked():
    assert_fp32_tolerances(*check_against_formula(128, 5000, 256, ids=True))


def test_a_queue_without_gradient_still_gives_the_query_gradient():
    ours, grads, ref, ref_grads = check_against_formula(128, 8192, 1024, queue_grad=False)
    assert len(grads) == 1
    assert_fp32_tolerances(ours, grads, ref, ref_grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_finite_and_close_at_mu_90(dtype):
    """Tensor-core dots on the inputs as they are, fp32 accumulation; scores near 1 overflow fp16's exp."""
    ours, grads, ref, ref_grads = check_against_formula(128, 20000, 1024, dtype=dtype)
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in grads)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01  # as tests/test_losses.py
    assert ours.item() == pytest.approx(ref.item(), abs=tolerance)
    for ours_grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=0.2, atol=tolerance)
        # atol dwarfs these gradients (about 1e-4): hold them to their own precision as well
        assert (ours_grad.double() - ref_grad).norm() / ref_grad.norm() < (
            2e-2 if dtype == torch.bfloat16 else 5e-3
        )


def test_auto_picks_the_kernel_for_half_precision_queues_only():
    """As measured on an H200 (bench/results/gpu.md): the kernel wins on bf16/fp16 queues, eager on fp32."""
    from userpipe.trainer.losses import choose_backend

    query = torch.zeros(128, 1024, device="cuda")
    assert choose_backend(query, torch.zeros(4096, 1024, device="cuda", dtype=torch.bfloat16)) == "triton"
    assert choose_backend(query, torch.zeros(4096, 1024, device="cuda")) == "eager"
