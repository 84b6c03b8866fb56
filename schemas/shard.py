"""WebDataset shards: the contract between `userpipe shard` and the trainer's streaming loader.

A shard is a POSIX tar; one sample per image, its members sharing the key (the image's index in
its split, zero-padded). Members:

  regions.npy     (k, D) float16   region features, k = num_regions (no padding on disk)
  boxes.npy       (k, 4) float32   x1, y1, x2, y2 in pixels (NaN when the source had none)
  clip_image.npy  (C,)   float16   only when the store has global embeddings
  clip_text.npy   (n, C) float16   only when the store has caption embeddings
  captions.json   [n strings]
  meta.json       SampleMeta

Beside the shards, manifest.json (ShardManifest) and sizes.json ({shard name: samples}, as open_clip
reads it). `encode_sample` / `decode_sample` are the only code that knows the member layout.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from userpipe.schemas.base import Frozen, first_problem, parse_json, read_model, validate_as
from userpipe.schemas.errors import InputError, ManifestError
from userpipe.schemas.store import ExtractorConfig

SHARD_SCHEMA_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
KEY_DIGITS = 9


class SampleMeta(Frozen):
    image_id: str
    split: str
    index: int = Field(ge=0, description="row of the image in the store's split")
    file: str
    width: int
    height: int
    num_regions: int = Field(ge=0)
    num_captions: int = Field(ge=1)


class ShardRecord(Frozen):
    name: str
    samples: int = Field(ge=1)
    captions: int = Field(ge=1)
    bytes: int = Field(ge=0)
    sha256: str


class ShardPlanParams(Frozen):
    """What determines the shards' content; a rerun with equal params resumes."""

    source_store: str
    split: str
    store_config: ExtractorConfig
    seed: int
    max_count: int = Field(gt=0)
    max_size: int = Field(gt=0)


class ShardManifest(Frozen):
    schema_version: Literal["1.0"] = SHARD_SCHEMA_VERSION
    params: ShardPlanParams
    fields: tuple[str, ...] = Field(description="tar members present in every sample")
    shards: tuple[ShardRecord, ...]
    num_samples: int
    num_captions: int
    num_invalid_skipped: int = Field(description="invalid images in the store split, left out")


def read_manifest(location: str | Path) -> tuple[Path, ShardManifest]:
    """A shard folder or its manifest.json -> (manifest path, validated manifest)."""
    path = Path(location)
    path = path / MANIFEST_NAME if path.is_dir() else path
    return path, read_model(ShardManifest, path, "shard manifest", ManifestError)


def parse_manifest(data: bytes, source: str) -> ShardManifest:
    """A manifest's bytes read from elsewhere (a URL, a pipe), validated; `source` names it in errors."""
    try:
        return validate_as(ShardManifest, parse_json(data, source), f"{source} (shard manifest)")
    except InputError as exc:
        raise ManifestError(str(exc)) from None


@dataclass
class ShardSample:
    meta: SampleMeta
    regions: np.ndarray
    boxes: np.ndarray
    captions: list[str]
    clip_image: np.ndarray | None = None
    clip_text: np.ndarray | None = None
    source: str | None = None  # the shard it was read from (set by decode_sample)


class TarError(ValueError):
    """A shard that is not a complete POSIX tar; the message says where it stops making sense."""


BLOCK = 512
END_BLOCK = bytes(BLOCK)  # all zeros: the end of the archive


# name, size, checksum, type flag and ustar prefix of a 512-byte header, in one C call
HEADER_FIELDS = struct.Struct("100s24x12s12x8sc100x88x155s12x")
BLANK_CHECKSUM = bytes(8)


def _tar_number(field: bytes) -> int:
    try:
        return int(field.rstrip(b"\0"), 8)  # octal digits, NUL- or space-terminated (int() strips spaces)
    except ValueError:
        if field[0] & 0x80:  # base-256, for sizes past 8 GiB
            return int.from_bytes(field[1:], "big")
        text = field.strip(b"\0 ")
        return int(text, 8) if text else 0


def _checksum_matches(header: bytes | memoryview, field: bytes) -> bool:
    """ustar's checksum: the header's byte sum with its own 8-byte field counted as spaces. Compared modulo
    65521, as zlib's Adler-32 gives it in C (its low half is 1 + the byte sum mod 65521): no change of one
    byte (at most ±255) hides in that, and Python's sum() over 512 bytes cost more than the rest of a
    header."""
    expected = _tar_number(field) - 8 * ord(" ") + sum(field)
    return (1 + expected) % 65521 == zlib.adler32(header) & 0xFFFF


