"""The feature store: the contract between `userpipe extract` and every later stage.

A store is one Zarr v3 group. Each split is a subgroup holding per-image and per-caption arrays
whose names, dimensions, dtypes and chunking are fixed here; the extractor configuration and the
run summary live in the root group's attributes under the key ``userpipe``. Readers validate
both before use (`validate_store`), writers create arrays only through `split_array_specs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from userpipe.schemas.base import Frozen
from userpipe.schemas.errors import InputError

# the store's sizes, shared with `userpipe extract`'s options: 1000 slots is 10x the released adaptive
# butd-vg's 100; a chunk of 4096 COCO images is 600 MB of regions in one task's memory
RegionSlots = Annotated[int, Field(gt=0, le=1000)]
ImageSide = Annotated[int, Field(ge=16, le=8192)]
ChunkImages = Annotated[int, Field(gt=0, le=4096)]

# 1.1 adds the butd-vg region kind and per-box detection arrays (DETECTION_ARRAYS), from butd-vg or from
# imported files that hold them; 1.2 writes the per-image arrays of more than one value as shards of one
# chunk per image (`ArraySpec.inner`). Older stores are read as they are.
STORE_SCHEMA_VERSION = "1.2"
READABLE_STORE_VERSIONS = ("1.0", "1.1", "1.2")
ATTRS_KEY = "userpipe"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class StoredRegions:
    """What a store's RegionConfig holds for one kind of regions: the contract every reader of a store
    relies on. The kind's code (its options, how it resolves and builds) is one module of
    userpipe/pipeline/region_kinds/."""

    imported: bool = False  # read from feature files (`source`), not computed from the images
    backbone: bool = False  # a feature backbone and its weights
    detector: bool = False
    detector_config: bool = False  # a detectron2 config file (the merged config's hash)
    min_regions: bool = False  # an adaptive box count
    detections: Literal["never", "always", "imported"] = "never"  # imported: when the files hold them


REGION_KINDS = {
    "butd-vg": StoredRegions(detector=True, detector_config=True, min_regions=True, detections="always"),
    "butd": StoredRegions(backbone=True, detector=True),
    "boxes": StoredRegions(backbone=True),
    "grid": StoredRegions(backbone=True),
    "precomp": StoredRegions(imported=True),
    "tsv": StoredRegions(imported=True, detections="imported"),
    "npz": StoredRegions(imported=True, detections="imported"),
}
# per box, from detectors that classify their boxes (butd-vg, or imported): name -> dtype
DETECTION_ARRAYS = {
    "object_id": "int16",
    "object_conf": "float16",
    "attribute_id": "int16",
    "attribute_conf": "float16",
}


class WeightsRef(Frozen):
    """A weights file as it was used: where it came from and its content hash."""

    source: str = Field(description="pretrained tag, package name or path as the user gave it")
    path: str | None = Field(default=None, description="resolved local file")
    sha256: str | None = None


class RegionConfig(Frozen):
    kind: str = Field(description="a kind of REGION_KINDS")
    source: str | None = Field(default=None, description="importer location (DIR or GLOB)")
    backbone: str | None = Field(default=None, description="feature backbone for computed regions")
    backbone_weights: WeightsRef | None = None
    detector: str | None = None
    detector_weights: WeightsRef | None = None
    detector_config: WeightsRef | None = Field(
        default=None,
        description="butd-vg: the detectron2 config file (packaged name or path); sha256 of the merged "
        "config, its _BASE_ files included",
    )
    min_regions: int | None = Field(
        default=None, gt=0, description="butd-vg: fewest boxes kept per image (None: exactly num_regions)"
    )
    imported_detections: bool = Field(
        default=False,
        description="tsv/npz: the source holds each box's object and attribute (LXMERT TSV fields, MILVLG "
        "npz info), kept in the detection arrays",
    )

    @model_validator(mode="after")
    def _holds_what_its_kind_stores(self) -> RegionConfig:
        if self.kind not in REGION_KINDS:
            raise ValueError(f"unknown region kind '{self.kind}' (known: {', '.join(REGION_KINDS)})")
        stored = self.stored
        if stored.imported and self.source is None:
            raise ValueError(f"region importer '{self.kind}' needs a source location")
        for field in ("backbone", "detector", "detector_config"):
            needed = getattr(stored, field)
            if needed != (getattr(self, field) is not None):
                raise ValueError(f"'{self.kind}' regions {'need' if needed else 'have no'} {field}")
        if self.min_regions is not None and not stored.min_regions:
            raise ValueError(f"min_regions does not apply to '{self.kind}' regions")
        if self.imported_detections and stored.detections != "imported":
            raise ValueError(f"imported_detections does not apply to '{self.kind}' regions")
        return self

    @property
    def stored(self) -> StoredRegions:
        return REGION_KINDS[self.kind]

    @property
    def has_detections(self) -> bool:
        return self.stored.detections == "always" or self.imported_detections


class GlobalConfig(Frozen):
    """The whole-image (and caption) global encoder: open_clip, an ImageNet backbone, or none."""

    kind: Literal["open_clip", "imagenet", "none"]
    model: str | None = None
    model_config_file: str | None = Field(
        default=None, description="open_clip model-config .json, if not built in"
    )
    weights: WeightsRef | None = None
    image_dim: int | None = None
    text_dim: int | None = Field(default=None, description="None when the encoder has no text tower")

    @model_validator(mode="after")
    def _dims_match_kind(self) -> GlobalConfig:
        if self.kind == "none" and (self.image_dim or self.text_dim):
            raise ValueError("global encoder 'none' has no embedding dims")
        if self.kind != "none" and not self.image_dim:
            raise ValueError(f"global encoder '{self.kind}' needs image_dim")
        return self


class ExtractorConfig(Frozen):
    """Everything that determines the store's content. A rerun with an equal config resumes."""

    dataset: str = Field(description="dataset name or Karpathy JSON path as given")
    dataset_sha256: str | None = Field(default=None, description="hash of the dataset's index file(s)")
    splits: tuple[str, ...]
    max_captions: int | None = Field(description="captions kept per image (5 for coco/f30k); None keeps all")
    num_regions: RegionSlots = Field(description="R: region slots per image (butd-vg: the most boxes kept)")
    feature_dim: int = Field(gt=0)
    image_size: ImageSide = Field(description="shorter image side fed to the region backbone")
    chunk_size: ChunkImages = Field(description="images per Zarr chunk and per Dask task")
    regions: RegionConfig
    global_encoder: GlobalConfig

    @model_validator(mode="after")
    def _known_splits(self) -> ExtractorConfig:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {self.splits}")
        if (self.regions.min_regions or 0) > self.num_regions:
            raise ValueError(f"min_regions {self.regions.min_regions} exceeds num_regions {self.num_regions}")
        return self


