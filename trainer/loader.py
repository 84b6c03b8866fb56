"""The streaming loader: WebDataset shards -> (image, caption) pair batches, flat in memory.

Stages, each a small generator (webdataset style), composed in `_EpochStream.__iter__`:

  shard list (manifest) -> per-pass seeded shard order -> split by rank -> split by DataLoader worker
  -> shard reading (a mapped file, an http(s) URL or a `pipe:` command, read by schemas.sources;
  schemas.shard decodes it and checks the count, and the sha256 at the shard's first reading)
  -> pairs: one caption of every image per pass, images shuffled within the shard
  -> tokenize (+ augmentation) -> batches

An epoch is `passes` passes over the shards (the set's captions per image, 5 for COCO and Flickr30K), and
each pass pairs every image with one of its captions, so the captions of an image are a whole pass apart:
a query meets another caption of its own image in its batch or queue about as rarely as under the released
code's global shuffle of all pairs (bench/data_order.py; docs/architecture.md, "Data order").

Ordering is a pure function of (seed, epoch, rank, world, worker count): the shard order is permuted per
pass, images are permuted within each shard visit, the caption an image gets in pass p is entry p of a
permutation of its captions drawn per (seed, epoch, image), and augmentation draws are hashed from
(seed, epoch, image, caption) (trainer/counter_random.py). Because a visit of a shard yields exactly
its manifest sample count of pairs, the manifest says where step S of an epoch is, and
`StreamingLoader.batches(epoch, start_step)` resumes there by dropping whole visits unread and skipping
pairs only inside the one partial visit.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from userpipe.schemas.errors import InputError, ManifestError
from userpipe.schemas.shard import (
    MANIFEST_NAME,
    SampleError,
    ShardSample,
    decode_sample,
    parse_manifest,
    read_manifest,
    tar_samples,
)
from userpipe.schemas.sources import announced_size, is_remote, read_bytes
from userpipe.schemas.store import ExtractorConfig
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.counter_random import hashed


class ShardError(InputError):
    """A shard could not be read completely; the message names it."""


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    samples: tuple[int, ...]
    captions: tuple[int, ...]
    sha256: tuple[str, ...]
    store_config: ExtractorConfig  # how the features in the shards were extracted
    fields: tuple[str, ...] = ()  # the members every sample has (the manifest's)

    @classmethod
    def from_manifest(cls, location: str | Path) -> ShardSet:
        """All shards of a manifest (a folder written by `userpipe shard`, or its manifest.json)."""
        path, manifest = read_manifest(location)
        for record in manifest.shards:  # a stat each: the full check (sha256) runs as the shards stream
            shard = path.parent / record.name
            if not shard.is_file():
                raise InputError(f"{shard} is missing (listed in {path})")
            if shard.stat().st_size != record.bytes:
                raise InputError(
                    f"{shard} has {shard.stat().st_size:,} bytes, {path} says {record.bytes:,}: it was "
                    "cut or altered (userpipe verify lists every damaged shard)"
                )
        return cls(
            tuple(str(path.parent / s.name) for s in manifest.shards),
            tuple(s.samples for s in manifest.shards),
            tuple(s.captions for s in manifest.shards),
            tuple(s.sha256 for s in manifest.shards),
            manifest.params.store_config,
            manifest.fields,
        )

    @classmethod
    def resolve(cls, spec: str | Path) -> ShardSet:
        """A manifest, or a brace pattern ("shards/train-{000000..000009}.tar") naming some of its shards;
        the manifest beside them supplies the per-shard counts that epochs and resuming rely on. Also
        shards elsewhere (`ShardSet.remote`): an http(s) URL or a `pipe:` command."""
        text = str(spec)
        if is_remote(text):
            return cls.remote(text)
        if "{" not in text:
            return cls.from_manifest(text)
        from braceexpand import braceexpand

        urls = list(braceexpand(text))
        folders = {str(Path(u).parent) for u in urls}
        if len(folders) != 1:
            raise InputError(f"shard pattern {text} spans several folders; one manifest must cover them")
        every = cls.from_manifest(folders.pop())
        index = {Path(u).name: i for i, u in enumerate(every.urls)}
        unknown = [Path(u).name for u in urls if Path(u).name not in index]
        if unknown:
            raise InputError(f"shard pattern {text} names shards the manifest does not list: {unknown[:3]}")
        picked = [index[Path(u).name] for u in urls]
        return cls(
            tuple(every.urls[i] for i in picked),
            tuple(every.samples[i] for i in picked),
            tuple(every.captions[i] for i in picked),
            tuple(every.sha256[i] for i in picked),
            every.store_config,
            every.fields,
        )

    @classmethod
    def remote(cls, spec: str) -> ShardSet:
        """Shards read where they are, for nodes without a shared filesystem: a folder URL
        ("https://host/train/"), its manifest's URL, a brace pattern of shard URLs, or a `pipe:` command
        whose word naming the shards is such a pattern ("pipe:aws s3 cp s3://b/train/{000000..000123}.tar -").
        The manifest is read the same way, from the folder of that word; each shard's size and sha256 are
        checked as it streams."""
        from braceexpand import braceexpand

        words = spec.split(" ") if spec.startswith("pipe:") else [spec]
        named = [i for i, w in enumerate(words) if w.endswith((".tar", ".json", "/"))]
        if not named and len(words) > 1:
            raise InputError(f"{spec}: no word of the command names the shards (a .tar brace pattern)")
        at = named[-1] if named else 0
        word = words[at]
        folder = word.rsplit("/", 1)[0] + "/" if word.endswith((".tar", ".json")) else word.rstrip("/") + "/"

        def located(name: str) -> str:
            return " ".join([*words[:at], folder + name, *words[at + 1 :]])

        source = located(MANIFEST_NAME)
        manifest = parse_manifest(read_bytes(source, "the shard manifest", ManifestError), source)
        names = [record.name for record in manifest.shards]
        picked = names
        if word.endswith(".tar"):
            picked = [name.rsplit("/", 1)[-1] for name in braceexpand(word)]
            unknown = [name for name in picked if name not in names]
            if unknown:
                raise InputError(f"shard pattern {spec} names shards {source} does not list: {unknown[:3]}")
        records = {record.name: record for record in manifest.shards}
        chosen = [records[name] for name in picked]
        _check_announced_sizes([(located(r.name), r.bytes) for r in chosen])
        return cls(
            tuple(located(r.name) for r in chosen),
            tuple(r.samples for r in chosen),
            tuple(r.captions for r in chosen),
            tuple(r.sha256 for r in chosen),
            manifest.params.store_config,
            manifest.fields,
        )

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def passes(self) -> int:
        """Passes per epoch: the set's captions per image, rounded (COCO's few images with 6 or 7
        captions use 5 of them per epoch, a different 5 each epoch)."""
        return max(1, round(sum(self.captions) / max(1, sum(self.samples))))


def _check_announced_sizes(shards: list[tuple[str, int]]) -> None:
    """Every http(s) shard is there at its manifest size before training starts (a HEAD request each, 16 at
    a time), as local shards are checked by their size: a missing or cut shard is refused before the run
    folder is written, not found hours into an epoch."""
    from concurrent.futures import ThreadPoolExecutor

    def size(shard: tuple[str, int]) -> tuple[str, int, int | None]:
        return shard[0], shard[1], announced_size(shard[0], "a shard", ShardError)

    with ThreadPoolExecutor(16) as pool:
        for url, expected, announced in pool.map(size, shards):
            if announced is not None and announced != expected:
                raise ShardError(
                    f"{url} has {announced:,} bytes, the manifest says {expected:,}: it was cut or altered"
                )


@dataclass(frozen=True)
class Pair:
    sample: ShardSample
    caption: int  # index into sample.captions


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


# --------------------------------------------------------------------------- stages


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


def shard_archive(url: str) -> bytes | memoryview:
    """A shard's bytes: a local file mapped read-only (its members become views of the page cache, copied
    once, into the batch), a URL or `pipe:` command read whole. ShardError when it cannot be read."""
    return read_bytes(url, "a shard", ShardError, mapped=True)


def read_shard(
    url: str,
    samples: int,
    sha256: str | None,
    fields: tuple[str, ...] = (),
    feature_dim: int | None = None,
    verified: bool = False,
) -> list[ShardSample]:
    """Every sample of one shard, decoded and checked, before any is used: a shard that fails, holds another
    number of samples than its manifest record, or (with `sha256`) whose bytes hash otherwise raises
    ShardError naming it. With `sha256` the tar headers' own checksums are not computed: the whole-shard hash
    covers them. `verified`: it matched at an earlier reading and is not computed again (a change since then
    that keeps the tar valid goes unseen: the loader does not guard against shards rewritten while it
    runs)."""
    archive = shard_archive(url)
    read: list[ShardSample] = []
    try:
        for raw in tar_samples(archive, url, checksums=sha256 is None):
            read.append(decode_sample(raw, fields or None, feature_dim))
    except SampleError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - tar and OS errors all mean "this shard is broken"
        raise ShardError(
            f"{url} is unreadable after {len(read)} samples: "
            f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
        ) from None
    if len(read) != samples:
        raise ShardError(f"{url} yielded {len(read)} samples, the manifest says {samples} (truncated?)")
    if sha256 is not None and not verified and hashlib.sha256(archive).hexdigest() != sha256:
        raise ShardError(
            f"{url} was altered: its sha256 differs from the manifest "
            "(userpipe verify lists every damaged shard)"
        )
    return read


def visit_pairs(samples: list[ShardSample], seed: int, epoch: int, pass_: int) -> Iterator[Pair]:
    """One visit of a shard in a pass: every image once, in a seeded order, with its caption for the pass."""
    if not samples:
        return
    images = np.array([s.meta.index for s in samples])
    captions = captions_for_pass(images, np.array([len(s.captions) for s in samples]), seed, epoch, pass_)
    for i in np.random.default_rng([seed, epoch, pass_, samples[0].meta.index]).permutation(len(samples)):
        yield Pair(samples[i], int(captions[i]))


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


Visit = tuple[int, int]  # (pass, shard index): one reading of a shard within an epoch
UNCHECKED, VERIFIED, DAMAGED = 0, 1, 2  # what a loader knows of a shard's bytes


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker reads in an epoch: its logical worker's shard visits, minus those a
    resumed run has already consumed, and the pairs to skip in the first of them."""

    worker: int
    visits: tuple[Visit, ...]
    skip_pairs: int


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
        seed, fields, dim = self.settings.seed, self.shards.fields, self.shards.store_config.feature_dim
        for n, (pass_, shard) in enumerate(plan.visits):
            url, state = self.shards.urls[shard], int(self.shard_states[shard])
            try:
                if state == DAMAGED:
                    raise ShardError(f"{url} was found damaged at an earlier reading")
                samples = read_shard(
                    url,
                    self.shards.samples[shard],
                    self.shards.sha256[shard] if self.settings.check_sha256 else None,
                    fields,
                    dim,
                    verified=state == VERIFIED,
                )
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
        workers = max(1, self.settings.workers)
        visits: list[list[Visit]] = [[] for _ in range(workers)]
        for pass_ in range(self.shards.passes):
            order = pass_order(len(self.shards), self.settings.seed, epoch, pass_)
            rank_shards = split_shards(order, self.rank if rank is None else rank, self.world)
            for w in range(workers):
                visits[w] += [(pass_, int(i)) for i in split_shards(rank_shards, w, workers)]
        return visits

    def _worker_batches(self, worker_visits: list[list[Visit]]) -> list[int]:
        size, drop = self.settings.batch_size, self.settings.train
        pairs = [sum(self.shards.samples[shard] for _, shard in visits) for visits in worker_visits]
        return [p // size if drop else -(-p // size) for p in pairs]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """The epoch's batches on every rank: the fewest any rank's shards give, so that all ranks take
        the same number of steps (none waits in a collective for a step another never takes); a rank with
        more leaves its last ones out, so the ranks see each pair of the epoch at most once."""
        return min(sum(self._worker_batches(self._worker_visits(epoch, r))) for r in range(self.world))

    def _plans(self, epoch: int, start_step: int) -> list[WorkerPlan]:
        """One plan per DataLoader worker, for an epoch entered at start_step.

        A logical worker owns a fixed list of the rank's shard visits. The DataLoader takes batches from its
        workers round robin, passing over exhausted ones, so the first start_step batches are the first
        c_w batches of each logical worker w; and since a fresh DataLoader starts its round at worker
        0, DataLoader workers take the logical workers in the order the round would have continued.
        """
        worker_visits = self._worker_visits(epoch)
        remaining = self._worker_batches(worker_visits)
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
            visits, pairs = worker_visits[w], consumed[w] * self.settings.batch_size
            dropped = 0
            while dropped < len(visits) and pairs >= self.shards.samples[visits[dropped][1]]:
                pairs -= self.shards.samples[visits[dropped][1]]
                dropped += 1
            plans.append(WorkerPlan(w, tuple(visits[dropped:]), pairs))
        return plans

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
