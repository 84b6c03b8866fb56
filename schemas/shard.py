"""WebDataset shards: the contract between `userpipe shard` and the trainer's streaming loader: the manifest
models (manifest.json, sizes.json), the sample and its members, the names and the errors. The bytes are
read and written by `userpipe.pipeline.shard_io` (tar and .npy parsing, `encode_sample` /
`decode_sample`, and `check_shard`, the one check of a shard against its manifest record). The layout:
docs/reference.md and docs/architecture.md, "`userpipe shard`".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from userpipe.schemas.base import Frozen, parse_json, read_model, validate_as
from userpipe.schemas.errors import InputError, ManifestError
from userpipe.schemas.sources import joined, location
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


def read_manifest(folder: str | Path) -> tuple[str | Path, ShardManifest]:
    """A shard folder (or one at an object-store URL) or its manifest.json -> (manifest's path, validated
    manifest)."""
    path = location(folder)
    if isinstance(path, Path) and path.is_dir() or isinstance(path, str) and not path.endswith(".json"):
        path = joined(path, MANIFEST_NAME)
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


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


MEMBERS = {
    "regions.npy": "float16",
    "boxes.npy": "float32",
    "clip_image.npy": "float16",
    "clip_text.npy": "float16",
    "captions.json": None,
    "meta.json": None,
}  # member -> dtype of its array
MEMBER_DTYPES = {name: np.dtype(dtype) for name, dtype in MEMBERS.items() if dtype is not None}


class ShardError(InputError):
    """A shard could not be read completely; the message names it."""


class SampleError(InputError):
    """A shard sample whose members are missing, unreadable or disagree: "sample KEY in SHARD: PROBLEM"."""

    def __init__(self, message: str, key: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.key, self.problem = key, message if problem is None else problem
