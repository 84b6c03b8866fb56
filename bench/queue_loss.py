"""Forward + backward of UTO's queue term, eager vs chunked, as the queue grows.

B = 128 queries, D = 1024, M in {4,096; 65,536; 262,144}, fp32 on this machine's CPU. Each
measurement runs in a fresh process: time is the best of 3 repetitions after a warm-up, memory is
the process's peak RSS (VmHWM, reset once the inputs exist) above its RSS at that point. The Triton
backend runs on CUDA only; under TRITON_INTERPRET=1 it is checked for equal values here (correctness,
not speed).
Results: bench/results/queue_loss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import report


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(backend: str, b: int, m: int, d: int, tile: int) -> dict:
    import torch

    from userpipe.trainer.losses import uto_queue_loss

    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
    key = torch.nn.functional.normalize(torch.randn(b, d), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    base = rss_mb()
    reset_peak_rss()  # the inputs' own creation does not count

    def step():
        loss = uto_queue_loss(query, key, queue, 90.0, 0.5, backend=backend, tile=tile)
        loss.backward()
        query.grad = None
        return loss.item()

    value = step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = rss_mb("VmHWM")
    return {
        "backend": backend,
        "B": b,
        "M": m,
        "D": d,
        "loss": value,
        "seconds": round(min(times), 4),
        "peak_extra_mb": round(peak - base, 1),
    }


def check_triton(b: int, m: int, d: int) -> dict:
    import torch

    from userpipe.trainer.losses import uto_queue_loss

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(b, d), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    values = {}
    for backend in ("eager", "triton"):
        loss = uto_queue_loss(q, k, queue, 90.0, 0.5, backend=backend)
        (grad,) = torch.autograd.grad(loss, q)
        values[backend] = (loss.item(), grad)
    return {
        "B": b,
        "M": m,
        "D": d,
        "loss_eager": values["eager"][0],
        "loss_triton": values["triton"][0],
        "max_grad_diff": float((values["eager"][1] - values["triton"][1]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queues", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child: BACKEND M
    args = parser.parse_args()
    if args.one:
        backend, m = args.one
        result = (
            check_triton(16, int(m), 64)
            if backend == "triton-check"
            else measure(backend, args.batch, int(m), args.dim, args.tile)
        )
        print(json.dumps(result))
        return

    def child(backend: str, m: int, env=None) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.queue_loss",
                "--one",
                backend,
                str(m),
                "--batch",
                str(args.batch),
                "--dim",
                str(args.dim),
                "--tile",
                str(args.tile),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    runs = []
    for m in args.queues:
        for backend in ("eager", "chunked"):
            runs.append(child(backend, m))
            print(runs[-1], flush=True)
    triton = child("triton-check", 1000, {"TRITON_INTERPRET": "1"})
    print(triton)
    result = {
        "benchmark": f"uto_queue_loss forward+backward, B={args.batch}, D={args.dim}, fp32, chunked tile "
        f"{args.tile}",
        **report.machine(),
        "runs": runs,
        "triton_interpreter_check": triton,
    }
    by = {(r["backend"], r["M"]): r for r in runs}
    rows = [
        [
            f"{m:,}",
            by[("eager", m)]["seconds"],
            by[("chunked", m)]["seconds"],
            f"{by[('chunked', m)]['seconds'] / by[('eager', m)]['seconds']:.2f}",
            f"{by[('eager', m)]['peak_extra_mb']:,}",
            f"{by[('chunked', m)]['peak_extra_mb']:,}",
        ]
        for m in args.queues
    ]
    headline = [
        (
            f"queue loss, M={m:,}: chunked vs eager",
            f"{by[('chunked', m)]['seconds']} vs {by[('eager', m)]['seconds']} s; "
            f"{by[('chunked', m)]['peak_extra_mb']:,} vs {by[('eager', m)]['peak_extra_mb']:,} MB",
        )
        for m in args.queues
    ]
    report.write(
        "queue_loss",
        result,
        result["benchmark"],
        "CPU. Peak memory = process peak RSS above the inputs.",
        ["M", "eager s", "chunked s", "chunked / eager", "eager MB", "chunked MB"],
        rows,
        headline,
        [
            "",
            f"Triton (interpreter, B=16, M=1,000, D=64): loss {triton['loss_triton']:.6f} vs eager "
            f"{triton['loss_eager']:.6f}, max |grad diff| {triton['max_grad_diff']:.2e}.",
        ],
    )


if __name__ == "__main__":
    main()