class Failure(Frozen):
    split: str
    index: int
    image_id: str
    file: str
    error: str


class SplitSummary(Frozen):
    num_images: int = Field(ge=0)
    num_captions: int = Field(ge=0)
    num_invalid: int = Field(default=0, ge=0)


class StoreAttrs(Frozen):
    schema_version: Literal["1.0", "1.1", "1.2"] = STORE_SCHEMA_VERSION
    extractor: ExtractorConfig
    splits: dict[str, SplitSummary]
    complete: bool = False
    failures: tuple[Failure, ...] = ()
    image_root: str | None = Field(
        default=None,
        description="absolute folder the 'file' paths were relative to "
        "at extraction (None: no images, or an older store)",
    )
    chunk_checksums: bool = Field(
        default=False,
        description="every chunk is written (empty ones too) with a "
        "crc32c, so a missing or altered chunk is detected (False: an older store)",
    )


class ArraySpec(Frozen):
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # the stored objects' shape: Zarr chunks, or shards when `inner` is set
    inner: tuple[int, ...] | None = None  # sharded (1.2): the chunks inside each shard, read one by one
    dtype: str  # a numpy dtype name, or "str" for variable-length UTF-8
    # who writes its chunks: the store's creation (from the dataset index), an image task, a caption task,
    # or the tasks' done-flags (a flag chunk exists once its task has finished)
    written_by: Literal["index", "images", "captions", "progress"]


# Chunking: image arrays are chunked `chunk_size` images at a time along the image axis and whole
# along the others, so a split scan (sharding, evaluation) reads each chunk once, sequentially, and
# each extraction task owns its chunks (no two processes ever write the same chunk). The per-region arrays
# and the CLIP globals (1.2) are Zarr v3 shards of `chunk_size` images holding one chunk per image: the
# same objects, each written whole by its task, and any one image read alone (a range of its shard).
CAPTIONS_PER_CHUNK_FACTOR = 5


def caption_chunk_size(config: ExtractorConfig) -> int:
    return config.chunk_size * CAPTIONS_PER_CHUNK_FACTOR


