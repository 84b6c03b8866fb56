"""Reading a feature store, for every stage that reads one (shard, eval, index, search, report, verify, info).

A Zarr v3 group laid out as `schemas.store` says, at a local path or a URL (`s3://`, `gs://`, any fsspec
filesystem, its credentials from the environment as that filesystem reads them). Reads go through
`CheckedGroup`/`CheckedArray`, which turn a missing or damaged chunk into one line naming the array, the rows
and the repair. Chunks are found, read and removed through Zarr's store interface, the same calls for a
folder and a bucket. The writer is pipeline/store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from userpipe.schemas.base import parse_json
from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import is_remote
from userpipe.schemas.store import (
    StoreAttrs,
    StoreValidationError,
    split_array_specs,
    stored_objects,
    validate_store,
)


def zarr_store(location: str | Path, read_only: bool = True):
    """The Zarr store at a local path, or at a URL through fsspec: the one way every reader and writer opens
    one. Without fsspec's listings cache: a listing (`stored_chunks`) would otherwise hide, for the rest of
    the process, the chunks other tasks write after it."""
    text = str(location)
    if not is_remote(text):
        return LocalStore(text, read_only=read_only)
    try:
        return FsspecStore.from_url(text, storage_options={"use_listings_cache": False}, read_only=read_only)
    except (ImportError, ValueError) as exc:  # no filesystem for the scheme, or a URL it cannot parse
        raise InputError(f"cannot open {text}: {exc}") from None


def is_store(location: str | Path) -> bool:
    """A Zarr group's metadata is at `location` (a folder or a URL)."""
    return sync(zarr_store(location).exists("zarr.json"))


