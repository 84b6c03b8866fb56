"""The data order: which pairs each rank and DataLoader worker reads in an epoch, and in which order, as a
pure function of (seed, epoch, rank, world, worker count) and the manifest's counts. An epoch is `passes`
passes over the shards, each pairing every image with one of its captions; `worker_plans` says where any
step of an epoch is. Why and how: docs/architecture.md, "Data order".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from userpipe.schemas.shard import ShardSample
from userpipe.trainer.counter_random import hashed


@dataclass(frozen=True)
class Pair:
    sample: ShardSample
    caption: int  # index into sample.captions


def same_image_counts(batch_ids: torch.Tensor, queue_ids: torch.Tensor | None = None) -> dict[str, float]:
    """The data order's false negatives: per query, the mean number of *other* captions of its own image in
    its batch (`same_image_batch`) and of entries of its own image in the queue it is scored against
    (`same_image_queue`; ids < 0 are the queue's random start). Each counts as a negative unless
    model.mask_false_negatives; a global shuffle of COCO keeps both near 0 (bench/data_order.py)."""
    ids = batch_ids.long().cpu()
    counts = {"same_image_batch": float(((ids[:, None] == ids[None, :]).sum(1) - 1).double().mean())}
    if queue_ids is not None:
        queue = queue_ids.long().cpu()
        counts["same_image_queue"] = float((ids[:, None] == queue[None, :]).sum(1).double().mean())
    return counts


def pass_order(num_shards: int, seed: int, epoch: int, pass_: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, pass_]).permutation(num_shards)


def split_shards(order: np.ndarray, part: int, parts: int) -> np.ndarray:
    """Every parts-th shard from `part`: ranks, then workers, each see disjoint shards."""
    return order[part::parts]


def captions_for_pass(images: np.ndarray, num_captions: np.ndarray, seed: int, epoch: int, pass_: int):
    """The caption each image is paired with in one pass: entry `pass_` (cycled when an image has fewer
    captions than the epoch has passes) of a per-(seed, epoch, image) permutation of its captions, which
    sorts hashed keys, for a whole shard at once."""
    images, num_captions = np.asarray(images, np.int64), np.asarray(num_captions, np.int64)
    columns = np.arange(max(1, int(num_captions.max(initial=1))))
    keys = hashed(seed, epoch, images[:, None], columns[None, :])
    keys[columns[None, :] >= num_captions[:, None]] = np.iinfo(np.uint64).max
    order = np.argsort(keys, axis=1, kind="stable")
    return order[np.arange(len(images)), pass_ % np.maximum(num_captions, 1)]


def caption_for_pass(image: int, num_captions: int, seed: int, epoch: int, pass_: int) -> int:
    return int(captions_for_pass(np.array([image]), np.array([num_captions]), seed, epoch, pass_)[0])


def visit_pairs(samples: list[ShardSample], seed: int, epoch: int, pass_: int) -> Iterator[Pair]:
    """One visit of a shard in a pass: every image once, in a seeded order, with its caption for the pass."""
    if not samples:
        return
    images = np.array([s.meta.index for s in samples])
    captions = captions_for_pass(images, np.array([len(s.captions) for s in samples]), seed, epoch, pass_)
    for i in np.random.default_rng([seed, epoch, pass_, samples[0].meta.index]).permutation(len(samples)):
        yield Pair(samples[i], int(captions[i]))


Visit = tuple[int, int]  # (pass, shard index): one reading of a shard within an epoch


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker reads in an epoch: its logical worker's shard visits, minus those a
    resumed run has already consumed, and the pairs to skip in the first of them."""

    worker: int
    visits: tuple[Visit, ...]
    skip_pairs: int


def worker_visits(
    num_shards: int, passes: int, seed: int, epoch: int, rank: int, world: int, workers: int
) -> list[list[Visit]]:
    """Each logical worker's shard visits in the epoch, pass after pass, on one rank."""
    workers = max(1, workers)
    visits: list[list[Visit]] = [[] for _ in range(workers)]
    for pass_ in range(passes):
        rank_shards = split_shards(pass_order(num_shards, seed, epoch, pass_), rank, world)
        for w in range(workers):
            visits[w] += [(pass_, int(i)) for i in split_shards(rank_shards, w, workers)]
    return visits


def worker_batches(
    visits: list[list[Visit]], samples: tuple[int, ...], batch_size: int, drop_last: bool
) -> list[int]:
    """Each logical worker's batches: its visits' pairs (the manifest's sample counts) in batch_size."""
    pairs = [sum(samples[shard] for _, shard in worker) for worker in visits]
    return [p // batch_size if drop_last else -(-p // batch_size) for p in pairs]


def worker_plans(
    visits: list[list[Visit]], batches: list[int], samples: tuple[int, ...], batch_size: int, start_step: int
) -> list[WorkerPlan]:
    """One plan per DataLoader worker, for an epoch entered at start_step.

    A logical worker owns a fixed list of the rank's shard visits (`visits`, making `batches` batches each).
    The DataLoader takes batches from its workers round robin, passing over exhausted ones, so the first
    start_step batches are the first c_w batches of each logical worker w; and since a fresh DataLoader
    starts its round at worker 0, DataLoader workers take the logical workers in the order the round would
    have continued.
    """
    remaining = list(batches)
    workers = len(remaining)
    consumed = [0] * workers
    step, last = 0, workers - 1
    while step < start_step and any(remaining):
        last = (last + 1) % workers
        if remaining[last]:
            remaining[last] -= 1
            consumed[last] += 1
            step += 1
    cycle = [(last + 1 + j) % workers for j in range(workers)]
    order = [w for w in cycle if remaining[w]] + [w for w in cycle if not remaining[w]]
    plans = []
    for w in order:
        mine, pairs = visits[w], consumed[w] * batch_size
        dropped = 0
        while dropped < len(mine) and pairs >= samples[mine[dropped][1]]:
            pairs -= samples[mine[dropped][1]]
            dropped += 1
        plans.append(WorkerPlan(w, tuple(mine[dropped:]), pairs))
    return plans