def num_chunks(length: int, chunk: int) -> int:
    return max(1, -(-length // chunk))


def split_array_specs(config: ExtractorConfig, num_images: int, num_captions: int) -> dict[str, ArraySpec]:
    n, m, r, d = num_images, num_captions, config.num_regions, config.feature_dim
    c, cc = config.chunk_size, caption_chunk_size(config)

    def image(name_dims: tuple[str, ...], tail: tuple[int, ...], dtype: str, by: str = "images") -> ArraySpec:
        return ArraySpec(
            dims=("image", *name_dims),
            shape=(n, *tail),
            chunks=(c, *tail),
            inner=(1, *tail) if tail else None,  # an image's regions, boxes or global: sharded
            dtype=dtype,
            written_by=by,
        )

    def caption(
        name_dims: tuple[str, ...], tail: tuple[int, ...], dtype: str, by: str = "captions"
    ) -> ArraySpec:
        return ArraySpec(
            dims=("caption", *name_dims), shape=(m, *tail), chunks=(cc, *tail), dtype=dtype, written_by=by
        )

    def progress(dim: str, length: int) -> ArraySpec:  # one done-flag per chunk, one Zarr chunk each
        return ArraySpec(
            dims=(dim,),
            shape=(num_chunks(length, c if dim == "image_chunk" else cc),),
            chunks=(1,),
            dtype="bool",
            written_by="progress",
        )

    specs = {
        "image_id": image((), (), "str", "index"),
        "file": image((), (), "str", "index"),
        "width": image((), (), "int32"),
        "height": image((), (), "int32"),
        "regions": image(("region", "feature"), (r, d), "float16"),
        "boxes": image(("region", "coord"), (r, 4), "float32"),
        "num_regions": image((), (), "int16"),
        "valid": image((), (), "bool"),
        "error": image((), (), "str"),
        "caption_text": caption((), (), "str", "index"),
        "caption_image": caption((), (), "int32", "index"),
        "images_done": progress("image_chunk", n),
    }
    if config.regions.has_detections:
        specs |= {name: image(("region",), (r,), dtype) for name, dtype in DETECTION_ARRAYS.items()}
    g = config.global_encoder
    if g.image_dim:
        specs["clip_image"] = image(("clip_dim",), (g.image_dim,), "float16")
    if g.text_dim:
        specs["clip_text"] = caption(("clip_dim",), (g.text_dim,), "float16")
        specs["captions_done"] = progress("caption_chunk", m)
    return specs


def stored_objects(attrs: StoreAttrs) -> int:
    """The files (objects, on an object store) a complete store of `attrs` consists of: every chunk or shard
    of every array, one per done-flag, and the metadata documents (root, split groups, arrays)."""
    count = 1
    for summary in attrs.splits.values():
        specs = split_array_specs(attrs.extractor, summary.num_images, summary.num_captions)
        count += 1 + len(specs) + sum(num_chunks(spec.shape[0], spec.chunks[0]) for spec in specs.values())
    return count


class StoreValidationError(InputError):
    pass


def validate_store(root) -> StoreAttrs:
    """Check a zarr group against this schema; return its parsed attributes.

    `root` is a `zarr.Group`. Raises StoreValidationError naming the first problem.
    """
    raw = root.attrs.get(ATTRS_KEY)
    if raw is None:
        raise StoreValidationError(f"not a userpipe store (no '{ATTRS_KEY}' attributes)")
    version = raw.get("schema_version")
    if version not in READABLE_STORE_VERSIONS:
        raise StoreValidationError(
            f"store schema version {version!r} is not supported "
            f"(this userpipe reads {', '.join(READABLE_STORE_VERSIONS)})"
        )
    try:
        attrs = StoreAttrs.model_validate(raw)
    except ValueError as exc:
        raise StoreValidationError(f"store attributes are invalid: {exc}") from exc
    for split, summary in attrs.splits.items():
        if split not in root:
            raise StoreValidationError(f"split group '{split}' is missing")
        group = root[split]
        for name, spec in split_array_specs(
            attrs.extractor, summary.num_images, summary.num_captions
        ).items():
            if name not in group:
                raise StoreValidationError(f"array '{split}/{name}' is missing")
            arr = group[name]
            if tuple(arr.shape) != spec.shape:
                raise StoreValidationError(
                    f"array '{split}/{name}' has shape {arr.shape}, expected {spec.shape}"
                )
            if not dtype_matches(arr.dtype, spec.dtype):
                raise StoreValidationError(
                    f"array '{split}/{name}' has dtype {arr.dtype}, expected {spec.dtype}"
                )
            dims = tuple(arr.metadata.dimension_names or ())
            if dims != spec.dims:
                raise StoreValidationError(f"array '{split}/{name}' has dims {dims}, expected {spec.dims}")
    return attrs


def dtype_matches(actual, expected: str) -> bool:
    if expected == "str":
        return np.dtype(actual).kind in ("T", "O", "U")
    return np.dtype(actual) == np.dtype(expected)
