"""A shard's bytes (schemas/shard.py is the contract they follow): writing a sample, reading a tar and its
.npy members, and `check_shard`, the one check of a shard against its manifest record.

`userpipe shard` writes shards with it and checks those a rerun finds (pipeline/shard.py), `userpipe verify`
checks them, and the trainer's loader reads them (the one pipeline module it uses besides the extractor:
it reads what the pipeline writes). So a shard that differs from its record is found by the same checks,
in the same order, and reported in the same words by all three.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from userpipe.schemas.base import first_problem, parse_json
from userpipe.schemas.errors import InputError
from userpipe.schemas.shard import (
    MEMBER_DTYPES,
    MEMBERS,
    SampleError,
    SampleMeta,
    ShardError,
    ShardRecord,
    ShardSample,
    sample_key,
)
from userpipe.schemas.sources import is_remote, read_bytes

# --------------------------------------------------------------------------- tar


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


# --------------------------------------------------------------------------- .npy members


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


# --------------------------------------------------------------------------- samples


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


def decode_sample(
    raw: dict, fields: tuple[str, ...] | None = None, feature_dim: int | None = None
) -> ShardSample:
    """From webdataset's raw dict (member name without the key -> bytes); checks the members (exactly
    `fields`, when given), every dtype and every size."""
    _check_member_names(raw, fields)
    try:
        meta = SampleMeta.model_validate_json(bytes(raw["meta.json"]))  # one pass, in pydantic's parser
        captions = parse_json(raw["captions.json"], "captions.json")
        regions, boxes = _member_array(raw, "regions.npy"), _member_array(raw, "boxes.npy")
    except KeyError as exc:
        raise _refused(raw, f"no {exc.args[0]} member") from None
    except ValidationError as exc:
        raise _refused(raw, f"unreadable (meta.json: {first_problem(exc)})") from None
    except (InputError, ValueError, EOFError) as exc:
        raise _refused(raw, f"unreadable ({' '.join(str(exc).split())})") from None
    if regions is None or boxes is None:
        raise _refused(raw, f"no {'regions.npy' if regions is None else 'boxes.npy'} member")
    sample = ShardSample(
        meta,
        regions,
        boxes,
        captions,
        _member_array(raw, "clip_image.npy"),
        _member_array(raw, "clip_text.npy"),
        source=raw.get("__url__"),
    )
    problem = _shape_problem(sample, feature_dim)
    if problem is not None:
        raise _refused(raw, problem)
    return sample


def _refused(raw: dict, problem: str) -> SampleError:
    key = raw.get("__key__")
    return SampleError(f"sample {key} in {raw.get('__url__', '?')}: {problem}", key, problem)


def _check_member_names(raw: dict, fields: tuple[str, ...] | None) -> None:
    """Exactly the expected members (the common case, tested without building sets), or say which differs."""
    exact = len(raw) == len(fields or ()) + 2 and "__key__" in raw and "__url__" in raw
    if fields and exact and all(name in raw for name in fields):
        return
    members = {name for name in raw if not name.startswith("__")}
    unexpected = sorted(members - set(fields or MEMBERS))
    missing = sorted(set(fields or ()) - members)
    if unexpected or missing:
        raise _refused(raw, f"unexpected member {unexpected[0]}" if unexpected else f"no {missing[0]} member")


def _member_array(raw: dict, name: str) -> np.ndarray | None:
    data = raw.get(name)
    if data is None:
        return None
    value = load_npy(data)
    if value.dtype != MEMBER_DTYPES[name]:
        raise ValueError(f"{name} is {value.dtype}, not {MEMBER_DTYPES[name]}")
    return value


def _shape_problem(sample: ShardSample, feature_dim: int | None) -> str | None:
    """How a decoded sample's arrays disagree with its meta.json or the store's feature width, if they do."""
    regions, boxes, captions = sample.regions, sample.boxes, sample.captions
    k, n = sample.meta.num_regions, sample.meta.num_captions
    if regions.ndim != 2 or regions.shape[0] != k or boxes.shape != (k, 4) or len(captions) != n:
        return (
            f"regions {regions.shape}, boxes {boxes.shape}, {len(captions)} captions "
            f"disagree with meta (num_regions={k}, num_captions={n})"
        )
    if feature_dim is not None and regions.shape[1] != feature_dim:
        return f"regions are {regions.shape[1]}-d, the manifest's store has {feature_dim}-d"
    if sample.clip_text is not None and sample.clip_text.shape[0] != n:
        return f"clip_text has {sample.clip_text.shape[0]} rows for {n} captions"
    return None


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


# --------------------------------------------------------------------------- a shard against its record

VERIFY_HINT = "userpipe verify lists every damaged shard"


class ShardDamage(ShardError):
    """A shard that differs from its manifest record. `problem` says how, in the words every reader of shards
    uses: `userpipe verify` lists "NAME: PROBLEM", a rerun of `userpipe shard` prints that line before it
    writes the shard again, and the loader stops with (or, skipping damaged shards, warns of) the sentence
    "SHARD is|was|has an PROBLEM (userpipe verify lists every damaged shard)"."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)  # one argument: how a DataLoader worker's error is raised again
        self.problem = message if problem is None else problem

    @classmethod
    def of(cls, shard: str, verb: str, problem: str) -> ShardDamage:
        return cls(f"{shard} {verb + ' ' if verb else ''}{problem} ({VERIFY_HINT})", problem)


