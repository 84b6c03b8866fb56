"""`userpipe export`: a store split -> the region interchange formats the importers read back: one
bottom-up-attention.pytorch (MILVLG) .npz per image, or one TSV for the split (LXMERT's layout when the
store has detections, generate_tsv.py's otherwise). The layouts: docs/architecture.md, "The Visual Genome
detector".
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.progress import Progress

from userpipe.pipeline.detections import DETECTION_FIELDS
from userpipe.pipeline.importers import LXMERT_TSV_FIELDS, TSV_FIELDS
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import EXPORT_FILE, EXPORT_FOLDER, check_output, claim
from userpipe.schemas.store import DETECTION_ARRAYS
from userpipe.schemas.store_reader import open_store, store_split

FORMATS = ("npz", "tsv")


def _rows(store: Path, split: str) -> Iterator[dict]:
    root, attrs = open_store(store)
    group = store_split(store, root, attrs, split)
    if not attrs.complete:
        raise InputError(f"{store} is incomplete; rerun userpipe extract to finish it before exporting")
    if attrs.extractor.regions.kind == "precomp":
        raise InputError(
            f"{store} was imported from SCAN precomp files, which have no boxes; npz and TSV need them"
        )
    detections = [name for name in DETECTION_ARRAYS if name in group]
    size = attrs.extractor.chunk_size
    for start in range(0, attrs.splits[split].num_images, size):
        part = slice(start, start + size)
        columns = {
            name: group[name][part]
            for name in (
                "image_id",
                "width",
                "height",
                "regions",
                "boxes",
                "num_regions",
                "valid",
                *detections,
            )
        }
        for i in np.flatnonzero(columns["valid"]):
            k = int(columns["num_regions"][i])
            yield {
                "image_id": _file_safe(str(columns["image_id"][i])),
                "width": int(columns["width"][i]),
                "height": int(columns["height"][i]),
                "features": columns["regions"][i, :k].astype(np.float32),
                "boxes": columns["boxes"][i, :k].astype(np.float32),
                **{name: columns[name][i, :k] for name in detections},
            }


def _file_safe(image_id: str) -> str:
    """An id usable as a file name and a TSV field (both formats name an image by its id)."""
    if not image_id.isascii() or not image_id.isprintable() or "/" in image_id or image_id in (".", ".."):
        raise InputError(f"image id {image_id!r} cannot name an npz file or a TSV field (ASCII, no '/')")
    return image_id


def _file_detections(row: dict) -> dict[str, np.ndarray]:
    """The row's detections under the field names and dtypes of LXMERT's TSV and MILVLG's info."""
    return {
        field: row[name].astype(dtype) for field, (name, dtype) in DETECTION_FIELDS.items() if name in row
    }


def _npz_files(rows: Iterator[dict], folder: Path, progress: Progress) -> int:
    task = progress.add_task("npz files", total=None)
    count = 0
    for row in rows:
        info = {
            "image_id": row["image_id"],
            "image_h": row["height"],
            "image_w": row["width"],
            "num_boxes": len(row["boxes"]),
            **_file_detections(row),
        }
        np.savez_compressed(
            folder / f"{row['image_id']}.npz",
            x=row["features"],
            bbox=row["boxes"],
            num_bbox=len(row["boxes"]),
            image_h=row["height"],
            image_w=row["width"],
            info=np.array(info, dtype=object),  # as MILVLG saves it (read with allow_pickle)
        )
        count += 1
        progress.advance(task)
    return count


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def _tsv_file(rows: Iterator[dict], path: Path, progress: Progress) -> int:
    task = progress.add_task("TSV lines", total=None)
    count = 0
    with open(path, "w", encoding="ascii", newline="") as f:
        for row in rows:
            detections = _file_detections(row)
            values = {
                "image_id": row["image_id"],
                "image_w": row["width"],
                "image_h": row["height"],
                "num_boxes": len(row["boxes"]),
                "boxes": _b64(row["boxes"]),
                "features": _b64(row["features"]),
                **{field: _b64(values) for field, values in detections.items()},
            }
            values |= {"img_id": values["image_id"], "img_w": values["image_w"], "img_h": values["image_h"]}
            layout = LXMERT_TSV_FIELDS if detections else TSV_FIELDS
            f.write("\t".join(str(values[field]) for field in layout) + "\n")
            count += 1
            progress.advance(task)
    return count


def export_split(store: Path, split: str, fmt: str, out: Path, progress: Progress) -> int:
    """Write `split` of `store` to `out` (a new folder for npz, a new file for tsv); returns the images."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}': use {' or '.join(FORMATS)}")
    kind = EXPORT_FOLDER if fmt == "npz" else EXPORT_FILE
    check_output(out, kind, [store])
    rows = _rows(store, split)
    first = next(rows, None)  # the store's problems are found before anything is written
    if first is None:
        raise InputError(f"{store} split '{split}' has no valid image to export")

    def every_row() -> Iterator[dict]:
        yield first
        yield from rows

    with claim(out, kind, [store]) as output, output.built() as scratch:
        return (_npz_files if fmt == "npz" else _tsv_file)(every_row(), scratch, progress)
