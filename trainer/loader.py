"""The streaming loader: WebDataset shards -> (image, caption) pair batches, flat in memory. Its stages are
small generators (webdataset style), composed in `_EpochStream.__iter__`; the order is
trainer/data_order.py's and the augmentation draws are hashed, so `StreamingLoader.batches(epoch,
start_step)` resumes at any step. The stages: docs/architecture.md, "`userpipe shard` and the loader".
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from userpipe.pipeline.shard_io import check_shard
from userpipe.schemas.errors import InputError
from userpipe.schemas.shard import ShardError, ShardSample
from userpipe.schemas.sources import read_bytes
from userpipe.trainer.batch_buffers import Batch, SharedBatchBuffers, collate
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.counter_random import hashed
from userpipe.trainer.data_order import (
    Pair,
    Visit,
    WorkerPlan,
    visit_pairs,
    worker_batches,
    worker_plans,
    worker_visits,
)
from userpipe.trainer.shard_set import ShardSet

UNCHECKED, VERIFIED, DAMAGED = 0, 1, 2  # what a loader knows of a shard's bytes


# --------------------------------------------------------------------------- stages


def read_shard(shards: ShardSet, shard: int, state: int, check_sha256: bool) -> list[ShardSample]:
    """Every sample of one shard, decoded and checked against its manifest record (`check_shard`) before
    any is used; ShardError names a shard that fails. A local shard is mapped read-only (its members become
    views of the page cache, copied once, into the batch), a URL or `pipe:` command read whole. Its sha256
    is computed from those bytes unless `state` is VERIFIED: it matched at an earlier reading, which later
    ones trust (a change since then that keeps the tar valid goes unseen: the loader does not guard
    against shards rewritten while it runs)."""
    url = shards.urls[shard]
    if state == DAMAGED:
        raise ShardError(f"{url} was found damaged at an earlier reading")
    return check_shard(
        shards.records[shard],
        url,
        read_bytes(url, "a shard", ShardError, mapped=True),
        sha256=check_sha256,
        trusted=state == VERIFIED,
        fields=shards.fields,
        feature_dim=shards.store_config.feature_dim,
    )


def tokenized(
    pairs: Iterable[Pair], tokenizer: CaptionTokenizer, augment: bool, seed: int, epoch: int, chunk: int = 256
) -> Iterator[tuple[Pair, np.ndarray]]:
    """Each pair with its caption's token ids, `chunk` captions per tokenizer call; the augmentation is
    keyed by (seed, epoch, image, caption), so it does not depend on the chunks."""
    for group in batched(pairs, chunk, drop_last=False):
        keys = None
        if augment:
            keys = hashed(seed, epoch, [p.sample.meta.index for p in group], [p.caption for p in group])
        texts = [pair.sample.captions[pair.caption] for pair in group]
        yield from zip(group, tokenizer.many(texts, keys), strict=True)


def batched(items: Iterable, size: int, drop_last: bool) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


# --------------------------------------------------------------------------- the loader


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    seed: int = 0
    workers: int = 0
    train: bool = True  # augmentation on, partial batches dropped
    skip_corrupt: bool = False
    check_sha256: bool = True  # hash a shard's bytes at its first reading (bench/loader_throughput.py: cost)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank; DataLoader worker i follows plans[i]."""

    def __init__(
        self,
        shards: ShardSet,
        settings: LoaderSettings,
        tokenizer: CaptionTokenizer,
        epoch: int,
        plans: list[WorkerPlan],
        shard_states: torch.Tensor,
    ):
        super().__init__()
        self.shard_states = shard_states  # (shards,) uint8 in shared memory: UNCHECKED, VERIFIED or DAMAGED
        self.shards, self.settings, self.tokenizer, self.epoch, self.plans = (
            shards,
            settings,
            tokenizer,
            epoch,
            plans,
        )
        config = shards.store_config  # a full batch of regions fills a slot
        slot_bytes = settings.batch_size * config.num_regions * config.feature_dim * torch.float16.itemsize
        self.buffers = SharedBatchBuffers(settings.workers, slot_bytes) if settings.workers else None

    def _pairs(self, plan: WorkerPlan, skipped: list[int]) -> Iterator[Pair]:
        """The plan's pairs. A shard's sha256 is checked at its first reading by any worker of this loader
        (later readings map the same bytes, and hashing cost as much as decoding them); a shard found
        damaged raises ShardError, or with skip_corrupt is skipped at this and every later visit, by every
        worker (each visit counted)."""
        seed = self.settings.seed
        for n, (pass_, shard) in enumerate(plan.visits):
            try:
                state = int(self.shard_states[shard])
                samples = read_shard(self.shards, shard, state, self.settings.check_sha256)
                if self.settings.check_sha256:
                    self.shard_states[shard] = VERIFIED
            except ShardError as exc:
                self.shard_states[shard] = DAMAGED
                if not self.settings.skip_corrupt:
                    raise
                skipped[0] += 1
                warnings.warn(f"skipped: {exc}", stacklevel=2)
                continue
            pairs = visit_pairs(samples, seed, self.epoch, pass_)
            yield from itertools.islice(pairs, plan.skip_pairs if n == 0 else 0, None)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        plan = self.plans[info.id if info else 0]
        skipped = [0]
        pairs = self._pairs(plan, skipped)
        items = tokenized(pairs, self.tokenizer, self.settings.train, self.settings.seed, self.epoch)
        slots: list[int | None] = [None]

        def shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            tensor, slot = self.buffers.empty(info.id, shape, dtype)
            slots.append(slot)
            return tensor

        for group in batched(items, self.settings.batch_size, drop_last=self.settings.train):
            batch = collate(group) if info is None else collate(group, shared)
            batch.worker, batch.shards_skipped = plan.worker, skipped[0]
            batch.buffer = None if info is None or slots[-1] is None else (info.id, slots[-1])
            yield batch


