"""Approximate search at gallery scale: each `userpipe index --kind` against exact search (flat), at 100k
and 1M vectors of the coco preset's embedding width (1,024).

Galleries are generated with the structure real embeddings have rather than uniform noise (on which no
index beats brute force): 1,000 topics (cluster centres) in a 48-dimensional subspace, each vector its
topic's centre plus a spread within the subspace and noise outside it, L2-normalized; a query is a gallery
vector plus noise (a caption near its image). Real galleries differ: the recall a real index reaches is
the one `userpipe index` measures on the gallery's own queries and records. Each index is planned,
built and tuned by the functions `userpipe index` uses (retrieval/ann.py: tuned on 1,000 queries to
recall@10 ≥ 0.95 against exact), then timed on 1,000 other queries in one batch, the threads `userpipe
search` uses; recall@1/5/10 on those held-out queries. Memory: the serialized index's size. Results:
bench/results/ann.{json,md}. `python -m bench.ann --sizes 100000` for one size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench import report
from userpipe.retrieval import ann
from userpipe.schemas import threads
from userpipe.schemas.outputs import human_bytes

WIDTH, SUBSPACE, QUERIES = 1024, 48, 1000
TOPICS, SPREAD, OUTSIDE, QUERY_NOISE = 1000, 1.0, 1.0, 0.3  # norms relative to a topic centre's ~7
SIZES = (100_000, 1_000_000)
GOAL = "recall@10 ≥ 0.95 at ≥ 10× flat's QPS"


def normalized(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def gallery(n: int, rng: np.random.Generator) -> np.ndarray:
    """n normalized vectors: topics (cluster centres) in a SUBSPACE-d subspace, each vector its topic's
    centre plus a spread within the subspace and a little noise outside it."""
    basis = rng.standard_normal((SUBSPACE, WIDTH), dtype=np.float32) / np.sqrt(WIDTH)
    centres = rng.standard_normal((TOPICS, SUBSPACE), dtype=np.float32)
    out = np.empty((n, WIDTH), np.float32)
    for start in range(0, n, 100_000):  # in blocks: 1M rows of noise at once would double the peak
        rows = min(n, start + 100_000) - start
        topics = rng.integers(TOPICS, size=rows)
        inside = centres[topics] + SPREAD * rng.standard_normal((rows, SUBSPACE), dtype=np.float32)
        block = inside @ basis + OUTSIDE * rng.standard_normal((rows, WIDTH), dtype=np.float32) / np.sqrt(
            WIDTH
        )
        out[start : start + rows] = normalized(block)
    return out


def queries_near(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Queries near gallery vectors (a caption near its image): each a gallery vector plus noise of norm
    QUERY_NOISE, normalized."""
    picked = vectors[rng.choice(len(vectors), count, replace=False)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32) * (QUERY_NOISE / np.sqrt(WIDTH))
    return normalized(picked + noise)


def measure(kind: str, vectors: np.ndarray, tuning: np.ndarray, held_out: np.ndarray, exact: dict) -> dict:
    import faiss

    chosen = ann.plan(kind, len(vectors), WIDTH, None)
    started = time.perf_counter()
    index = ann.build(vectors, chosen)
    built = time.perf_counter() - started
    setting, tuned = ann.tune(index, chosen, tuning, exact["tuning"])
    threads.adjust()
    started = time.perf_counter()
    _, found = index.search(held_out, 10)
    seconds = time.perf_counter() - started
    size = len(faiss.serialize_index(index))
    return {
        "kind": kind,
        "factory": chosen.factory,
        "search": setting,
        "build_s": round(built, 1),
        "qps": round(len(held_out) / seconds, 1),
        "recall": ann.recall_at(found, exact["held_out"]),
        "recall_tuning": tuned,
        "bytes": size,
    }


def run_size(n: int, kinds: list[str], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    vectors = gallery(n, rng)
    tuning, held_out = queries_near(vectors, QUERIES, rng), queries_near(vectors, QUERIES, rng)
    exact = {"tuning": ann.exact_top(vectors, tuning, 10), "held_out": ann.exact_top(vectors, held_out, 10)}
    rows = []
    for kind in kinds:
        row = {"gallery": n, **measure(kind, vectors, tuning, held_out, exact)}
        print(row, flush=True)
        rows.append(row)
    flat_qps = next(r["qps"] for r in rows if r["kind"] == "flat")
    for row in rows:
        row["speedup"] = round(row["qps"] / flat_qps, 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--kinds", default=",".join(ann.KINDS))
    args = parser.parse_args()
    kinds = ["flat", *[k for k in args.kinds.split(",") if k != "flat"]]
    rows = []
    with threads.sharing():  # as `userpipe search` runs
        for n in map(int, args.sizes.split(",")):
            rows += run_size(n, kinds, seed=n)
    met = [r for r in rows if r["gallery"] == max(r["gallery"] for r in rows) and r["kind"] != "flat"]
    best = max(met, key=lambda r: (r["recall"]["r10"] >= 0.95, r["speedup"]))
    result = {
        "benchmark": f"approximate search, {WIDTH}-d, galleries of {args.sizes}",
        **report.machine(),
        "queries": QUERIES,
        "recall_target": ann.RECALL_TARGET,
        "rows": rows,
    }
    report.write(
        "ann",
        result,
        result["benchmark"],
        f"Generated galleries ({TOPICS:,} topics in a {SUBSPACE}-d subspace, see bench/ann.py); each index "
        "planned, built and tuned as `userpipe index --kind` does (recall@10 ≥ "
        f"{ann.RECALL_TARGET} on {QUERIES:,} tuning queries), then {QUERIES:,} held-out queries in one "
        "batch: QPS, and K-recall@K against exact search. "
        f"Goal at the largest gallery: {GOAL}.",
        ["gallery", "kind", "faiss", "search", "build s", "QPS", "× flat", "recall@1", "@5", "@10", "memory"],
        [
            [
                f"{r['gallery']:,}",
                r["kind"],
                r["factory"],
                r["search"] or "exact",
                r["build_s"],
                r["qps"],
                r["speedup"],
                r["recall"]["r1"],
                r["recall"]["r5"],
                r["recall"]["r10"],
                human_bytes(r["bytes"]),
            ]
            for r in rows
        ],
        [
            (
                f"{best['gallery']:,} × {WIDTH}-d, {best['kind']}",
                f"recall@10 {best['recall']['r10']}, {best['speedup']}× flat's QPS",
            )
        ],
    )


if __name__ == "__main__":
    main()
