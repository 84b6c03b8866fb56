"""COCO-5K-sized ranking: counted ranks (trainer.evaluate) vs the reference's per-query argsort loops.

A random 5,000 x 25,000 float32 similarity matrix; both compute i2t and t2i ranks; the results must
agree. Results: bench/results/ranking.{json,md}.
"""

from __future__ import annotations

import time

import numpy as np

import report
from trainer.evaluate import i2t_ranks, retrieval_metrics, t2i_ranks


def reference_loops(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VSE++/SCAN's i2t and t2i: one argsort per query. kind="stable" fixes the order of exact ties
    (25,000 random float32 values hold some), which numpy's default sort leaves unspecified."""
    n = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i], kind="stable")[::-1] == c)[0][0]
                        for c in range(5 * i, 5 * i + 5)) for i in range(n)])
    t2i = np.array([np.where(np.argsort(sims[:, c], kind="stable")[::-1] == c // 5)[0][0] for c in range(5 * n)])
    return i2t, t2i


def main() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    sims = rng.standard_normal((n, 5 * n), dtype=np.float32)
    sims[np.arange(n), 5 * np.arange(n)] += 2.5
    start = time.perf_counter()
    retrieval_metrics(sims)
    counted = time.perf_counter() - start
    start = time.perf_counter()
    i2t, t2i = reference_loops(sims)
    loops = time.perf_counter() - start
    import torch

    caption_image = torch.arange(5 * n) // 5
    agree = (np.array_equal(i2t_ranks(torch.from_numpy(sims), caption_image).numpy(), i2t) and
             np.array_equal(t2i_ranks(torch.from_numpy(sims), caption_image).numpy(), t2i))

    result = {"benchmark": "ranking a 5,000 x 25,000 similarity matrix (COCO 5K)", **report.machine(),
              "counted_seconds": round(counted, 2), "argsort_loop_seconds": round(loops, 2), "agree": bool(agree)}
    print(result)
    report.write("ranking", result, result["benchmark"], "Both directions, i2t and t2i.",
                 ["method", "seconds"], [["counted, in blocks (trainer.evaluate)", result["counted_seconds"]],
                                         ["per-query argsort loops (reference)", result["argsort_loop_seconds"]]],
                 [("ranking 5,000 x 25,000: counted vs argsort loops",
                   f"{result['counted_seconds']} vs {result['argsort_loop_seconds']} s, same ranks: {agree}")],
                 ["", f"Same ranks: {agree}."])


if __name__ == "__main__":
    main()
