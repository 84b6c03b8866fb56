"""Fused Triton kernels for UTO's queue term: lse_n = log(1 + Σ_k exp(μ(q_n·Q_k − γ))). The forward is
split over the queue with an online logsumexp, the backward runs in chunks of the queue through a bounded
workspace; the B × M scores are never stored. Block sizes are autotuned on the GPU; under Triton's
interpreter (TRITON_INTERPRET=1) one small configuration runs. The design: docs/architecture.md, "The
queue term".
"""

from __future__ import annotations

import functools
import os

import torch

FP32_DOT_PRECISION = "ieee"
BACKWARD_CHUNK_BYTES = (
    16 << 20
)  # the B × chunk weights held at once (B = 128: 65,536 rows in bf16, 32,768 in fp32)
DQ_SPLITS = 16  # dq's product runs over the chunk's rows: split them so it fills the GPU

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return triton is not None


def _config(block_b, block_m, block_e, warps, stages):
    return triton.Config(
        {"BLOCK_B": block_b, "BLOCK_M": block_m, "BLOCK_E": block_e}, num_warps=warps, num_stages=stages
    )


if triton is not None:
    NEG_INF = tl.constexpr(-1e30)  # a finite start for running maxima: empty slices stay NaN-free
    UPCAST_OPERANDS = tl.constexpr(INTERPRET)  # the interpreter's dot misreads bf16 (Triton 3.8): use fp32

    if INTERPRET:  # numpy runs every program: one small tile keeps the CPU tests quick
        HALF_CONFIGS = TF32_CONFIGS = IEEE_CONFIGS = [_config(16, 32, 32, 4, 1)]
        SPLIT_ALIGN, SPLIT_PROGRAMS = 32, 4  # several slices even for the tests' short queues
    else:
        # Hopper, bf16/fp16 operands: 64/128-row wgmma tiles, 3-4 stage cp.async pipelines (≤ 150 KB smem)
        HALF_CONFIGS = [
            _config(128, 128, 64, 8, 3),
            _config(128, 256, 64, 8, 3),
            _config(64, 128, 64, 4, 4),
            _config(128, 64, 128, 4, 3),
        ]
        # fp32 operands on the tensor cores (tf32, tf32x3): half the slice width for the same smem
        TF32_CONFIGS = [_config(128, 128, 32, 8, 3), _config(64, 128, 32, 4, 3), _config(128, 64, 32, 4, 4)]
        # exact fp32 dots run on the CUDA cores: fewer registers per thread
        IEEE_CONFIGS = [_config(64, 64, 32, 4, 3), _config(128, 64, 32, 8, 3), _config(64, 128, 32, 8, 2)]
        SPLIT_ALIGN, SPLIT_PROGRAMS = 256, None  # slices are whole tiles of every config; None: 2 per SM

    def _prune_configs(configs, named_args, **kwargs):
        """Each kind of operand gets its own tiles (smem and registers differ by 2x between them)."""
        if named_args["q_ptr"].dtype != torch.float32:
            return HALF_CONFIGS
        return IEEE_CONFIGS if kwargs.get("FP32_PRECISION") == "ieee" else TF32_CONFIGS

    def _quick_bench(kernel_call, quantiles):
        import triton.testing

        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    _autotune = triton.autotune(
        configs=list({id(c): c for c in HALF_CONFIGS + TF32_CONFIGS + IEEE_CONFIGS}.values()),
        key=["B", "M", "E", "MASK_IDS", "FP32_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_configs},
        do_bench=_quick_bench,
    )

    @triton.jit
    def _scores(
        q_ptr,
        k_ptr,
        offs_b,
        offs_m,
        B,
        M,
        E,
        stride_q,
        stride_k,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        FP32_PRECISION: tl.constexpr,
    ):
        """q·Q_kᵀ for one BLOCK_B × BLOCK_M tile, accumulated in fp32 over E in BLOCK_E slices."""
        acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        key_rows = (
            offs_m.to(tl.int64)[:, None] * stride_k
        )  # M × E passes 2^31 elements from M = 2M at E = 1024
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            q = tl.load(
                q_ptr + offs_b[:, None] * stride_q + offs_e[None, :],
                mask=(offs_b[:, None] < B) & (offs_e[None, :] < E),
                other=0.0,
            )
            keys = tl.load(
                k_ptr + key_rows + offs_e[None, :],
                mask=(offs_m[:, None] < M) & (offs_e[None, :] < E),
                other=0.0,
            )
            if UPCAST_OPERANDS:
                q, keys = q.to(tl.float32), keys.to(tl.float32)
            acc = tl.dot(q, tl.trans(keys), acc, input_precision=FP32_PRECISION)
        return acc

    @triton.jit
    def _logits(
        q_ptr,
        k_ptr,
        qid_ptr,
        kid_ptr,
        offs_b,
        offs_m,
        B,
        M,
        E,
        stride_q,
        stride_k,
        mu,
        gamma,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        MASK_IDS: tl.constexpr,
        FP32_PRECISION: tl.constexpr,
    ):
        """z = μ(q·Q_kᵀ − γ), -inf outside the queue and where the query's image id meets its own."""
        z = mu * (
            _scores(
                q_ptr,
                k_ptr,
                offs_b,
                offs_m,
                B,
                M,
                E,
                stride_q,
                stride_k,
                BLOCK_B,
                BLOCK_M,
                BLOCK_E,
                FP32_PRECISION,
            )
            - gamma
        )
        keep = (offs_m < M)[None, :]
        if MASK_IDS:
            qids = tl.load(qid_ptr + offs_b, mask=offs_b < B, other=-2)
            kids = tl.load(kid_ptr + offs_m, mask=offs_m < M, other=-1)
            keep = keep & (qids[:, None] != kids[None, :])
        return tl.where(keep, z, float("-inf"))

    @_autotune
    @triton.jit
    def _forward_kernel(
        q_ptr,
        k_ptr,
        qid_ptr,
        kid_ptr,
        part_max_ptr,
        part_sum_ptr,
        B,
        M,
        E,
        stride_q,
        stride_k,
        split_rows,
        mu,
        gamma,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        MASK_IDS: tl.constexpr,
        FP32_PRECISION: tl.constexpr,
    ):
        """Partial (max, sum of exp) of one query block over one slice of the queue."""
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        split = tl.program_id(1)
        lo = split * split_rows
        hi = tl.minimum(lo + split_rows, M)
        running_max = tl.full([BLOCK_B], NEG_INF, dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            z = _logits(
                q_ptr,
                k_ptr,
                qid_ptr,
                kid_ptr,
                offs_b,
                offs_m,
                B,
                hi,
                E,
                stride_q,
                stride_k,
                mu,
                gamma,
                BLOCK_B,
                BLOCK_M,
                BLOCK_E,
                MASK_IDS,
                FP32_PRECISION,
            )
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(z - new_max[:, None]), 1
            )
            running_max = new_max
        tl.store(part_max_ptr + split * B + offs_b, running_max, mask=offs_b < B)
        tl.store(part_sum_ptr + split * B + offs_b, running_sum, mask=offs_b < B)

    @triton.jit
    def _combine_kernel(part_max_ptr, part_sum_ptr, lse_ptr, B, splits, BLOCK: tl.constexpr):
        """lse = logsumexp over the {0} element and every slice's partial."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        top = tl.zeros([BLOCK], dtype=tl.float32)  # the {0} element's score
        for split in range(0, splits):
            top = tl.maximum(top, tl.load(part_max_ptr + split * B + offs, mask=offs < B, other=NEG_INF))
        total = tl.exp(-top)
        for split in range(0, splits):
            part_max = tl.load(part_max_ptr + split * B + offs, mask=offs < B, other=NEG_INF)
            total += tl.load(part_sum_ptr + split * B + offs, mask=offs < B, other=0.0) * tl.exp(
                part_max - top
            )
        tl.store(lse_ptr + offs, top + tl.log(total), mask=offs < B)

    @_autotune
    @triton.jit
    def _weights_kernel(
        q_ptr,
        k_ptr,
        qid_ptr,
        kid_ptr,
        lse_ptr,
        g_ptr,
        w_ptr,
        B,
        M,
        E,
        stride_q,
        stride_k,
        stride_w,
        mu,
        gamma,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        MASK_IDS: tl.constexpr,
        FP32_PRECISION: tl.constexpr,
    ):
        """W = μ g exp(z − lse) = d loss / d score for one tile, stored in W's dtype."""
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        z = _logits(
            q_ptr,
            k_ptr,
            qid_ptr,
            kid_ptr,
            offs_b,
            offs_m,
            B,
            M,
            E,
            stride_q,
            stride_k,
            mu,
            gamma,
            BLOCK_B,
            BLOCK_M,
            BLOCK_E,
            MASK_IDS,
            FP32_PRECISION,
        )
        lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
        scale = mu * tl.load(g_ptr + offs_b, mask=offs_b < B, other=0.0)
        weight = tl.exp(z - lse[:, None]) * scale[:, None]
        tl.store(
            w_ptr + offs_b[:, None] * stride_w + offs_m[None, :],
            weight.to(w_ptr.dtype.element_ty),
            mask=(offs_b[:, None] < B) & (offs_m[None, :] < M),
        )


def _compute_dtype(query: torch.Tensor, queue: torch.Tensor) -> torch.dtype:
    """Both operands in one dtype (tl.dot needs it); fp64 is computed in fp32, as it always was here."""
    dtype = torch.promote_types(query.dtype, queue.dtype)
    return torch.float32 if dtype == torch.float64 else dtype


def _dot_precision(dtype: torch.dtype) -> str:
    """FP32_DOT_PRECISION for fp32 operands; bf16/fp16 take Triton's default (their products are exact)."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def _prepare(query, queue, query_ids, queue_ids):
    if not (query.is_cuda or INTERPRET):
        raise RuntimeError("the triton queue-loss backend needs a CUDA device (or TRITON_INTERPRET=1)")
    dtype = _compute_dtype(query, queue)
    q, k = query.to(dtype).contiguous(), queue.to(dtype).contiguous()
    mask = query_ids is not None
    ids = (query_ids.contiguous(), queue_ids.contiguous()) if mask else (q, k)  # unused when not masking
    return q, k, *ids, mask


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_splits(b: int, m: int, device: torch.device) -> tuple[int, int]:
    """(slices of the queue, rows per slice): about two programs per SM, whole tiles per slice."""
    target = SPLIT_PROGRAMS or 2 * _multiprocessors(device)
    query_blocks = triton.cdiv(b, 128)
    splits = max(1, min(triton.cdiv(m, SPLIT_ALIGN), target // query_blocks))
    rows = triton.cdiv(triton.cdiv(max(m, 1), splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(max(m, 1), rows), rows


def _chunk_rows(b: int, m: int, element_size: int) -> int:
    rows = BACKWARD_CHUNK_BYTES // (max(b, 1) * element_size) // SPLIT_ALIGN * SPLIT_ALIGN
    return min(max(rows, SPLIT_ALIGN), max(m, 1))


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; bf16/fp16 products accumulate in fp32 on the GPU without a rounding."""
    if a.is_cuda and a.dtype != torch.float32:
        try:
            return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch before 2.8: no out_dtype
            pass
    return (a @ b).float()


def _add_query_grad(dq: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> None:
    """dq += W Q_chunk; the product's long inner dimension is split so it fills the GPU."""
    n = keys.shape[0]
    splits = DQ_SPLITS if n % DQ_SPLITS == 0 and n >= 64 * DQ_SPLITS else 1
    if splits == 1:
        dq += _matmul_fp32(weights, keys)
        return
    part = n // splits
    w = weights.unflatten(1, (splits, part)).transpose(0, 1)  # (splits, B, part), a view of the workspace
    dq += _matmul_fp32(w, keys.view(splits, part, -1)).sum(0)


class _TritonQueueLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, queue, mu, gamma, query_ids, queue_ids):
        q, k, qid, kid, mask = _prepare(query, queue, query_ids, queue_ids)
        b, m, e = len(q), len(k), q.shape[1]
        lse = torch.zeros(b, device=q.device, dtype=torch.float32)
        if b:
            splits, split_rows = _forward_splits(b, m, q.device)
            part_max = torch.empty(splits, b, device=q.device, dtype=torch.float32)
            part_sum = torch.empty_like(part_max)
            _forward_kernel[lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), splits)](
                q,
                k,
                qid,
                kid,
                part_max,
                part_sum,
                b,
                m,
                e,
                q.stride(0),
                k.stride(0),
                split_rows,
                float(mu),
                float(gamma),
                MASK_IDS=mask,
                FP32_PRECISION=_dot_precision(k.dtype),
            )
            _combine_kernel[(triton.cdiv(b, 128),)](part_max, part_sum, lse, b, splits, BLOCK=128)
        ctx.save_for_backward(q, k, qid, kid, lse)
        ctx.mu, ctx.gamma, ctx.mask = mu, gamma, mask
        ctx.dtypes = query.dtype, queue.dtype
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        q, k, qid, kid, lse = ctx.saved_tensors
        b, m, e = len(q), len(k), q.shape[1]
        need_query, need_queue = ctx.needs_input_grad[:2]
        g = grad_lse.float().contiguous()
        dq = torch.zeros(b, e, device=q.device, dtype=torch.float32) if need_query else None
        dk = torch.empty_like(k) if need_queue else None
        chunk = _chunk_rows(b, m, k.element_size())
        workspace = torch.empty(b, chunk, device=q.device, dtype=k.dtype) if b and m else None
        for start in range(0, m if b else 0, chunk):
            n = min(chunk, m - start)
            keys, weights = k[start : start + n], workspace[:, :n]
            _weights_kernel[
                lambda meta, n=n: (triton.cdiv(b, meta["BLOCK_B"]), triton.cdiv(n, meta["BLOCK_M"]))
            ](
                q,
                keys,
                qid,
                kid[start : start + n] if ctx.mask else kid,
                lse,
                g,
                weights,
                b,
                n,
                e,
                q.stride(0),
                k.stride(0),
                workspace.stride(0),
                float(ctx.mu),
                float(ctx.gamma),
                MASK_IDS=ctx.mask,
                FP32_PRECISION=_dot_precision(k.dtype),
            )
            if need_query:
                _add_query_grad(dq, weights, keys)
            if need_queue:
                torch.mm(weights.T, q, out=dk[start : start + n])
        query_dtype, queue_dtype = ctx.dtypes
        return (
            None if dq is None else dq.to(query_dtype),
            None if dk is None else dk.to(queue_dtype),
            None,
            None,
            None,
            None,
        )


def queue_lse(query, queue, mu, gamma, query_ids=None, queue_ids=None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    return _TritonQueueLSE.apply(query, queue, mu, gamma, query_ids, queue_ids)
