"""One image → the features a store row holds, with the extractor a store records: used by the extract
driver for every image and by `userpipe search` for an image-file query. The driver (pipeline/extract.py)
distributes it; this module is the library."""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from userpipe.pipeline.detections import Detections
from userpipe.pipeline.global_encoders import GlobalEncoder
from userpipe.pipeline.region_kinds import read_imported, region_kind
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import ExtractorConfig


@lru_cache(maxsize=2)
def extractor_models(
    config_json: str, device: str = "cpu"
) -> tuple[ExtractorConfig, Callable | None, GlobalEncoder | None]:
    """Built once per worker process and configuration: the region kind's extractor (None for imported
    regions) and the global encoder. `device` applies to the butd-vg detector."""
    config = ExtractorConfig.model_validate_json(config_json)
    kind = region_kind(config.regions.kind)
    regions = kind.build(config, device) if kind.build else None
    encoder = None if config.global_encoder.kind == "none" else GlobalEncoder(config.global_encoder)
    return config, regions, encoder


# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS: 0.25 GiB as 24-bit RGB), held here so
# that a process which lifts Pillow's limit does not lift this one; a 9,000 x 9,000 photo is under it
MAX_PIXELS = 89_478_485
# A query is decoded at no less than twice the size its encoders scale it to (the region backbone's shorter
# side `image_size`, a global encoder's input of at most this many px), so their own antialiased resize
# still averages over 2 x 2 source pixels or more, as Pillow's reducing_gap=2 keeps it
GLOBAL_INPUT = 336


def load_image(path: str, short_side: int | None = None) -> Image.Image:
    """The image file at `path` as RGB. A file that is not an image, or holds more than MAX_PIXELS (a
    decompression bomb), is an OSError or ValueError naming `path`. `short_side`: decoded at a reduced size
    whose shorter side stays at least `short_side` (a JPEG at 1/2, 1/4 or 1/8 scale by its decoder, other
    formats box-reduced by an integer factor before the RGB conversion); an image smaller than that is
    decoded as it is."""
    if not path:
        raise FileNotFoundError("no image file is known for this id (not in the dataset's Karpathy JSON)")
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer; the file's
    # type is then checked on the open descriptor (no race with a rename), a symlink loop fails in open
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
    if kind != stat.S_IFREG:
        os.close(descriptor)
        names = {
            stat.S_IFIFO: "a FIFO",
            stat.S_IFDIR: "a directory",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket",
        }
        raise ValueError(f"{path} is {names.get(kind, 'not a regular file')}, not an image file")
    with open(descriptor, "rb") as file:
        try:
            with warnings.catch_warnings():
                # Pillow warns of a bomb up to twice its limit; it is refused below, with its size
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)
        except UnidentifiedImageError:
            # Pillow's own message names the file object, whose descriptor number differs between runs
            raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit, refused as it is opened
            raise ValueError(f"{path}: {exc}") from None
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"{path} is {width}x{height} pixels, more than the {MAX_PIXELS:,} pixels an image may "
                    "have (a decompression bomb?)"
                )
            if short_side:
                image = _reduced(image, short_side)
            return image.convert("RGB")  # forces a full decode, so truncated files fail here


def _reduced(image: Image.Image, short_side: int) -> Image.Image:
    scale = short_side / min(image.size)
    if scale >= 1:
        return image
    image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))  # JPEG only
    if image.mode not in ("L", "RGB"):  # averaging palette indices, CMYK or alpha would not average colours
        image = image.convert("RGB")
    factor = min(image.size) // short_side
    return image.reduce(factor) if factor > 1 else image


@dataclass
class ImageResult:
    features: np.ndarray  # (k, D), k <= R
    boxes: np.ndarray | None  # (k, 4); None when the source has none
    width: int = 0
    height: int = 0
    detections: Detections | None = None  # butd-vg, or imported from files that hold them


def image_features(
    config: ExtractorConfig,
    extractor: Callable | None,
    image: Image.Image | None,
    annotated_boxes,
    ref,
) -> ImageResult:
    if extractor is not None:
        found = extractor(image, annotated_boxes)
        return ImageResult(found.features, found.boxes, *image.size, found.detections)
    if ref is None:
        raise ValueError(f"no features in {config.regions.kind}:{config.regions.source}")
    imported = read_imported(config.regions.kind, ref, config.feature_dim, config.regions.imported_detections)
    k = config.num_regions  # the first R of the source's boxes (sorted by confidence by BUTD tools)
    boxes = imported.boxes[:k] if imported.boxes is not None else None
    width, height = image.size if image is not None else (imported.width, imported.height)
    detections = imported.detections.first(k) if imported.detections else None
    return ImageResult(imported.features[:k], boxes, width, height, detections)


def image_file_features(config: ExtractorConfig, path: Path) -> tuple[np.ndarray, int, np.ndarray | None]:
    """One image file as a store row of `config` would hold it: regions (R, D) zero-padded and
    float16-rounded, their count, and the global embedding (None without a global encoder). For
    `userpipe search` queries."""
    if config.regions.stored.imported:
        raise InputError(
            f"the store's regions were imported ({config.regions.kind}), so no extractor can embed "
            "a new image; query with an image id from the index"
        )
    _, extractor, encoder = extractor_models(config.model_dump_json())
    try:
        image = load_image(str(path), 2 * max(config.image_size, GLOBAL_INPUT))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    try:
        result = image_features(config, extractor, image, None, None)
    except ValueError as exc:  # e.g. no box survives the detector in a tiny image
        raise InputError(f"cannot embed image {path}: {exc}") from None
    k = len(result.features)
    regions = np.zeros((config.num_regions, config.feature_dim), np.float16)
    regions[:k] = result.features
    clip = encoder.encode_images([image])[0].astype(np.float16) if encoder else None
    return regions, k, clip