class StreamingLoader:
    """Batches of (image, caption) pairs for one rank; `batches_per_epoch()` counts them."""

    def __init__(
        self,
        shards: ShardSet,
        tokenizer: CaptionTokenizer,
        settings: LoaderSettings,
        rank: int | None = None,
        world: int | None = None,
    ):
        self.shards, self.tokenizer, self.settings = shards, tokenizer, settings
        default_rank, default_world = _rank_world()
        self.rank = default_rank if rank is None else rank
        self.world = default_world if world is None else world
        if len(shards) < self.world * max(1, settings.workers):
            raise InputError(
                f"{len(shards)} shards cannot feed {self.world} rank(s) x {max(1, settings.workers)} "
                "worker(s); reshard with a smaller --max-count"
            )
        # what this loader's readings found, shared by its workers in every epoch
        self.shard_states = torch.full((len(shards),), UNCHECKED, dtype=torch.uint8).share_memory_()

    def _worker_visits(self, epoch: int, rank: int | None = None) -> list[list[Visit]]:
        """Each logical worker's shard visits in the epoch, pass after pass (of this rank, or `rank`)."""
        rank = self.rank if rank is None else rank
        settings = self.settings
        return worker_visits(
            len(self.shards), self.shards.passes, settings.seed, epoch, rank, self.world, settings.workers
        )

    def _worker_batches(self, visits: list[list[Visit]]) -> list[int]:
        return worker_batches(visits, self.shards.samples, self.settings.batch_size, self.settings.train)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """The epoch's batches on every rank: the fewest any rank's shards give, so that all ranks take
        the same number of steps (none waits in a collective for a step another never takes); a rank with
        more leaves its last ones out, so the ranks see each pair of the epoch at most once."""
        return min(sum(self._worker_batches(self._worker_visits(epoch, r))) for r in range(self.world))

    def _plans(self, epoch: int, start_step: int) -> list[WorkerPlan]:
        """One plan per DataLoader worker, for an epoch entered at start_step (data_order.worker_plans)."""
        visits = self._worker_visits(epoch)
        batches = self._worker_batches(visits)
        return worker_plans(visits, batches, self.shards.samples, self.settings.batch_size, start_step)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The epoch's batches from `start_step` on (0-based, counted in this rank's batches)."""
        stream = _EpochStream(
            self.shards,
            self.settings,
            self.tokenizer,
            epoch,
            self._plans(epoch, start_step),
            self.shard_states,
        )
        # its own generator: creating the DataLoader must not draw from the global RNG (dropout's),
        # or a run resumed mid-epoch would not continue the uninterrupted run's random stream
        generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.settings.workers,
            persistent_workers=False,
            generator=generator,
        )
        try:
            for batch in itertools.islice(loader, max(0, self.batches_per_epoch(epoch) - start_step)):
                if stream.buffers is not None:
                    stream.buffers.reclaim()
                    batch = stream.buffers.receive(batch)
                yield batch
        except InputError as exc:  # from a worker process, the DataLoader adds its traceback to the message
            kind = type(exc)
            raw = str(exc.args[0]) if exc.args else ""
            raise kind(raw.rsplit(f"{kind.__module__}.{kind.__qualname__}: ", 1)[-1]) from None