def _pax_records(data: bytes) -> dict[str, str]:
    """`LENGTH key=value\n` records (POSIX.1-2001): only path and size matter for reading (webdataset's
    TarWriter writes one pax header per member, holding only mtime)."""
    if b" path=" not in data and b" size=" not in data:
        return {}
    records, at = {}, 0
    while at < len(data):
        length = int(data[at : data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1 : at + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        at += length
    return records


def tar_members(
    archive: bytes | memoryview, checksums: bool = True
) -> Iterator[tuple[str, bytes | memoryview]]:
    """(name, data) of every regular file in a whole tar archive, in order: ustar, pax and GNU long names,
    each header's checksum checked unless `checksums` is off (the reader already matched the archive's
    sha256: a whole-archive check leaves nothing for the headers' own to find). The data are slices of
    `archive`: views, without a copy, when it is a memoryview (of a mapped shard file). Python's tarfile
    spends ~0.3 ms of pure-Python header parsing per member, and reading a stream member by member costs
    a call per header, member and padding; a sample has 6 members, and the loader reads each shard once
    per pass (bench/results/loader_throughput.md)."""
    extended: dict[str, str] = {}
    at, total = 0, len(archive)
    while True:
        if at + BLOCK > total:
            raise TarError(f"cut short in a header ({total - at} of {BLOCK} bytes; no end-of-archive block)")
        name, size_field, checksum, kind, prefix = HEADER_FIELDS.unpack_from(archive, at)
        if checksum == BLANK_CHECKSUM and archive[at : at + BLOCK] == END_BLOCK:
            return
        if checksums and not _checksum_matches(archive[at : at + BLOCK], checksum):
            raise TarError("a header's checksum is wrong")
        size = int(extended["size"]) if "size" in extended else _tar_number(size_field)
        at += BLOCK
        end = at + size
        if end > total:
            raise TarError(f"cut short in a member of {size} bytes ({total - at} of {size} bytes)")
        data, at = archive[at:end], end + -size % BLOCK
        if at > total:
            raise TarError(f"cut short in padding ({total - end} of {-size % BLOCK} bytes)")
        if kind == b"x":
            extended = _pax_records(bytes(data))
        elif kind == b"L":
            extended = {"path": bytes(data).rstrip(b"\0").decode()}
        elif kind != b"g":
            path = extended.get("path")
            if path is None:
                name, prefix = name.rstrip(b"\0"), prefix.rstrip(b"\0")
                path = (prefix + b"/" + name if prefix else name).decode()
            extended = {}
            if kind in (b"0", b"\0", b"7"):
                yield path, data


def tar_samples(archive: bytes | memoryview, url: str, checksums: bool = True) -> Iterator[dict]:
    """Members grouped into samples as webdataset groups them (key = the path up to the first dot of its
    file name): {"__key__", "__url__", member suffix: bytes}; a key seen again later is a new sample."""
    sample: dict = {}
    for path, data in tar_members(archive, checksums):
        folder, _, name = path.rpartition("/")
        stem, dot, suffix = name.partition(".")
        if not dot:
            continue  # no suffix: not part of a sample
        key = f"{folder}/{stem}" if folder else stem
        if sample and (key != sample["__key__"] or suffix in sample):
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": url}
        sample[suffix] = data
    if sample:
        yield sample


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(sample: ShardSample) -> dict[str, bytes | str]:
    encoded: dict[str, bytes | str] = {
        "__key__": sample_key(sample.meta.index),
        "regions.npy": _npy(sample.regions.astype(np.float16)),
        "boxes.npy": _npy(sample.boxes.astype(np.float32)),
        "captions.json": json.dumps(sample.captions, ensure_ascii=False).encode(),
        "meta.json": sample.meta.model_dump_json().encode(),
    }
    if sample.clip_image is not None:
        encoded["clip_image.npy"] = _npy(sample.clip_image.astype(np.float16))
    if sample.clip_text is not None:
        encoded["clip_text.npy"] = _npy(sample.clip_text.astype(np.float16))
    return encoded


class SampleError(InputError):
    """A shard sample whose members are missing, unreadable or disagree; the message names it."""


MEMBERS = {
    "regions.npy": "float16",
    "boxes.npy": "float32",
    "clip_image.npy": "float16",
    "clip_text.npy": "float16",
    "captions.json": None,
    "meta.json": None,
}  # member -> dtype of its array
MEMBER_DTYPES = {name: np.dtype(dtype) for name, dtype in MEMBERS.items() if dtype is not None}


NPY_HEADER = re.compile(
    rb"\{'descr': '([<|]\w\d+)', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)


NPY_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0, what np.save writes for small headers


@functools.lru_cache(maxsize=1024)  # a shard repeats a few headers (one per member kind and region count)
def _npy_layout(head: bytes) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, data offset, data bytes) from the header `np.save` writes for a C-order array."""
    if head[:8] == NPY_MAGIC and (match := NPY_HEADER.fullmatch(head[10:])):
        dtype = np.dtype(match[1].decode())
        shape = tuple(int(n) for n in match[2].split(b",") if n.strip())
        return dtype, shape, len(head), dtype.itemsize * math.prod(shape)
    return None


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """An array from .npy bytes, read-only. The C-order header `np.save` writes is matched by one regex,
    once per distinct header, and the data viewed in place; np.load parses every header as Python source
    (~0.1 ms), which the loader would pay for 4 arrays of every sample of every pass. Anything else goes to
    np.load."""
    if len(data) >= 10 and (layout := _npy_layout(bytes(data[: 10 + (data[8] | data[9] << 8)]))):
        dtype, shape, offset, nbytes = layout
        if len(data) - offset == nbytes:
            return np.ndarray(shape, dtype, buffer=data, offset=offset)
        raise ValueError(f"the array holds {len(data) - offset} bytes, its header says shape {shape}")
    value = np.load(io.BytesIO(data), allow_pickle=False)
    value.flags.writeable = False
    return value


def decode_sample(
    raw: dict, fields: tuple[str, ...] | None = None, feature_dim: int | None = None
) -> ShardSample:
    """From webdataset's raw dict (member name without the key -> bytes); checks the members (exactly
    `fields`, when given), every dtype and every size."""

    def array(name: str) -> np.ndarray | None:
        data = raw.get(name)
        if data is None:
            return None
        value = load_npy(data)
        if value.dtype != MEMBER_DTYPES[name]:
            raise ValueError(f"{name} is {value.dtype}, not {MEMBER_DTYPES[name]}")
        return value

    def where() -> str:
        return f"sample {raw.get('__key__')} in {raw.get('__url__', '?')}"

    # exactly the expected members (the common case, tested without building sets), or say which differs
    exact = len(raw) == len(fields or ()) + 2 and "__key__" in raw and "__url__" in raw
    if not (fields and exact and all(name in raw for name in fields)):
        members = {name for name in raw if not name.startswith("__")}
        unexpected = sorted(members - set(fields or MEMBERS))
        missing = sorted(set(fields or ()) - members)
        if unexpected or missing:
            raise SampleError(
                f"{where()}: "
                f"{'unexpected member ' + unexpected[0] if unexpected else 'no ' + missing[0] + ' member'}"
            )
    try:
        meta = SampleMeta.model_validate_json(bytes(raw["meta.json"]))  # one pass, in pydantic's parser
        captions = parse_json(raw["captions.json"], "captions.json")
        regions, boxes = array("regions.npy"), array("boxes.npy")
    except KeyError as exc:
        raise SampleError(f"{where()}: no {exc.args[0]} member") from None
    except ValidationError as exc:
        raise SampleError(f"{where()}: unreadable (meta.json: {first_problem(exc)})") from None
    except (InputError, ValueError, EOFError) as exc:
        raise SampleError(f"{where()}: unreadable ({' '.join(str(exc).split())})") from None
    if regions is None or boxes is None:
        raise SampleError(f"{where()}: no {'regions.npy' if regions is None else 'boxes.npy'} member")
    sample = ShardSample(
        meta,
        regions,
        boxes,
        captions,
        array("clip_image.npy"),
        array("clip_text.npy"),
        source=raw.get("__url__"),
    )
    k, n = meta.num_regions, meta.num_captions
    if regions.ndim != 2 or regions.shape[0] != k or boxes.shape != (k, 4) or len(captions) != n:
        raise SampleError(
            f"{where()}: regions {regions.shape}, boxes {boxes.shape}, {len(captions)} captions "
            f"disagree with meta (num_regions={k}, num_captions={n})"
        )
    if feature_dim is not None and regions.shape[1] != feature_dim:
        raise SampleError(
            f"{where()}: regions are {regions.shape[1]}-d, the manifest's store has {feature_dim}-d"
        )
    if sample.clip_text is not None and sample.clip_text.shape[0] != n:
        raise SampleError(f"{where()}: clip_text has {sample.clip_text.shape[0]} rows for {n} captions")
    return sample


def encoded_size(
    num_regions: int,
    feature_dim: int,
    num_captions: int,
    clip_dim: int | None,
    with_text: bool,
    text_bytes: int,
) -> int:
    """Tar bytes of one encoded sample (512-byte header + padded body per member), for shard roll-over."""
    npy_header = 128

    def member(body: int) -> int:
        return 512 + -(-body // 512) * 512

    size = member(npy_header + num_regions * feature_dim * 2) + member(npy_header + num_regions * 16)
    size += member(text_bytes + 4 * num_captions + 2) + member(400)
    if clip_dim:
        size += member(npy_header + clip_dim * 2)
        if with_text:
            size += member(npy_header + num_captions * clip_dim * 2)
    return size
