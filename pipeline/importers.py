"""Importers for region features users already have (`--regions precomp:DIR`, `tsv:GLOB`, `npz:DIR`), read
lazily and checked before use. Each yields, per dataset image, a small picklable reference (`ref`) that
a worker turns into features with `read_imported`. The formats: docs/reference.md, "`userpipe extract`";
how they are read: docs/architecture.md, "`userpipe extract`".
"""

from __future__ import annotations

import base64
import binascii
import codecs
import glob
import hashlib
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from userpipe.pipeline.array_pickle import load_arrays
from userpipe.pipeline.datasets import (
    NAMED_DATASETS,
    DatasetIndex,
    ImageRecord,
    check_captions,
    read_karpathy_json,
)
from userpipe.pipeline.detections import DETECTION_FIELDS, Detections
from userpipe.schemas.base import file_sha256
from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import decode_text, read_text

# SCAN split files for each store split, first found wins (COCO's 5K test is "testall").
PRECOMP_SPLIT_FILES = {"train": ("train",), "val": ("dev",), "test": ("testall", "test")}
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class ImportedRegions:
    features: np.ndarray  # (k, D) float32
    boxes: np.ndarray | None  # (k, 4) x1, y1, x2, y2 pixels; None when the source has no boxes
    width: int  # 0 when unknown
    height: int
    detections: Detections | None = None  # when the source holds them


@dataclass
class ImportPlan:
    """What an importer contributes before extraction: the feature width and one ref per image."""

    feature_dim: int
    refs: dict[str, list]  # split -> per-image ref (None: this image has no features in the source)
    detections: bool = False  # the source holds each box's object and attribute


# --------------------------------------------------------------------------- precomp (SCAN)


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the header at a .npy stream's start (ValueError: no header)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, read from its header only."""
    with open(path, "rb") as f:
        try:
            shape, fortran, dtype = read_npy_header(f)
        except ValueError as exc:
            raise InputError(f"{path} is not a .npy file: {exc}") from None
        if fortran:
            raise InputError(f"{path} is Fortran-ordered; save it C-ordered")
        return shape, dtype, f.tell()


