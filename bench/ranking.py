"""COCO-5K-sized ranking: `retrieval_metrics` (counted ranks) vs the released evaluation's loops.

The reference is the loops as the released code (VSE++/SCAN/VSE∞/USER evaluation.py) writes them: one
`numpy.argsort` per query with numpy's default sort, reversed, and the ground truth's position looked up
with `np.where`; i2t over each image's five captions, t2i over the transposed matrix. Both produce the
metrics from a random 5,000 x 25,000 float32 matrix, which must be identical. The matrix has no exact tie
at a ground truth (the few that random float32 values make are nudged apart): where one ties, numpy's
default sort orders the tied items arbitrarily, so there is no single reference answer (tests/
test_evaluate.py checks ties against a stable sort). Timings are the median (and range) of REPEATS
runs each, alone and beside one busy process. Results: bench/results/ranking.{json,md}.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench import report
from userpipe.schemas import threads
from userpipe.trainer.evaluate import KS, retrieval_metrics

N, REPEATS = 5000, 3


def released_loops(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """i2t and t2i ranks of a (N, 5N) matrix, as the released evaluation computes them."""
    n = sims.shape[0]
    i2t = np.zeros(n)
    for image in range(n):
        order = np.argsort(sims[image])[::-1]
        i2t[image] = min(np.where(order == caption)[0][0] for caption in range(5 * image, 5 * image + 5))
    by_caption = sims.T
    t2i = np.zeros(5 * n)
    for caption in range(5 * n):
        order = np.argsort(by_caption[caption])[::-1]
        t2i[caption] = np.where(order == caption // 5)[0][0]
    return i2t, t2i


def released_metrics(sims: np.ndarray) -> dict:
    def summary(ranks: np.ndarray) -> dict:
        out = {f"r{k}": 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in KS}
        return {**out, "medr": float(np.floor(np.median(ranks)) + 1), "meanr": float(ranks.mean() + 1)}

    i2t, t2i = (summary(r) for r in released_loops(sims))
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in KS)}


def without_ground_truth_ties(sims: np.ndarray) -> int:
    """Raise each tied ground-truth score to the next float32 until no query's ground truth ties another
    item (caption c's image is c // 5); returns how many were raised."""
    n = sims.shape[0]
    captions, raised = np.arange(5 * n), 0
    while True:
        own = sims[captions // 5, captions]
        tied_t2i = np.flatnonzero((sims == own).sum(0) > 1)  # its image ties another image
        best = sims.reshape(n, n, 5)[np.arange(n), np.arange(n)].max(1)
        tied_i2t = np.flatnonzero((sims == best[:, None]).sum(1) > 1)  # its best caption ties another caption
        best_caption = [5 * i + int(np.argmax(sims[i, 5 * i : 5 * i + 5])) for i in tied_i2t]
        fix = np.union1d(tied_t2i, np.array(best_caption, dtype=np.int64)).astype(np.int64)
        if not len(fix):
            return raised
        sims[fix // 5, fix] = np.nextafter(sims[fix // 5, fix], np.float32(np.inf))
        raised += len(fix)


def timed(function, *args) -> tuple[list[float], dict]:
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = function(*args)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def main() -> None:
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((N, 5 * N), dtype=np.float32)
    sims[np.arange(N), 5 * np.arange(N)] += 2.5  # one caption per image scores high: ranks spread over 0..N
    raised = without_ground_truth_ties(sims)
    conditions = {}
    with threads.sharing():  # as `userpipe eval` runs it
        for condition, busy in (("quiet", False), ("beside one busy process", True)):
            with report.beside_a_busy_process(busy):
                ours_s, ours = timed(retrieval_metrics, sims)
                loops_s, loops = timed(released_metrics, sims)
            same = all(ours[side][key] == loops[side][key] for side in ("i2t", "t2i") for key in loops[side])
            conditions[condition] = {
                "retrieval_metrics_seconds": [round(s, 3) for s in ours_s],
                "released_loops_seconds": [round(s, 2) for s in loops_s],
                "speedup": round(statistics.median(loops_s) / statistics.median(ours_s), 1),
                "identical_metrics": same,
            }
            print(condition, conditions[condition], flush=True)
    result = {
        "benchmark": f"ranking a {N:,} x {5 * N:,} similarity matrix (COCO 5K)",
        **report.machine(),
        "repeats": REPEATS,
        "conditions": conditions,
        "rsum": ours["rsum"],
        "ground_truth_ties_nudged": raised,
    }

    def spread(seconds: list[float], digits: int) -> str:
        return (
            f"{statistics.median(seconds):.{digits}f} ({min(seconds):.{digits}f}–{max(seconds):.{digits}f})"
        )

    quiet = conditions["quiet"]
    report.write(
        "ranking",
        result,
        result["benchmark"],
        f"Both directions, metrics included; median (range) of {REPEATS} runs, alone and beside one "
        "CPU-bound process (`while True: pass`), in a thread share as `userpipe eval` runs "
        "(schemas/threads.py).",
        [
            "condition",
            "retrieval_metrics (counted ranks, one pass), s",
            "released loops (numpy.argsort per query), s",
            "speed-up",
            "identical metrics",
        ],
        [
            [
                condition,
                spread(c["retrieval_metrics_seconds"], 3),
                spread(c["released_loops_seconds"], 2),
                f"{c['speedup']:.1f}x",
                c["identical_metrics"],
            ]
            for condition, c in conditions.items()
        ],
        [
            (
                f"ranking {N:,} x {5 * N:,}, {condition}: retrieval_metrics vs the released argsort loops",
                f"{statistics.median(c['retrieval_metrics_seconds']):.2f} vs "
                f"{statistics.median(c['released_loops_seconds']):.1f} s ({c['speedup']:.1f}x), identical "
                f"metrics: {c['identical_metrics']}",
            )
            for condition, c in conditions.items()
        ],
        ["", f"RSUM {ours['rsum']:.2f}; {quiet['speedup']:.1f}x faster alone."],
    )


if __name__ == "__main__":
    main()
