"""Approximate nearest-neighbour indexes over L2-normalized embeddings (inner product = cosine), each told
how approximate it is.

`--kind` picks a registered planner (`KINDS`): from the gallery's size and width and the memory budget it
chooses a faiss index_factory string (autofaiss's approach: the cluster count from the gallery size, the code
size from the budget); `tune` then raises the kind's search knob (nprobe, efSearch) until the recall@10 of
real queries against the exact index reaches RECALL_TARGET, and `recall_at` is what the manifest records.
Recall@K here is the ANN benchmarks' K-recall@K: the share of the exact top K the index returns in its top
K (1.0 for `flat`, which is exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from userpipe.schemas import threads
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import human_bytes

KS = (1, 5, 10)
RECALL_TARGET = 0.95  # recall@10 against the exact index that `tune` raises the search knob to
PLATEAU = 0.005  # lossy codes: a doubled knob gaining less recall@10 than this ends the tuning
TUNING_QUERIES = 1000  # queries the knob is tuned on, and as many others the recall is measured on
HNSW_LINKS = 32  # HNSW's M: the faiss documentation's default trade-off for recall at high dimension
MIN_POINTS_PER_CLUSTER = 39  # faiss warns below 39 training points per centroid
TRAINING_POINTS_PER_CLUSTER = 64
PQ_CENTROIDS = 256  # codes per sub-vector (8 bits): k-means needs at least as many training points


@dataclass(frozen=True)
class Plan:
    factory: str  # faiss.index_factory's description
    knob: str | None  # the search parameter `tune` raises (None: exact)
    knob_values: tuple[int, ...]  # the values it tries, in order
    bytes: int  # the index's size in memory, estimated before it is built
    lossy: bool = False  # compressed codes: its recall may level off below the target whatever the knob


def _clusters(n: int) -> int:
    """IVF's list count: a power of two near 2·sqrt(n) (faiss's guideline of 4 to 16·sqrt(n) trains 2 to 8
    times longer for little gain at the recall tuned to), with enough points per centroid to train it."""
    wanted = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return max(1, min(wanted, n // MIN_POINTS_PER_CLUSTER))


def _probes(lists: int) -> tuple[int, ...]:
    """1, 2, 4, ... and every list (an exhaustive search of a gallery of few lists)."""
    return tuple(sorted({2**i for i in range(int(math.log2(lists)) + 1)} | {lists}))


def plan_flat(n: int, d: int, max_memory: int | None) -> Plan:
    return Plan("Flat", None, (), 4 * n * d)


def plan_ivf(n: int, d: int, max_memory: int | None) -> Plan:
    lists = _clusters(n)
    # per vector: its floats, its id, and its entry in the direct map (an image looked up by id)
    return Plan(f"IVF{lists},Flat", "nprobe", _probes(lists), n * (4 * d + 16) + lists * 4 * d)


def plan_hnsw(n: int, d: int, max_memory: int | None) -> Plan:
    # vectors, and each node's links: 2·M on level 0, and about M more over the levels above
    return Plan(
        f"HNSW{HNSW_LINKS},Flat", "efSearch", (16, 32, 64, 128, 256, 512), n * (4 * d + 3 * HNSW_LINKS * 4)
    )


def plan_ivfpq(n: int, d: int, max_memory: int | None) -> Plan:
    """Product quantization with the largest code (bytes per vector, a divisor of d, at most d/2) that fits
    the budget beside the lists and codebooks; without a budget, d/16 bytes (64× smaller than flat)."""
    if n < PQ_CENTROIDS:
        raise InputError(
            f"--kind ivfpq: a gallery of {n:,} vectors is too small to train {PQ_CENTROIDS} codes per "
            "sub-vector; use --kind flat"
        )
    lists = _clusters(n)
    fixed = lists * 4 * d + PQ_CENTROIDS * 4 * d  # the centroids and the PQ codebooks
    divisors = [m for m in range(1, d // 2 + 1) if d % m == 0 and (m <= 64 or m % 4 == 0)]
    if max_memory is None:
        code = max(m for m in divisors if m <= max(1, d // 16))
    else:
        fitting = [m for m in divisors if n * (m + 16) + fixed <= max_memory]
        if not fitting:
            smallest = n * (divisors[0] + 16) + fixed
            raise InputError(
                f"--max-memory: the smallest ivfpq index of {n:,} vectors takes {human_bytes(smallest)}, "
                f"more than its share {human_bytes(max_memory)}"
            )
        code = max(fitting)
    # per vector: its code, its id and its direct-map entry
    return Plan(f"IVF{lists},PQ{code}", "nprobe", _probes(lists), n * (code + 16) + fixed, lossy=True)


# --kind -> planner (n vectors, width d, memory budget in bytes or None) -> Plan
KINDS: dict[str, Callable[[int, int, int | None], Plan]] = {
    "flat": plan_flat,
    "ivf": plan_ivf,
    "hnsw": plan_hnsw,
    "ivfpq": plan_ivfpq,
}


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"--kind: unknown index kind '{kind}' (choose from {', '.join(KINDS)})")


def plan(kind: str, n: int, d: int, max_memory: int | None) -> Plan:
    """The kind's plan for n vectors of width d, within `max_memory` bytes (its share of `--max-memory`; one
    line if it cannot be)."""
    check_kind(kind)
    chosen = KINDS[kind](n, d, max_memory)
    if max_memory is not None and chosen.bytes > max_memory:
        raise InputError(
            f"--max-memory: a {kind} index of {n:,} {d}-d vectors takes about {human_bytes(chosen.bytes)}, "
            f"more than its share {human_bytes(max_memory)}; allow more, or use --kind ivfpq, whose codes "
            "fit the budget"
        )
    return chosen


def build(vectors: np.ndarray, chosen: Plan):
    """The planned index over `vectors` (L2-normalized float32 rows), trained on them where it needs it."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], chosen.factory, faiss.METRIC_INNER_PRODUCT)
    threads.adjust()
    if not index.is_trained:  # on a sample spread over the gallery: k-means time grows with it
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.min_points_per_centroid = 1  # a small gallery's few lists are planned: no warning about them
        size = min(len(vectors), TRAINING_POINTS_PER_CLUSTER * ivf.nlist)
        index.train(vectors[np.linspace(0, len(vectors) - 1, size).round().astype(int)])
    index.add(vectors)
    if chosen.knob == "nprobe":  # an indexed image's own vector, looked up by id (`search`)
        faiss.extract_index_ivf(index).make_direct_map()
    return index


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k rows for each query (inner product)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


