"""Dataset readers: the Karpathy split JSON (COCO, Flickr30K, custom) as an index of images and captions.

The index is what every extractor works from: per split, an ordered list of images, each with its
id, its file (relative to the image root) and its captions. Nothing here opens an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from userpipe.schemas.base import file_sha256, first_problem, parse_json
from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import read_bytes
from userpipe.schemas.store import SPLITS

# Karpathy split names -> store split names; restval joins train by convention (VSE++, SCAN).
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
PAPER_CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class NamedDataset:
    json_name: str
    image_dir: str  # conventional image folder under the root
    uses_filepath: bool  # COCO records carry the train2014/val2014 subfolder in "filepath"
    max_captions: int | None


NAMED_DATASETS = {
    "coco": NamedDataset("dataset_coco.json", "images", True, PAPER_CAPTIONS_PER_IMAGE),
    "f30k": NamedDataset("dataset_flickr30k.json", "flickr30k-images", False, PAPER_CAPTIONS_PER_IMAGE),
}


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    file: str  # relative to DatasetIndex.image_root; "" when the dataset has no images (imported features)
    captions: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    imgid: int | None = None  # Karpathy imgid, which SCAN's Flickr30K precomp files use as id


@dataclass
class DatasetIndex:
    name: str
    image_root: Path | None
    splits: dict[str, list[ImageRecord]]
    max_captions: int | None
    sha256: str | None = None
    has_boxes: bool = False
    notes: list[str] = field(default_factory=list)

    def select(self, splits: tuple[str, ...]) -> DatasetIndex:
        missing = [s for s in splits if not self.splits.get(s)]
        if missing:
            have = ", ".join(s for s in SPLITS if self.splits.get(s)) or "none"
            raise InputError(
                f"dataset '{self.name}' has no images in split(s) {', '.join(missing)} (it has: {have})"
            )
        self.splits = {s: self.splits[s] for s in splits}
        return self


def parse_splits(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise InputError(
            f"unknown split name(s) {', '.join(bad) or repr(text)}; choose from {', '.join(SPLITS)}"
        )
    return names


class KarpathySentence(BaseModel):
    model_config = ConfigDict(extra="allow")
    raw: str | None = None
    tokens: list[str] | None = None

    def text(self) -> str:
        """The caption with whitespace normalised; `tokens` joined when there is no `raw`."""
        return " ".join((self.raw if self.raw is not None else " ".join(self.tokens or ())).split())


class KarpathyRecord(BaseModel):
    """One image of a Karpathy split file, typed: the fields userpipe reads (others are kept, unread)."""

    model_config = ConfigDict(extra="allow")
    filename: str = Field(min_length=1)
    split: str
    sentences: list[KarpathySentence] = []
    filepath: str = ""
    cocoid: int | str | None = None
    imgid: int | None = None
    boxes: list[tuple[float, float, float, float]] | None = None

    def image_id(self) -> str:
        return str(self.cocoid) if self.cocoid is not None else Path(self.filename).stem


def _typed_record(json_path: Path, position: int, record) -> KarpathyRecord:
    try:
        return KarpathyRecord.model_validate(record)
    except ValidationError as exc:
        name = record.get("filename") if isinstance(record, dict) else None
        which = f"image record {position}" + (f" ({name})" if isinstance(name, str) else "")
        raise InputError(f"{json_path}: {which}: {first_problem(exc)}") from None


def read_karpathy_json(
    json_path: Path, *, name: str, image_root: Path, uses_filepath: bool, max_captions: int | None
) -> DatasetIndex:
    """Parse a Karpathy-format split file. `max_captions` set: keep the first that many, fewer is an error."""
    if not json_path.is_file():
        raise InputError(f"dataset file not found: {json_path}")
    data = parse_json(read_bytes(json_path, "the dataset file"), json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{json_path} is not a Karpathy split file (no top-level 'images' list)")

    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    has_boxes = True
    for position, raw_record in enumerate(data["images"]):
        record = _typed_record(json_path, position, raw_record)
        image_id = record.image_id()
        if record.split not in KARPATHY_SPLITS:
            raise InputError(
                f"{json_path}: image {image_id} has unknown split '{record.split}' "
                f"(expected one of {', '.join(KARPATHY_SPLITS)})"
            )
        if image_id in seen:
            raise InputError(f"{json_path}: image id {image_id} appears more than once")
        seen.add(image_id)
        captions = tuple(s.text() for s in record.sentences)
        if max_captions is not None:
            if len(captions) < max_captions:
                raise InputError(
                    f"{json_path}: image {image_id} ({record.filename}) has {len(captions)} captions, "
                    f"{name} needs {max_captions}"
                )
            captions = captions[:max_captions]
        elif not captions:
            raise InputError(f"{json_path}: image {image_id} ({record.filename}) has no captions")
        check_captions(captions, f"{json_path}: image {image_id} ({record.filename})")
        boxes = tuple(record.boxes) if record.boxes is not None else None
        if boxes is not None and any(
            not all(map(math.isfinite, b)) or b[2] <= b[0] or b[3] <= b[1] for b in boxes
        ):
            raise InputError(f"{json_path}: image {image_id} has a box that is not [x1, y1, x2, y2]")
        has_boxes = has_boxes and boxes is not None
        folder = record.filepath if uses_filepath else ""
        splits[KARPATHY_SPLITS[record.split]].append(
            ImageRecord(
                image_id=image_id,
                file=str(Path(folder) / record.filename),
                captions=captions,
                boxes=boxes,
                imgid=record.imgid,
            )
        )
    return DatasetIndex(
        name=name,
        image_root=image_root,
        splits=splits,
        max_captions=max_captions,
        sha256=file_sha256(json_path),
        has_boxes=has_boxes and bool(data["images"]),
    )


def check_captions(captions, where: str) -> None:
    """Empty captions are refused, not dropped: dropping one would shift every later caption's image
    (five per image is what the COCO/F30K protocols count on), and an empty query retrieves noise."""
    empty = [k for k, c in enumerate(captions) if not c]
    if empty:
        raise InputError(f"{where}: caption {empty[0]} is empty ({len(empty)} empty in all)")


def load_dataset(dataset: str, root: Path | None) -> DatasetIndex:
    """`coco`, `f30k` (conventional layout under `root`, default data/NAME) or a path to a Karpathy JSON."""
    if dataset in NAMED_DATASETS:
        spec = NAMED_DATASETS[dataset]
        root = root or Path("data") / dataset
        image_root = root / spec.image_dir
        index = read_karpathy_json(
            root / spec.json_name,
            name=dataset,
            image_root=image_root,
            uses_filepath=spec.uses_filepath,
            max_captions=spec.max_captions,
        )
        if not image_root.is_dir():
            raise InputError(f"image folder not found: {image_root} (expected the {dataset} images there)")
        return index
    path = Path(dataset)
    if path.suffix.lower() != ".json":
        raise InputError(
            f"unknown dataset '{dataset}': use coco, f30k, demo, or a path to a Karpathy-format .json"
        )
    image_root = root or path.parent
    index = read_karpathy_json(
        path, name=dataset, image_root=image_root, uses_filepath=True, max_captions=None
    )
    if not image_root.is_dir():
        raise InputError(f"image folder not found: {image_root}")
    return index


def check_image_folders(index: DatasetIndex) -> None:
    """Each distinct image folder the selected splits use must exist (single missing files are
    per-image failures)."""
    assert index.image_root is not None
    folders = {str(Path(r.file).parent) for records in index.splits.values() for r in records}
    for folder in sorted(folders):
        if not (index.image_root / folder).is_dir():
            raise InputError(f"image folder not found: {index.image_root / folder}")
