"""Batches: what a batch holds (`Batch`), how a DataLoader worker fills one (`collate`), and the shared
memory its regions travel in to the training process (`SharedBatchBuffers`).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from userpipe.trainer.data_order import Pair


@dataclass
class Batch:
    regions: (
        torch.Tensor
    )  # (B, K, D) float16 as stored (half the copy and IPC cost), zero past region_lengths
    region_lengths: torch.Tensor  # (B,) int64
    boxes: torch.Tensor  # (B, K, 4)
    tokens: torch.Tensor  # (B, L) int64, zero past token_lengths
    token_lengths: torch.Tensor  # (B,)
    image_index: torch.Tensor  # (B,) row in the store split: equal values = same image (false negatives)
    caption_index: torch.Tensor  # (B,) caption number within its image
    clip_image: torch.Tensor | None = None  # (B, C) float16
    clip_text: torch.Tensor | None = None  # (B, C) float16
    worker: int = 0
    shards_skipped: int = 0  # shard readings skipped so far (one per pass) by the worker of this batch
    image_ids: list[str] = field(default_factory=list)
    buffer: tuple[int, int] | None = None  # (DataLoader worker, slot) of the shared buffer holding regions

    def __reduce__(self):
        """From a DataLoader worker: tensors under 1 MiB travel inside the pickle. torch would give each
        its own shared-memory file and a socket round trip to pass it; the regions are already shared."""
        fields = {
            name: value.numpy() if isinstance(value, torch.Tensor) and value.nbytes < 1 << 20 else value
            for name, value in self.__dict__.items()
        }
        if self.buffer is not None:  # in a slot the training process maps already: only its shape travels
            fields["regions"] = torch.empty(self.regions.shape, dtype=self.regions.dtype, device="meta")
        return _batch_from_fields, (fields,)


def _batch_from_fields(fields: dict) -> Batch:
    return Batch(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()})


class SharedBatchBuffers:
    """Reused shared memory for the regions of the batches that DataLoader workers make.

    A fresh shared-memory tensor per batch, as torch's default_collate makes one, costs a tmpfs page
    allocation per 4 KiB (~18 ms for a COCO batch's 19 MB of regions here, as long as reading its 128 pairs),
    a file descriptor passed over a socket, and a new mapping in the training process. Instead the training
    process maps `slots` buffers per worker before the workers fork (anonymous shared mappings, which they
    inherit); a worker fills a free one and the batch crosses as (worker, slot) with a shape. The training
    process wraps the slot's memory in a new tensor and flags the slot free again once every tensor over it
    is dropped (a weak reference to that storage expires). A worker never waits: with no free slot (a
    consumer that keeps its batches), or workers that do not fork, it makes a fresh shared tensor as before.
    """

    def __init__(self, workers: int, slot_bytes: int, slots: int = 4):
        forked = torch.multiprocessing.get_start_method() == "fork"
        self.slot_bytes = slot_bytes
        self.free = torch.ones((workers, slots if forked else 0), dtype=torch.bool).share_memory_()
        self.memory = [[mmap.mmap(-1, slot_bytes) for _ in range(self.free.shape[1])] for _ in range(workers)]
        self.lent: list[tuple[int, int, StorageWeakRef]] = []  # in the training process

    def _view(self, worker: int, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.frombuffer(self.memory[worker][slot], dtype=dtype, count=math.prod(shape)).view(shape)

    def empty(
        self, worker: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, int | None]:
        """In worker `worker`: an uninitialised shared tensor and its slot (None: a fresh one)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= self.slot_bytes:
            for slot, free in enumerate(self.free[worker].tolist()):
                if free:
                    self.free[worker, slot] = False
                    return self._view(worker, slot, shape, dtype), slot
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape), None

    def receive(self, batch: Batch) -> Batch:
        """In the training process, as a batch arrives: its regions from its slot, which returns once the
        batch is dropped."""
        if batch.buffer is not None:
            worker, slot = batch.buffer
            batch.regions = self._view(worker, slot, tuple(batch.regions.shape), batch.regions.dtype)
            self.lent.append((worker, slot, StorageWeakRef(batch.regions.untyped_storage())))
        return batch

    def reclaim(self) -> None:
        """In the training process: flag the slots of dropped batches free."""
        for lent in [entry for entry in self.lent if entry[2].expired()]:
            self.free[lent[0], lent[1]] = True
            self.lent.remove(lent)


def collate(items: list[tuple[Pair, np.ndarray]], empty: Callable | None = None) -> Batch:
    """`empty(shape, dtype)` gives the uninitialised regions tensor (a worker's shared buffer)."""
    empty = empty or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    samples = [p.sample for p, _ in items]
    b = len(items)
    k = max(max(len(s.regions) for s in samples), 1)
    d = samples[0].regions.shape[1]
    regions, boxes = empty((b, k, d), torch.float16), torch.empty((b, k, 4), dtype=torch.float32)
    tokens = np.zeros((b, max(len(t) for _, t in items)), np.int64)
    regions_np, boxes_np = regions.numpy(), boxes.numpy()
    for i, (pair, ids) in enumerate(items):
        n = len(pair.sample.regions)
        regions_np[i, :n] = pair.sample.regions  # the samples' arrays are read-only views of the shard
        boxes_np[i, :n] = pair.sample.boxes
        if n < k:
            regions_np[i, n:], boxes_np[i, n:] = 0, 0
        tokens[i, : len(ids)] = ids
    batch = Batch(
        regions=regions,
        region_lengths=torch.tensor([len(s.regions) for s in samples]),
        boxes=boxes,
        tokens=torch.from_numpy(tokens),
        token_lengths=torch.tensor([len(t) for _, t in items]),
        image_index=torch.tensor([s.meta.index for s in samples]),
        caption_index=torch.tensor([p.caption for p, _ in items]),
        image_ids=[s.meta.image_id for s in samples],
    )
    if samples[0].clip_image is not None:
        batch.clip_image = torch.from_numpy(np.stack([s.clip_image for s in samples]))
    if samples[0].clip_text is not None:
        batch.clip_text = torch.from_numpy(np.stack([p.sample.clip_text[p.caption] for p, _ in items]))
    return batch