def check_shard_present(record: ShardRecord, shard: str, size: int | None = None) -> None:
    """What is known of a shard without reading it: present, at its record's size. A local file is
    stat'ed; `size` is what a server announced for a URL (nothing is checked for a URL without it). The
    loader checks every shard so before training starts; `check_shard` does it first for a local shard."""
    if size is None and not is_remote(shard):
        if not Path(shard).is_file():
            raise ShardDamage.of(shard, "is", "missing")
        size = Path(shard).stat().st_size
    if size is not None:
        _check_size(record, shard, size)


def _check_size(record: ShardRecord, shard: str, size: int) -> None:
    if size != record.bytes:
        verdict = "truncated" if size < record.bytes else "cut or altered"
        raise ShardDamage.of(shard, "was", f"{verdict}: {size:,} bytes, the manifest says {record.bytes:,}")


def check_shard(
    record: ShardRecord,
    shard: str,
    archive: bytes | memoryview | None = None,
    *,
    sha256: bool = True,
    trusted: bool = False,
    fields: tuple[str, ...] | None = None,
    feature_dim: int | None = None,
) -> list[ShardSample]:
    """The one check of a shard against its manifest record, for every reader (the loader, `userpipe
    verify`, a rerun of `userpipe shard`): present, its size, its sha256, every sample decoded (its members,
    exactly `fields` when given, their dtypes and shapes), then the sample and caption counts. Returns the
    samples (views of the shard's bytes); the first difference, in that order, raises ShardDamage.

    `shard` is where it is (a local path, a URL or a `pipe:` command) and how messages name it.
    `archive`: its bytes, when the caller has them (the loader maps a shard once per reading); without
    them a local shard is mapped here, so hashing it reads the file once, through the page cache.
    `sha256=False`: not hashed (the loader's check_sha256 off), and the tar headers' own checksums computed
    instead; `trusted`: it matched at an earlier reading (the loader's shared state), so neither.
    What is known without reading it (presence and size) is `check_shard_present`."""
    if archive is None:
        check_shard_present(record, shard)
        archive = read_bytes(shard, "a shard", ShardError, mapped=True)
    _check_size(record, shard, len(archive))
    if sha256 and not trusted and hashlib.sha256(archive).hexdigest() != record.sha256:
        raise ShardDamage.of(shard, "was", "altered: its sha256 differs from the manifest")
    samples: list[ShardSample] = []
    try:
        for raw in tar_samples(archive, shard, checksums=not sha256):
            samples.append(decode_sample(raw, fields or None, feature_dim))
    except SampleError as exc:
        raise ShardDamage.of(shard, "has an", f"invalid sample {exc.key}: {exc.problem}") from None
    except Exception as exc:  # noqa: BLE001 - tar and OS errors all mean "this shard is broken"
        why = f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
        raise ShardDamage.of(shard, "is", f"unreadable after {len(samples)} samples: {why}") from None
    captions = sum(len(sample.captions) for sample in samples)
    if (len(samples), captions) != (record.samples, record.captions):
        raise ShardDamage.of(
            shard,
            "",
            f"holds {len(samples)} samples and {captions} captions, "
            f"the manifest says {record.samples} and {record.captions}",
        )
    return samples
