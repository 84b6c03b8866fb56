"""Fused Triton kernels for UTO's queue term: lse_n = log(1 + Σ_k exp(μ(q_n·Q_k − γ))).

Forward: each program owns BLOCK_B queries and walks the queue in BLOCK_M tiles with an online
logsumexp (FlashAttention-style running max and sum, started from the {0} element), never storing the
B × M scores. Backward recomputes each tile: p = exp(z − lse), then dq = μ Σ_k g p Q_k (one program
per query block) and dQ = μ Σ_n g p q_n (one program per queue block). Embedding widths up to
MAX_WIDTH are held whole in a tile (E padded to a power of two). Accumulation is fp32 for any
input dtype. Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

MAX_WIDTH = 2048
BLOCK_B, BLOCK_M = 16, 32

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _logits(q, k_ptr, kid_ptr, qids, start, M, E, stride_k, mu, gamma,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, MASK_IDS: tl.constexpr):
        """z = μ(q·Q_kᵀ − γ) for one queue tile, -inf outside the queue and for masked ids."""
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_e = tl.arange(0, BLOCK_E)
        keys = tl.load(k_ptr + offs_m[:, None] * stride_k + offs_e[None, :],
                       mask=(offs_m[:, None] < M) & (offs_e[None, :] < E), other=0.0).to(tl.float32)
        z = mu * (tl.dot(q, tl.trans(keys), input_precision="ieee") - gamma)
        keep = (offs_m < M)[None, :]
        if MASK_IDS:
            kids = tl.load(kid_ptr + offs_m, mask=offs_m < M, other=-1)
            keep = keep & (qids[:, None] != kids[None, :])
        return tl.where(keep, z, float("-inf")), keys

    @triton.jit
    def _load_queries(q_ptr, qid_ptr, B, E, stride_q, pid,
                      BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, MASK_IDS: tl.constexpr):
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_e = tl.arange(0, BLOCK_E)
        q = tl.load(q_ptr + offs_b[:, None] * stride_q + offs_e[None, :],
                    mask=(offs_b[:, None] < B) & (offs_e[None, :] < E), other=0.0).to(tl.float32)
        if MASK_IDS:
            qids = tl.load(qid_ptr + offs_b, mask=offs_b < B, other=-2)
        else:
            qids = offs_b
        return offs_b, q, qids

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, qid_ptr, kid_ptr, lse_ptr, B, M, E, stride_q, stride_k, mu, gamma,
                        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                        MASK_IDS: tl.constexpr):
        offs_b, q, qids = _load_queries(q_ptr, qid_ptr, B, E, stride_q, tl.program_id(0), BLOCK_B, BLOCK_E,
                                        MASK_IDS)
        running_max = tl.zeros([BLOCK_B], dtype=tl.float32)  # the {0} element
        running_sum = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        for start in range(0, M, BLOCK_M):
            z, _ = _logits(q, k_ptr, kid_ptr, qids, start, M, E, stride_k, mu, gamma, BLOCK_M, BLOCK_E, MASK_IDS)
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
            running_max = new_max
        tl.store(lse_ptr + offs_b, running_max + tl.log(running_sum), mask=offs_b < B)

    @triton.jit
    def _grad_query_kernel(q_ptr, k_ptr, qid_ptr, kid_ptr, lse_ptr, g_ptr, dq_ptr, B, M, E, stride_q, stride_k,
                           mu, gamma, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                           MASK_IDS: tl.constexpr):
        offs_b, q, qids = _load_queries(q_ptr, qid_ptr, B, E, stride_q, tl.program_id(0), BLOCK_B, BLOCK_E,
                                        MASK_IDS)
        lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
        scale = mu * tl.load(g_ptr + offs_b, mask=offs_b < B, other=0.0)
        dq = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
        for start in range(0, M, BLOCK_M):
            z, keys = _logits(q, k_ptr, kid_ptr, qids, start, M, E, stride_k, mu, gamma, BLOCK_M, BLOCK_E,
                              MASK_IDS)
            weight = tl.exp(z - lse[:, None]) * scale[:, None]
            dq += tl.dot(weight, keys, input_precision="ieee")
        offs_e = tl.arange(0, BLOCK_E)
        tl.store(dq_ptr + offs_b[:, None] * stride_q + offs_e[None, :], dq,
                 mask=(offs_b[:, None] < B) & (offs_e[None, :] < E))

    @triton.jit
    def _grad_queue_kernel(q_ptr, k_ptr, qid_ptr, kid_ptr, lse_ptr, g_ptr, dk_ptr, B, M, E, stride_q, stride_k,
                           mu, gamma, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                           MASK_IDS: tl.constexpr):
        start = tl.program_id(0) * BLOCK_M
        dk = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        for block in range(0, tl.cdiv(B, BLOCK_B)):
            offs_b, q, qids = _load_queries(q_ptr, qid_ptr, B, E, stride_q, block, BLOCK_B, BLOCK_E, MASK_IDS)
            lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
            scale = mu * tl.load(g_ptr + offs_b, mask=offs_b < B, other=0.0)
            z, _ = _logits(q, k_ptr, kid_ptr, qids, start, M, E, stride_k, mu, gamma, BLOCK_M, BLOCK_E, MASK_IDS)
            weight = tl.exp(z - lse[:, None]) * scale[:, None]
            weight = tl.where((offs_b < B)[:, None], weight, 0.0)
            dk += tl.dot(tl.trans(weight), q, input_precision="ieee")
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_e = tl.arange(0, BLOCK_E)
        tl.store(dk_ptr + offs_m[:, None] * stride_k + offs_e[None, :], dk,
                 mask=(offs_m[:, None] < M) & (offs_e[None, :] < E))


def _launch_args(query, queue, query_ids, queue_ids):
    if not (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("the triton queue-loss backend needs a CUDA device (or TRITON_INTERPRET=1)")
    width = query.shape[1]
    if width > MAX_WIDTH:
        raise ValueError(f"the triton backend holds embeddings up to {MAX_WIDTH} wide; use 'chunked'")
    mask = query_ids is not None
    ids = (query_ids.contiguous(), queue_ids.contiguous()) if mask else (query, queue)  # unused when not masking
    return (query.contiguous(), queue.contiguous(), *ids), max(16, triton.next_power_of_2(width)), mask


class _TritonQueueLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, queue, mu, gamma, query_ids, queue_ids):
        (q, k, qid, kid), block_e, mask = _launch_args(query, queue, query_ids, queue_ids)
        b, m, e = len(q), len(k), q.shape[1]
        lse = torch.empty(b, device=q.device, dtype=torch.float32)
        _forward_kernel[(triton.cdiv(b, BLOCK_B),)](q, k, qid, kid, lse, b, m, e, q.stride(0), k.stride(0),
                                                    float(mu), float(gamma), BLOCK_B, BLOCK_M, block_e, mask)
        ctx.save_for_backward(q, k, qid, kid, lse)
        ctx.mu, ctx.gamma, ctx.block_e, ctx.mask = mu, gamma, block_e, mask
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        q, k, qid, kid, lse = ctx.saved_tensors
        b, m, e = len(q), len(k), q.shape[1]
        g = grad_lse.float().contiguous()
        args = (float(ctx.mu), float(ctx.gamma), BLOCK_B, BLOCK_M, ctx.block_e, ctx.mask)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
            _grad_query_kernel[(triton.cdiv(b, BLOCK_B),)](q, k, qid, kid, lse, g, dq, b, m, e, q.stride(0),
                                                           k.stride(0), *args)
            dq = dq.to(q.dtype)
        if ctx.needs_input_grad[1]:
            dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
            _grad_queue_kernel[(triton.cdiv(m, BLOCK_M),)](q, k, qid, kid, lse, g, dk, b, m, e, q.stride(0),
                                                           k.stride(0), *args)
            dk = dk.to(k.dtype)
        return dq, dk, None, None, None, None


def queue_lse(query, queue, mu, gamma, query_ids=None, queue_ids=None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    return _TritonQueueLSE.apply(query, queue, mu, gamma, query_ids, queue_ids)