def recall_at(found: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """K-recall@K for each K of KS: the mean share of each query's exact top K among its found top K."""
    recall = {}
    for k in KS:
        k_ = min(k, exact.shape[1])
        hits = [len(set(f[:k_]) & set(e[:k_])) for f, e in zip(found, exact, strict=True)]
        recall[f"r{k}"] = round(float(np.mean(hits)) / k_, 4)
    return recall


def set_search(index, setting: str) -> None:
    """Apply a recorded search setting ("nprobe=16"; "" for none) to a loaded index."""
    import faiss

    if setting:
        faiss.ParameterSpace().set_index_parameters(index, setting)


def tune(index, chosen: Plan, queries: np.ndarray, exact: np.ndarray) -> tuple[str, dict[str, float]]:
    """The smallest value of the plan's knob whose recall@10 reaches RECALL_TARGET (else the largest tried),
    set on the index; returns its setting and the recall it measured."""
    k = exact.shape[1]
    if chosen.knob is None:
        return "", recall_at(index.search(queries, k)[1], exact)
    best: tuple[str, dict] | None = None
    for value in chosen.knob_values:
        setting = f"{chosen.knob}={value}"
        set_search(index, setting)
        recall = recall_at(index.search(queries, k)[1], exact)
        if recall["r10"] >= RECALL_TARGET:
            return setting, recall
        if chosen.lossy and best and recall["r10"] < best[1]["r10"] + PLATEAU:  # the codes limit it now
            break
        best = (setting, recall)
    set_search(index, best[0])
    return best


def held_out_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tuning, measuring): up to TUNING_QUERIES each of the gallery's real queries, spread evenly over
    them and alternating, so the recall recorded is of queries the tuning did not see (one query: both)."""
    if len(queries) < 2:
        return queries, queries
    count = min(len(queries), 2 * TUNING_QUERIES)
    picked = queries[np.linspace(0, len(queries) - 1, count).round().astype(int)]
    return picked[0::2], picked[1::2]


def parse_size(text: str) -> int:
    """`--max-memory`: 2GB, 512MiB, 1.5G, or bytes."""
    units = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }
    cleaned = text.strip().upper().removesuffix("B")
    number = cleaned.rstrip("KMGTI")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise InputError(f"--max-memory '{text}' is not a size (e.g. 2GB, 512MiB)") from None
    if not math.isfinite(value) or value < 1:
        raise InputError(f"--max-memory '{text}' must be a positive size")
    return int(value)
