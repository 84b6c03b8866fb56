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

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from schemas.base import Frozen, parse_json, read_model, validate_as
from schemas.errors import InputError, ManifestError
from schemas.store import ExtractorConfig

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


@dataclass
class ShardSample:
    meta: SampleMeta
    regions: np.ndarray
    boxes: np.ndarray
    captions: list[str]
    clip_image: np.ndarray | None = None
    clip_text: np.ndarray | None = None
    source: str | None = None  # the shard it was read from (set by decode_sample)


class HashingReader:
    """A binary file that hashes the bytes read through it; `finish()` hashes the rest and returns the digest.
    Reading a shard once gives its samples and its sha256 together (verify, and training's streaming
    check)."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        while data := self.file.read(1 << 22):
            self.digest.update(data)
        return self.digest.hexdigest()


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


def decode_sample(
    raw: dict, fields: tuple[str, ...] | None = None, feature_dim: int | None = None
) -> ShardSample:
    """From webdataset's raw dict (member name without the key -> bytes); checks the members (exactly
    `fields`, when given), every dtype and every size."""

    def array(name: str) -> np.ndarray | None:
        data = raw.get(name)
        if data is None:
            return None
        value = np.load(io.BytesIO(data), allow_pickle=False)
        if value.dtype != np.dtype(MEMBERS[name]):
            raise ValueError(f"{name} is {value.dtype}, not {MEMBERS[name]}")
        return value

    where = f"sample {raw.get('__key__')} in {raw.get('__url__', '?')}"
    members = {name for name in raw if not name.startswith("__")}
    unexpected = sorted(members - set(fields or MEMBERS))
    missing = sorted(set(fields or ()) - members)
    if unexpected or missing:
        raise SampleError(
            f"{where}: "
            f"{'unexpected member ' + unexpected[0] if unexpected else 'no ' + missing[0] + ' member'}"
        )
    try:
        meta = validate_as(SampleMeta, parse_json(raw["meta.json"], "meta.json"), "meta.json")
        captions = parse_json(raw["captions.json"], "captions.json")
        regions, boxes = array("regions.npy"), array("boxes.npy")
    except KeyError as exc:
        raise SampleError(f"{where}: no {exc.args[0]} member") from None
    except (InputError, ValueError, EOFError) as exc:
        raise SampleError(f"{where}: unreadable ({' '.join(str(exc).split())})") from None
    if regions is None or boxes is None:
        raise SampleError(f"{where}: no {'regions.npy' if regions is None else 'boxes.npy'} member")
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
            f"{where}: regions {regions.shape}, boxes {boxes.shape}, {len(captions)} captions "
            f"disagree with meta (num_regions={k}, num_captions={n})"
        )
    if feature_dim is not None and regions.shape[1] != feature_dim:
        raise SampleError(
            f"{where}: regions are {regions.shape[1]}-d, the manifest's store has {feature_dim}-d"
        )
    if sample.clip_text is not None and sample.clip_text.shape[0] != n:
        raise SampleError(f"{where}: clip_text has {sample.clip_text.shape[0]} rows for {n} captions")
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