def checked_npy(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype, offset = npy_header(path)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(
            f"{path} is {'truncated' if actual < expected else 'longer than its header says'}: header says "
            f"{shape} {dtype} = {expected:,} bytes, the file has {actual:,}"
        )
    if len(shape) != 3 or dtype.kind != "f":
        raise InputError(
            f"{path} holds {shape} {dtype}; region features must be float (images, regions, dim)"
        )
    return shape, dtype


def _read_lines(path: Path) -> list[str]:
    return read_text(path, "a precomp text file").splitlines()


def _precomp_split(directory: Path, split: str) -> tuple[str, Path] | None:
    for stem in PRECOMP_SPLIT_FILES[split]:
        if (directory / f"{stem}_ims.npy").is_file():
            return stem, directory / f"{stem}_ims.npy"
    return None


def _karpathy_files(dataset: str, root: Path | None) -> dict[str, ImageRecord]:
    """id -> record from the dataset's Karpathy JSON under root, if it is there (for CLIP globals)."""
    spec = NAMED_DATASETS.get(dataset)
    root = root or Path("data") / dataset
    if spec is None or not (root / spec.json_name).is_file():
        return {}
    index = read_karpathy_json(
        root / spec.json_name,
        name=dataset,
        image_root=root / spec.image_dir,
        uses_filepath=spec.uses_filepath,
        max_captions=None,
    )
    # COCO precomp ids are cocoids (= our image_id); Flickr30K's are Karpathy imgids.
    key = (lambda r: r.image_id) if dataset == "coco" else (lambda r: str(r.imgid))
    return {key(r): r for records in index.splits.values() for r in records}


@dataclass
class _PrecompSplit:
    """One split's SCAN files, checked against each other: the features file and its width, one id per
    image, the captions (`per_image` per image, in image order) and the text files' sha256."""

    ims: Path
    dim: int
    ids: list[str]
    captions: list[str]
    per_image: int
    hashes: list[str]


def _read_precomp_split(directory: Path, split: str, max_captions: int | None) -> _PrecompSplit:
    found = _precomp_split(directory, split)
    if found is None:
        names = " or ".join(f"{s}_ims.npy" for s in PRECOMP_SPLIT_FILES[split])
        raise InputError(f"precomp folder {directory} has no {names} for split '{split}'")
    stem, ims = found
    (n, _, dim), _ = checked_npy(ims)
    caps_path, ids_path = directory / f"{stem}_caps.txt", directory / f"{stem}_ids.txt"
    for p in (caps_path, ids_path):
        if not p.is_file():
            raise InputError(f"precomp folder {directory} has {ims.name} but no {p.name}")
    caps, ids = _read_lines(caps_path), _read_lines(ids_path)
    counts = (
        f"{ims.name} has {n} images, {ids_path.name} {len(ids)} ids, {caps_path.name} {len(caps)} captions"
    )
    if n == 0 or len(caps) % n or (max_captions is not None and len(caps) != n * max_captions):
        needs = f"{max_captions} per image" if max_captions is not None else "the same number per image"
        raise InputError(f"{counts}: the captions must be {needs}")
    per_image = len(caps) // n
    if len(ids) not in (n, len(caps)):
        raise InputError(f"{counts}: expected one id per image or one per caption")
    check_captions([" ".join(c.split()) for c in caps], str(caps_path))
    if len(ids) == len(caps) and per_image > 1:
        grouped = [ids[i * per_image : (i + 1) * per_image] for i in range(n)]
        bad = next((i for i, g in enumerate(grouped) if len(set(g)) != 1), None)
        if bad is not None:
            raise InputError(
                f"{ids_path.name}: the {per_image} caption ids of image {bad} disagree ({grouped[bad]})"
            )
        ids = [g[0] for g in grouped]
    return _PrecompSplit(ims, dim, ids, caps, per_image, [file_sha256(caps_path), file_sha256(ids_path)])


def load_precomp(
    directory: Path, dataset: str, root: Path | None, splits: tuple[str, ...]
) -> tuple[DatasetIndex, ImportPlan]:
    """The dataset and its region features from SCAN files; only the caption and id files are hashed
    (hashing COCO's 33 GB train_ims.npy would take minutes), the .npy sizes are checked instead."""
    if not directory.is_dir():
        raise InputError(f"precomp folder not found: {directory}")
    by_id = _karpathy_files(dataset, root)
    max_captions = NAMED_DATASETS[dataset].max_captions if dataset in NAMED_DATASETS else None
    index_splits: dict[str, list[ImageRecord]] = {}
    refs: dict[str, list] = {}
    dims = set()
    hashes = []
    for split in splits:
        found = _read_precomp_split(directory, split, max_captions)
        dims.add(found.dim)
        per_image, keep = found.per_image, max_captions or found.per_image
        records = []
        for i, image_id in enumerate(found.ids):
            known = by_id.get(image_id)
            captions = found.captions[i * per_image : i * per_image + keep]
            records.append(
                ImageRecord(
                    image_id=known.image_id if known else image_id,
                    file=known.file if known else "",
                    captions=tuple(" ".join(c.split()) for c in captions),
                )
            )
        index_splits[split] = records
        refs[split] = [(str(found.ims), i) for i in range(len(found.ids))]
        hashes += found.hashes
    if len(dims) != 1:
        raise InputError(f"precomp splits in {directory} disagree on the feature dim: {sorted(dims)}")
    image_root = None
    if by_id:
        spec = NAMED_DATASETS[dataset]
        image_root = (root or Path("data") / dataset) / spec.image_dir
    index = DatasetIndex(
        name=dataset,
        image_root=image_root,
        splits=index_splits,
        max_captions=max_captions,
        sha256=_combined(hashes),
    )
    return index, ImportPlan(feature_dim=dims.pop(), refs=refs)


def _combined(hashes: list[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


@lru_cache(maxsize=8)
def _npy_rows(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """A .npy file's data offset, the shape of one row and its dtype (its header read once per worker)."""
    shape, dtype, offset = npy_header(Path(path))
    return offset, shape[1:], dtype


# --------------------------------------------------------------------------- TSV


def _b64_bytes(field: bytes) -> int:
    return len(field) * 3 // 4 - field[-2:].count(b"=") if field else 0


def _tsv_layout(num_fields: int, path: str) -> tuple[str, ...]:
    for layout in (TSV_FIELDS, LXMERT_TSV_FIELDS):
        if num_fields == len(layout):
            return layout
    raise InputError(
        f"{path}: lines have {num_fields} fields; expected {len(TSV_FIELDS)} (bottom-up-attention) "
        f"or {len(LXMERT_TSV_FIELDS)} (LXMERT)"
    )


def index_tsv(pattern: str) -> tuple[dict[str, tuple[str, int]], int, bool]:
    """image_id -> (file, byte offset), the feature dim, and whether every line holds detections (the
    LXMERT layout); every line's field sizes are checked."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"no TSV files match {pattern}")
    lookup: dict[str, tuple[str, int]] = {}
    dim = None
    detections = True
    for path in files:
        with open(path, "rb") as f:
            offset = 0
            for number, line in enumerate(iter(f.readline, b""), 1):
                if offset == 0 and line.startswith(codecs.BOM_UTF8):  # the first line starts after the mark
                    offset, line = len(codecs.BOM_UTF8), line[len(codecs.BOM_UTF8) :]
                fields = line.rstrip(b"\r\n").split(b"\t")
                layout = _tsv_layout(len(fields), path)
                row = dict(zip(layout, fields, strict=True))
                image_id = decode_text(row.get("image_id", row.get("img_id")), path, offset, number)
                try:
                    boxes_n = int(row["num_boxes"])
                except ValueError:
                    raise InputError(f"{path} line {number}: num_boxes is not an integer") from None
                box_bytes, feat_bytes = _b64_bytes(row["boxes"]), _b64_bytes(row["features"])
                if boxes_n <= 0 or box_bytes != boxes_n * 4 * FLOAT32_BYTES:
                    raise InputError(
                        f"{path} line {number} (image {image_id}): boxes hold {box_bytes} bytes, "
                        f"num_boxes={boxes_n} needs {boxes_n * 4 * FLOAT32_BYTES} (truncated?)"
                    )
                line_dim = feat_bytes / (boxes_n * FLOAT32_BYTES)
                if dim is None and line_dim.is_integer():
                    dim = int(line_dim)
                if line_dim != dim:
                    raise InputError(
                        f"{path} line {number} (image {image_id}): features hold {feat_bytes} bytes, "
                        f"{boxes_n} boxes x {dim} float32 need {boxes_n * (dim or 0) * FLOAT32_BYTES}"
                    )
                # kept when every line is LXMERT's with fields of LXMERT's dtypes (other tools' sizes vary)
                detections &= layout is LXMERT_TSV_FIELDS and all(
                    _b64_bytes(row[name]) == boxes_n * dtype.itemsize
                    for name, (_, dtype) in DETECTION_FIELDS.items()
                )
                if image_id in lookup:
                    raise InputError(
                        f"{path} line {number}: image {image_id} already appeared "
                        f"in {lookup[image_id][0]} (overlapping TSV parts?)"
                    )
                lookup[image_id] = (path, offset)
                offset += len(line)
    return lookup, dim, detections


def _b64_array(text: str, field: str, dtype=np.float32) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the {field} field is not valid base64 ({exc})") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise ValueError(f"the {field} field decodes to {len(raw)} bytes, not whole {np.dtype(dtype)} values")
    return np.frombuffer(raw, dtype)


def read_tsv_line(path: str, offset: int, detections: bool) -> ImportedRegions:
    # split on tabs as index_tsv does: the fields are numbers and base64, which csv never quotes (and a csv
    # reader would need its process-wide field size limit raised for megabyte-long feature fields)
    with open(path, encoding="ascii", newline="") as f:
        f.seek(offset)
        fields = f.readline().rstrip("\r\n").split("\t")
    row = dict(zip(_tsv_layout(len(fields), path), fields, strict=True))
    n = int(row["num_boxes"])
    boxes = _b64_array(row["boxes"], "boxes").reshape(n, 4)
    features = _b64_array(row["features"], "features").reshape(n, -1)
    width = int(float(row.get("image_w", row.get("img_w"))))
    height = int(float(row.get("image_h", row.get("img_h"))))
    found = None
    if detections and "objects_id" in row:
        fields = {name: _b64_array(row[name], name, dtype) for name, (_, dtype) in DETECTION_FIELDS.items()}
        found = Detections.from_fields(fields, n)
    return ImportedRegions(features, boxes, width, height, found)


# -------------------------------------------------------------------------- npz (bottom-up-attention.pytorch)


def index_npz(directory: Path) -> tuple[dict[str, str], int, bool]:
    """image id (file stem) -> file, the feature dim and whether detections are there: both from the
    first file (reading every file's header here would take minutes at COCO's 123k files)."""
    if not directory.is_dir():
        raise InputError(f"npz folder not found: {directory}")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise InputError(f"no .npz files in {directory}")
    try:
        first = read_npz(str(files[0]), detections=None)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(
            f"{files[0]} (the first .npz, which sets the feature width) is unusable: {exc}"
        ) from None
    return {p.stem: str(p) for p in files}, first.features.shape[1], first.detections is not None


# MILVLG's info for 100 boxes is about 3 KB: a member far larger is not one (and is not unpickled)
MAX_INFO_BYTES = 1 << 20


def _npz_detections(z, n: int) -> Detections | None:
    """The objects and attributes in MILVLG's `info` member (None when it has none). The member is a pickled
    dict, read with numpy arrays and plain values as the only objects it may build."""
    if "info" not in z.files:
        return None
    member = z.zip.getinfo("info.npy")
    if member.file_size > MAX_INFO_BYTES:
        raise ValueError(f"is {member.file_size:,} bytes, not a MILVLG info dict")
    try:
        with z.zip.open(member) as f:
            read_npy_header(f)
            info = load_arrays(f)
    except Exception as exc:  # a crafted pickle fails in many ways (MemoryError too); each is this file's
        raise ValueError(f"is not a pickled dict of arrays ({type(exc).__name__}: {exc})") from None
    if isinstance(info, np.ndarray) and info.shape == () and info.dtype == object:
        info = info.item()
    if not isinstance(info, dict) or not all(key in info for key in DETECTION_FIELDS):
        return None
    return Detections.from_fields(info, n)


def read_npz(path: str, detections: bool | None) -> ImportedRegions:
    """Raises ValueError (its image becomes invalid) for a file that is not a usable npz. `detections`:
    required (True), not read (False), or kept when the file has them (None: the first file, which decides
    for the source)."""
    name = Path(path).name
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "bbox", "num_bbox", "image_h", "image_w") if k not in z.files]
            if missing:
                raise ValueError(f"{name} lacks {', '.join(missing)}")
            features, boxes, n = z["x"], z["bbox"], int(z["num_bbox"])
            width, height = int(z["image_w"]), int(z["image_h"])
            if features.ndim != 2 or features.shape[0] != n or boxes.shape != (n, 4):
                raise ValueError(f"{name}: x {features.shape}, bbox {boxes.shape} disagree with num_bbox={n}")
            try:
                found = None if detections is False else _npz_detections(z, n)
            except ValueError as exc:
                raise ValueError(f"{name}: its info {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, TypeError) as exc:  # cut, not a zip, or not arrays
        raise ValueError(f"{name} is not a readable npz ({exc})") from None
    return ImportedRegions(features.astype(np.float32), boxes.astype(np.float32), width, height, found)


# --------------------------------------------------------------------------- common


def match_refs(records: list[ImageRecord], lookup: dict) -> list:
    """A source keyed by image id or by image file stem (both conventions occur in the wild)."""
    return [lookup.get(r.image_id, lookup.get(Path(r.file).stem)) for r in records]


def plan_import(source: str, found: tuple[dict, int, bool], index: DatasetIndex) -> ImportPlan:
    """A tsv/npz source (`found`: its index, feature width, whether it holds detections) matched against
    the dataset's images (precomp plans itself in `load_precomp`)."""
    lookup, dim, detections = found
    refs = {split: match_refs(records, lookup) for split, records in index.splits.items()}
    if not any(ref is not None for split_refs in refs.values() for ref in split_refs):
        raise InputError(f"none of the dataset's images has features in {source} (ids or file names differ?)")
    return ImportPlan(feature_dim=dim, refs=refs, detections=detections)


def read_precomp(ref) -> ImportedRegions:
    """One image's rows, read (not memory-mapped: a map keeps every page it touched in the worker's resident
    set, 33 GB over COCO's train_ims.npy, which is what schedulers count against a job's memory)."""
    path, row = ref
    offset, row_shape, dtype = _npy_rows(path)
    size = int(np.prod(row_shape)) * dtype.itemsize
    with open(path, "rb") as file:
        data = os.pread(file.fileno(), size, offset + row * size)
    if len(data) != size:
        raise ValueError(f"{path} ends within image {row}'s features (the file was cut since it was checked)")
    return ImportedRegions(np.frombuffer(data, dtype).reshape(row_shape).astype(np.float32), None, 0, 0)


def checked_imported(regions: ImportedRegions, feature_dim: int, detections: bool) -> ImportedRegions:
    """Raises ValueError (the image becomes invalid) when one image's source data is unusable, or lacks
    the detections (`detections`) that the source's first file has."""
    if regions.features.shape[1] != feature_dim:
        raise ValueError(
            f"features are {regions.features.shape[1]}-d, the source's first image has {feature_dim}"
        )
    if detections and regions.detections is None:
        raise ValueError("no objects and attributes per box, which the source's first image has")
    return regions
