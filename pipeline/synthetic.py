"""Synthetic feature stores with random contents, written through the real store writer.

For tests and benchmarks of the stages after extraction (sharding, loading) at sizes no model
could extract here: rows are generated and written a block at a time, so memory stays flat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from userpipe.pipeline.datasets import DatasetIndex, ImageRecord
from userpipe.pipeline.store import collect_failures, create_store, every_chunk_written, write_attrs
from userpipe.schemas.store import ExtractorConfig, GlobalConfig, RegionConfig, SplitSummary, StoreAttrs

BLOCK_CHUNKS = 16  # store chunks generated and written per step


def write_synthetic_store(
    path: Path,
    num_images: int,
    *,
    num_regions: int = 6,
    feature_dim: int = 8,
    clip_dim: int = 5,
    invalid: tuple[int, ...] = (),
    captions_per_image: int | None = None,
    chunk_size: int = 4,
    seed: int = 0,
    split: str = "train",
    dataset: str = "synthetic",
    global_encoder: GlobalConfig | None = None,
) -> Path:
    """One split ("train" by default). Captions per image: fixed, or 1 + i % 5 (variable) when None.
    Features are ReLU-like (half zeros), region counts vary in [1, num_regions]. `dataset`: the name the store
    records, which the evaluation protocols check (e.g. "coco" for a stand-in of COCO's 5K test split);
    `global_encoder`: the one it records (default: an open_clip "synthetic" of `clip_dim`)."""
    rng = np.random.default_rng(seed)
    records = [
        ImageRecord(
            f"img{i}",
            f"{i}.jpg",
            tuple(f"caption {k} of image {i}" for k in range(captions_per_image or 1 + i % 5)),
        )
        for i in range(num_images)
    ]
    config = ExtractorConfig(
        dataset=dataset,
        splits=(split,),
        max_captions=None,
        num_regions=num_regions,
        feature_dim=feature_dim,
        image_size=64,
        chunk_size=chunk_size,
        regions=RegionConfig(kind="grid", backbone="efficientnet_lite0"),
        global_encoder=global_encoder
        or GlobalConfig(kind="open_clip", model="synthetic", image_dim=clip_dim, text_dim=clip_dim),
    )
    num_captions = sum(len(r.captions) for r in records)
    attrs = StoreAttrs(
        extractor=config,
        splits={split: SplitSummary(num_images=num_images, num_captions=num_captions)},
        chunk_checksums=True,
    )
    root = create_store(path, attrs, DatasetIndex(dataset, path.parent, {split: records}, None))
    with every_chunk_written():
        _write_features(root[split], rng, config, num_images, num_captions, invalid)
    write_attrs(root, collect_failures(root, attrs))
    return path


def _write_features(
    group, rng, config: ExtractorConfig, num_images: int, num_captions: int, invalid: tuple[int, ...]
) -> None:
    """Random rows of the arrays `config` shapes, every image valid but those in `invalid`."""
    num_regions, feature_dim = config.num_regions, config.feature_dim
    clip_dim = config.global_encoder.image_dim
    block = config.chunk_size * BLOCK_CHUNKS
    for start in range(0, num_images, block):
        rows = slice(start, min(num_images, start + block))
        n = rows.stop - rows.start
        counts = rng.integers(1, num_regions + 1, n)
        regions = np.maximum(rng.standard_normal((n, num_regions, feature_dim), dtype=np.float32), 0)
        regions[np.arange(num_regions)[None, :] >= counts[:, None]] = 0  # padding past num_regions
        group["regions"][rows] = regions.astype(np.float16)
        group["boxes"][rows] = rng.uniform(0, 50, (n, num_regions, 4)).astype(np.float32)
        group["num_regions"][rows] = counts
        group["clip_image"][rows] = rng.standard_normal((n, clip_dim), dtype=np.float32).astype(np.float16)
    valid = np.ones(num_images, bool)
    valid[list(invalid)] = False
    group["width"][:], group["height"][:] = 64, 48
    group["valid"][:] = valid
    group["error"][:] = np.array(["" if v else "OSError: synthetic failure" for v in valid], dtype=object)
    group["clip_text"][:] = rng.standard_normal((num_captions, clip_dim), dtype=np.float32).astype(np.float16)
    group["images_done"][:] = True
    group["captions_done"][:] = True