def _listed(store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [name async for name in store.list_dir(prefix)]

    return sync(collect())


def _get(store, key: str) -> bytes | None:
    found = sync(store.get(key, default_buffer_prototype()))
    return None if found is None else found.to_bytes()


def open_store(path: str | Path, mode: str = "r") -> tuple[CheckedGroup, StoreAttrs]:
    """Open and validate; a missing, foreign or damaged store is an InputError naming the file.
    Reads through the returned group turn a missing or undecodable chunk into one line (`CheckedArray`)."""
    store = zarr_store(path, read_only=mode == "r")
    if not sync(store.exists("zarr.json")):
        raise InputError(f"no Zarr store at {path}")
    parse_json(_get(store, "zarr.json"), f"{path}/zarr.json")
    for split in sorted(set(_listed(store, "")) - {"zarr.json"}):  # the groups' and arrays' metadata
        if (meta := _get(store, f"{split}/zarr.json")) is None:
            continue  # not a group: validation names what is missing
        parse_json(meta, f"{path}/{split}/zarr.json")
        for name in sorted(_listed(store, split)):
            if (meta := _get(store, f"{split}/{name}/zarr.json")) is not None:
                parse_json(meta, f"{path}/{split}/{name}/zarr.json")
    try:
        root = zarr.open_group(store, mode=mode, zarr_format=3)
        attrs = validate_store(root)
        return CheckedGroup(root, path, attrs.chunk_checksums and attrs.complete), attrs
    except StoreValidationError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (
        zarr.errors.BaseZarrError,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:  # metadata that parses but is wrong
        raise InputError(f"{path} has damaged metadata: {type(exc).__name__}: {exc}") from None


REPAIR = "rerun userpipe extract with the same options to repair the store"


def store_split(path: Path, root, attrs: StoreAttrs, split: str):
    """The split's group of an open store; one line naming the splits it has when it has not that one."""
    if split not in attrs.splits:
        raise InputError(f"{path} has no split '{split}' (it has: {', '.join(attrs.splits)})")
    return root[split]


def stored_rows(array) -> int:
    """Rows per stored object along the first axis: a shard's (the sharded arrays of 1.2) or a chunk's. The
    schema's "chunk" of an array is this object: what a task writes, a file, a done-flag's unit."""
    return (array.shards or array.chunks)[0]


def chunk_key(array: zarr.Array, chunk: int) -> str:
    """The key (path in the store) of chunk (or shard) `chunk` along the first axis (the others are whole,
    by the schema)."""
    return f"{array.path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def chunk_exists(array: zarr.Array, chunk: int) -> bool:
    return sync(array.store_path.store.exists(chunk_key(array, chunk)))


def remove_chunk(array: zarr.Array, chunk: int) -> None:
    sync(array.store_path.store.delete(chunk_key(array, chunk)))


def stored_chunks(array: zarr.Array) -> set[int]:
    """The chunks along the first axis that are stored, from one listing of the array's keys (a request
    per thousand objects on an object store, not one per chunk)."""

    async def collect() -> set[str]:
        return {key async for key in array.store_path.store.list_prefix(f"{array.path}/")}

    keys = sync(collect())
    count = -(-array.shape[0] // stored_rows(array))
    return {chunk for chunk in range(count) if chunk_key(array, chunk) in keys}


def _crc_differs(data: bytes) -> bool:
    """Bytes that end in a crc32c of the rest (Zarr's crc32c codec) whose crc does not match."""
    return len(data) < 4 or google_crc32c.value(data[:-4]).to_bytes(4, "little") != data[-4:]


_EMPTY = 2**64 - 1  # a shard index's offset and length of an inner chunk that was never written


def _shard_problem(data: bytes, array, sharding: ShardingCodec) -> str | None:
    """A shard's bytes checked without decoding: its index (inner chunks' offsets and lengths, then a
    crc32c), and each inner chunk's own crc32c."""
    count = int(np.prod([s // c for s, c in zip(array.shards, sharding.chunk_shape, strict=True)]))
    size = 16 * count + 4
    index = data[-size:] if sharding.index_location == ShardingCodecIndexLocation.end else data[:size]
    if len(data) < size or _crc_differs(index):
        return "damaged (the shard's index: crc32c differs)"
    for row, (offset, length) in enumerate(np.frombuffer(index[:-4], "<u8").reshape(-1, 2)):
        if offset != _EMPTY and _crc_differs(data[int(offset) : int(offset) + int(length)]):
            return f"damaged (its image {row}: crc32c differs)"
    return None


def chunk_problem(array: zarr.Array, chunk: int) -> str | None:
    """What is wrong with a chunk (or shard) that should exist: 'missing', 'damaged (...)', or None when it
    is intact. With crc32c codecs the stored bytes are checked without decoding them; otherwise decoded."""
    data = _get(array.store_path.store, chunk_key(array, chunk))
    if data is None:
        return "missing"
    codecs = array.metadata.codecs
    sharding = next((codec for codec in codecs if isinstance(codec, ShardingCodec)), None)
    if sharding is not None and all(
        any(isinstance(codec, Crc32cCodec) for codec in chain)
        for chain in (sharding.codecs, sharding.index_codecs)
    ):
        return _shard_problem(data, array, sharding)
    if any(isinstance(codec, Crc32cCodec) for codec in codecs):
        return "damaged (crc32c differs)" if _crc_differs(data) else None
    size = stored_rows(array)
    try:
        array[chunk * size : (chunk + 1) * size]
    except Exception as exc:  # noqa: BLE001 - each codec reports damage its own way
        return f"damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


class CheckedArray:
    """A store array whose reads name the array and chunk of any damage (else as `zarr.Array`). In a complete
    store with chunk checksums, a chunk file that is not there is reported too, not read as fill values."""

    def __init__(self, array: zarr.Array, store: str | Path, expect_every_chunk: bool):
        self.array, self.store, self.expect_every_chunk = array, store, expect_every_chunk

    def __getattr__(self, name):  # shape, dtype, chunks, metadata, ...
        return getattr(self.array, name)

    def _chunks_read(self, selection) -> range:
        """The chunks along the first axis that `selection` reads (every chunk for an index array)."""
        rows = selection[0] if isinstance(selection, tuple) and selection else selection
        size, length = stored_rows(self.array), self.array.shape[0]
        if isinstance(rows, (int, np.integer)):
            if not -length <= rows < length:
                return range(0)  # Zarr raises its IndexError
            rows = slice(int(rows) % length, int(rows) % length + 1)
        if not isinstance(rows, slice):
            rows = slice(None)
        start, stop, _ = rows.indices(length)
        return range(start // size, -(-stop // size)) if stop > start else range(0)

    def _damage(self, chunk: int, problem: str) -> InputError:
        size = stored_rows(self.array)
        return InputError(
            f"{self.store}: chunk {chunk} "
            f"(rows {chunk * size}-{min(self.array.shape[0], (chunk + 1) * size) - 1}) "
            f"of array '{self.array.path}' is {problem}; {REPAIR}"
        )

    def __getitem__(self, selection):
        chunks = self._chunks_read(selection)
        if self.expect_every_chunk:
            for chunk in chunks:
                if not chunk_exists(self.array, chunk):
                    raise self._damage(chunk, "missing")
        try:
            if self.array.shards is None:
                return self.array[selection]
            # a shard's images decoded as one batch, not one at a time (2.8x faster at a whole shard)
            with zarr.config.set({"codec_pipeline.batch_size": self.array.shards[0]}):
                return self.array[selection]
        except Exception:  # which chunk, and why: checked one by one
            for chunk in chunks:
                if problem := chunk_problem(self.array, chunk):
                    raise self._damage(chunk, problem) from None
            raise


class CheckedGroup:
    """A store group whose arrays are `CheckedArray`s; everything else as `zarr.Group`."""

    def __init__(self, group: zarr.Group, store: str | Path, expect_every_chunk: bool):
        self.group, self.store, self.expect_every_chunk = group, store, expect_every_chunk

    def __getattr__(self, name):  # attrs, arrays(), ...
        return getattr(self.group, name)

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getitem__(self, name: str):
        child = self.group[name]
        wrap = CheckedGroup if isinstance(child, zarr.Group) else CheckedArray
        return wrap(child, self.store, self.expect_every_chunk)


@dataclass(frozen=True)
class ChunkProblem:
    array: str  # split/name
    chunk: int
    problem: str


def done_flags(group, name: str, count: int) -> np.ndarray:
    """A split's done-flags; a flag whose chunk is missing or damaged counts as not done."""
    if name not in group:
        return np.zeros(count, bool)
    array = group[name]
    flags = np.zeros(count, bool)
    for chunk in sorted(stored_chunks(array)):
        if chunk < count and chunk_problem(array, chunk) is None:
            flags[chunk] = bool(array[chunk])
    return flags


def store_problems(root, attrs: StoreAttrs, check_bytes: bool = True) -> list[ChunkProblem]:
    """Every chunk that should be there (index arrays: all; task arrays: those of finished tasks) and is
    missing or, with `check_bytes`, damaged. Stores without chunk checksums: only the bytes are checked."""
    problems = []
    for split, summary in attrs.splits.items():
        group = root.group[split] if isinstance(root, CheckedGroup) else root[split]
        specs = split_array_specs(attrs.extractor, summary.num_images, summary.num_captions)
        done = {"images": done_flags(group, "images_done", specs["images_done"].shape[0])}
        if "captions_done" in specs:
            done["captions"] = done_flags(group, "captions_done", specs["captions_done"].shape[0])
        for name, spec in specs.items():
            if spec.written_by == "progress":
                continue
            array = group[name]
            count = -(-spec.shape[0] // spec.chunks[0])
            expected = done[spec.written_by] if spec.written_by in done else np.ones(count, bool)
            stored = stored_chunks(array)
            for chunk in np.flatnonzero(expected[:count]):
                exists = int(chunk) in stored
                if not exists and attrs.chunk_checksums:
                    problems.append(ChunkProblem(f"{split}/{name}", int(chunk), "missing"))
                elif exists and check_bytes and (problem := chunk_problem(array, int(chunk))):
                    problems.append(ChunkProblem(f"{split}/{name}", int(chunk), problem))
    return problems


def verify_store(path: str | Path) -> tuple[StoreAttrs, list[ChunkProblem]]:
    """`userpipe verify STORE`: every chunk that should be there, checked (crc32c, or decoded without one)."""
    root, attrs = open_store(path)
    return attrs, store_problems(root, attrs)


def store_summary(path: str | Path) -> dict:
    """The store as `userpipe info --json` reports it."""
    root, attrs = open_store(path)
    splits = {}
    for split, summary in attrs.splits.items():
        group = root[split]
        splits[split] = {
            **summary.model_dump(),
            "arrays": {
                name: {
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "chunks": list(arr.chunks),
                    **({"shards": list(arr.shards)} if arr.shards else {}),
                    "dims": list(arr.metadata.dimension_names or ()),
                }
                for name, arr in sorted(group.arrays())
            },
        }
    return {
        "path": str(path),
        "schema_version": attrs.schema_version,
        "complete": attrs.complete,
        "objects": stored_objects(attrs),  # files, or objects on an object store, once complete
        "splits": splits,
        "extractor": attrs.extractor.model_dump(mode="json"),
        "failures": [f.model_dump() for f in attrs.failures],
        # chunk files only listed, not read (userpipe verify reads them)
        "missing_chunks": [f"{p.array}[{p.chunk}]" for p in store_problems(root, attrs, check_bytes=False)],
    }
