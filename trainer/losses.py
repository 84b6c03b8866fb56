"""USER's unified training objective (UTO), in logsumexp form. Batch part (Zhang et al. 2023, eq. for L_mb;
identical to HAL, Liu et al. AAAI 2020), S = V Tᵀ; queue part, one direction: queries q_n, their momentum
positive keys k̂_n, the queue of keys Q_1..Q_M:
  L_mb = 1/B Σ_j 1/μ log(1 + Σ_{i≠j} e^{μ(S_ij − γ)}) + 1/B Σ_i 1/μ log(1 + Σ_{j≠i} e^{μ(S_ij − γ)})
         − 1/B Σ_i log(1 + ReLU(S_ii))
  L_q = 1/B Σ_n [ 1/μ log(1 + Σ_k e^{μ(q_n·Q_k − γ)}) − log(1 + ReLU(q_n·k̂_n)) ]
The queue's logsumexp has three backends with equal values and gradients (eager, chunked, triton):
docs/architecture.md, "The queue term".
"""

from __future__ import annotations

import functools

import torch

EAGER_MAX_ELEMENTS = 1 << 24  # B × M above which `auto` walks the queue in tiles on the CPU
DEFAULT_TILE = 4096


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16/fp32 inputs are computed in fp32, fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def in_fp32(loss):
    """Run `loss` with autocast off, so its score matmuls are fp32 under bf16/fp16 autocast too (autocast
    would cast them down: a 2.5% gradient error on negatives near γ; issue 14)."""

    @functools.wraps(loss)
    def fp32_loss(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return loss(*args, **kwargs)

    return fp32_loss


def log1p_sum_exp(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(1 + Σ exp(z)) along `dim`, as logsumexp over {0} ∪ z; -inf entries drop out."""
    zero = torch.zeros_like(z.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([zero, z], dim=dim), dim=dim)


def positive_term(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """log(1 + ReLU(q·k)) per row: the reward for each matching pair."""
    return torch.log1p(torch.relu((_wide(query) * _wide(key)).sum(-1)))


@in_fp32
def uto_loss(
    img: torch.Tensor, txt: torch.Tensor, mu: float, gamma: float, same_image: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch part of UTO for L2-normalized (B, E) image and text embeddings, row i matching row i.

    `same_image` (B, B) bool, optional: pairs known to match besides the diagonal (two captions of
    one image in the batch) are left out of the negatives; None reproduces the reference.
    """
    scores = _wide(img) @ _wide(txt).T
    negatives = ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    if same_image is not None:
        negatives &= ~same_image
    z = (mu * (scores - gamma)).masked_fill(~negatives, float("-inf"))
    per_image = log1p_sum_exp(z, dim=1)
    per_text = log1p_sum_exp(z, dim=0)
    return ((per_image + per_text) / mu).mean() - positive_term(img, txt).mean()


@torch.no_grad()
def score_signals(img: torch.Tensor, txt: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """What the batch part of UTO sees in a step (logged, never trained on): the mean score of matching pairs
    and of negatives, the share of negatives above γ (at μ = 90 only those carry a gradient: e^{μ(S−γ)} is
    below 1e-4 at 0.1 under γ), and the share of pairs at S_ii ≤ 0, which get no pull (the ReLU of the
    positive term)."""
    scores = _wide(img) @ _wide(txt).T
    matching = scores.diagonal()
    negatives = scores.masked_select(~torch.eye(len(scores), dtype=torch.bool, device=scores.device))
    return {
        "positive_score": matching.mean(),
        "negative_score": negatives.mean(),
        "negatives_above_gamma": (negatives > gamma).float().mean(),
        "positives_unpulled": (matching <= 0).float().mean(),
    }


# --------------------------------------------------------------------------- queue part


def queue_lse_eager(
    query: torch.Tensor,
    queue: torch.Tensor,
    mu: float,
    gamma: float,
    query_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """log(1 + Σ_k exp(μ(q·Q_k − γ))) per query, over the whole (B, M) score matrix at once."""
    z = mu * (_wide(query) @ _wide(queue).T - gamma)
    if query_ids is not None:
        z = z.masked_fill(query_ids[:, None] == queue_ids[None, :], float("-inf"))
    return log1p_sum_exp(z, dim=1)


class _ChunkedQueueLSE(torch.autograd.Function):
    """Online logsumexp over queue tiles; backward recomputes each tile's softmax."""

    @staticmethod
    def forward(ctx, query, queue, mu, gamma, tile, query_ids, queue_ids):
        q = _wide(query)
        running_max = torch.zeros(len(q), device=q.device, dtype=q.dtype)  # the {0} element: max 0, e^0 = 1
        running_sum = torch.ones(len(q), device=q.device, dtype=q.dtype)
        for start in range(0, len(queue), tile):
            z = _tile_logits(q, queue, start, tile, mu, gamma, query_ids, queue_ids)
            new_max = torch.maximum(running_max, z.max(dim=1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                z - new_max[:, None]
            ).sum(1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(query, queue, lse, query_ids, queue_ids)
        ctx.mu, ctx.gamma, ctx.tile = mu, gamma, tile
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        query, queue, lse, query_ids, queue_ids = ctx.saved_tensors
        q = _wide(query)
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_queue = torch.zeros_like(queue, dtype=q.dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, len(queue), ctx.tile):
            z = _tile_logits(q, queue, start, ctx.tile, ctx.mu, ctx.gamma, query_ids, queue_ids)
            weight = torch.exp(z - lse[:, None]) * (grad_lse[:, None] * ctx.mu)  # d lse / d score, scaled
            keys = queue[start : start + ctx.tile].to(q.dtype)
            if grad_q is not None:
                grad_q += weight @ keys
            if grad_queue is not None:
                grad_queue[start : start + ctx.tile] = weight.T @ q
        return (
            None if grad_q is None else grad_q.to(query.dtype),
            None if grad_queue is None else grad_queue.to(queue.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _tile_logits(q, queue, start, tile, mu, gamma, query_ids, queue_ids) -> torch.Tensor:
    z = mu * (q @ queue[start : start + tile].to(q.dtype).T - gamma)
    if query_ids is not None:
        z = z.masked_fill(query_ids[:, None] == queue_ids[None, start : start + tile], float("-inf"))
    return z


def queue_lse_chunked(query, queue, mu, gamma, query_ids=None, queue_ids=None, tile=None):
    return _ChunkedQueueLSE.apply(query, queue, mu, gamma, tile or DEFAULT_TILE, query_ids, queue_ids)


def queue_lse_triton(query, queue, mu, gamma, query_ids=None, queue_ids=None, tile=None):
    from userpipe.trainer.kernels.queue_lse import queue_lse

    return queue_lse(query, queue, mu, gamma, query_ids, queue_ids)


BACKENDS = {"eager": queue_lse_eager, "chunked": queue_lse_chunked, "triton": queue_lse_triton}


HALF_PRECISION = (torch.bfloat16, torch.float16)


def choose_backend(query: torch.Tensor, queue: torch.Tensor) -> str:
    """The fastest exact-enough backend, as measured (bench/results/gpu.md, H200): the fused kernel on CUDA
    for bf16/fp16 queues (3.1x eager at M = 262,144, 1.5% of its workspace); fp32 queues run eager there,
    since exact fp32 dots cannot use the tensor cores (the kernel is 0.4x eager). On the CPU: eager up to
    EAGER_MAX_ELEMENTS scores, tiles beyond."""
    if query.is_cuda:
        from userpipe.trainer.kernels.queue_lse import triton_available

        return "triton" if triton_available() and queue.dtype in HALF_PRECISION else "eager"
    return "eager" if len(query) * len(queue) <= EAGER_MAX_ELEMENTS else "chunked"


@in_fp32
def uto_queue_loss(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    queue: torch.Tensor,
    mu: float,
    gamma: float,
    backend: str = "auto",
    query_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """One direction of UTO's queue part (image queries vs the text queue, or the reverse).

    `query_ids`/`queue_ids` (image ids), optional: queue entries of the query's own image are false
    negatives and are left out; None reproduces the reference. `tile`: queue rows per step of the
    chunked backend (the triton backend has its own block size; eager has none).
    """
    if (query_ids is None) != (queue_ids is None):
        raise ValueError("pass both query_ids and queue_ids, or neither")
    name = choose_backend(query, queue) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown queue-loss backend '{backend}' (choose from auto, {', '.join(BACKENDS)})")
    lse = BACKENDS[name](query, queue, mu, gamma, query_ids, queue_ids, tile)
    return (lse / mu).mean() - positive_term(query, positive_key).mean()
