"""Crisscrossed Captions (CxC; Parekh et al., EACL 2021) on COCO's Karpathy 5K test split: image-text
positives beyond each caption's own image, from human similarity ratings, read from the files as users
download them. The files and the rule for a positive: docs/architecture.md, "Crisscrossed Captions".
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import read_text

SITS_FILE = "sits_test.csv"
SITS_COLUMNS = ["caption", "image", "agg_score", "sampling_method"]
POSITIVE_SCORE = 3.0
CAPTION_ID = re.compile(r"COCO_val2014:sentid:(\d+)")
IMAGE_NAME = re.compile(r"COCO_val2014_(\d{12})\.jpg")
SOURCE = "github.com/google-research-datasets/Crisscrossed-Captions, data/"


def read_sits(folder: Path) -> list[tuple[int, int, float]]:
    """(COCO caption id, COCO image id, agg_score) of every rated pair."""
    path = Path(folder) / SITS_FILE
    if not path.is_file():
        raise InputError(f"no {SITS_FILE} in {folder} (the CxC annotations: {SOURCE})")
    rows = []
    reader = csv.reader(io.StringIO(read_text(path, "the CxC ratings"), newline=""))
    header = next(reader, [])
    if header != SITS_COLUMNS:
        raise InputError(f"{path}: the columns are {','.join(header)}, expected {','.join(SITS_COLUMNS)}")
    for line, row in enumerate(reader, start=2):
        caption = CAPTION_ID.fullmatch(row[0]) if len(row) == len(SITS_COLUMNS) else None
        image = IMAGE_NAME.fullmatch(row[1]) if caption else None
        try:
            score = float(row[2]) if image else None
        except ValueError:
            score = None
        if score is None or not 0 <= score <= 5:
            raise InputError(
                f"{path} line {line}: expected COCO_val2014:sentid:ID, COCO_val2014_ID.jpg and a "
                f"score in [0, 5], got {','.join(row)[:120]!r}"
            )
        rows.append((int(caption[1]), int(image[1]), score))
    if not rows:
        raise InputError(f"{path} holds no rated pairs")
    return rows


def read_coco_captions(path: Path) -> dict[int, tuple[int, str]]:
    """COCO caption id -> (COCO image id, caption) from a COCO captions annotation file."""
    text = read_text(path, "COCO's captions_val2014.json")
    try:
        tree = json.loads(text)
        return {int(a["id"]): (int(a["image_id"]), str(a["caption"])) for a in tree["annotations"]}
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"no {exc.args[0]!r} field" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise InputError(f"{path} is not a COCO captions annotation file ({problem})") from None


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


@dataclass(frozen=True)
class CxcAnnotations:
    rated: list[tuple[int, int, float]]  # the positives among the rated pairs (read_sits)
    captions: dict[int, tuple[int, str]]  # read_coco_captions
    source: Path  # the captions file, for messages


def read_cxc(folder: Path, coco_captions: Path) -> CxcAnnotations:
    """Both annotation files, read and checked once (before any model is loaded)."""
    rated = [r for r in read_sits(folder) if r[2] >= POSITIVE_SCORE]
    return CxcAnnotations(rated, read_coco_captions(coco_captions), Path(coco_captions))


def cxc_positives(
    image_ids: list[str], caption_texts: list[str], caption_image: torch.Tensor, cxc: CxcAnnotations
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, caption) index pairs that count as positives on an embedded split: its own pairs, and
    CxC's rated pairs at agg_score >= 3. Every CxC image and caption must be in the split."""
    rated, annotations, coco_captions = cxc.rated, cxc.captions, cxc.source
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    caption_index = {}
    for c, (text, image) in enumerate(zip(caption_texts, caption_image.tolist(), strict=True)):
        caption_index.setdefault((image_ids[image], _normalized(text)), c)
    pairs = set(zip(caption_image.tolist(), range(len(caption_texts)), strict=True))
    for caption_id, coco_image, _ in rated:
        if str(coco_image) not in image_index:
            raise InputError(
                f"CxC image {coco_image} is not in the split: CxC is defined on the Karpathy 5K test split"
            )
        if caption_id not in annotations:
            raise InputError(f"CxC caption {caption_id} is not in {coco_captions}")
        owner, text = annotations[caption_id]
        c = caption_index.get((str(owner), _normalized(text)))
        if c is None:
            raise InputError(
                f"COCO caption {caption_id} of image {owner} ({text.strip()[:60]!r}) is not among the "
                "split's captions of that image: CxC is defined on the Karpathy 5K test split"
            )
        pairs.add((image_index[str(coco_image)], c))
    both = torch.tensor(sorted(pairs), dtype=torch.long)
    return both[:, 0], both[:, 1]
