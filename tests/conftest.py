"""Shared fixtures: small datasets written in the real formats users have."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: fail at once instead of retrying for ~46 s


def karpathy_record(filename: str, split: str, captions: list[str], imgid: int, cocoid: int | None = None,
                    filepath: str | None = None, boxes=None) -> dict:
    record = {"filename": filename, "imgid": imgid, "split": split,
              "sentences": [{"raw": c, "tokens": c.split(), "imgid": imgid, "sentid": imgid * 10 + k}
                            for k, c in enumerate(captions)]}
    if cocoid is not None:
        record["cocoid"] = cocoid
    if filepath is not None:
        record["filepath"] = filepath
    if boxes is not None:
        record["boxes"] = boxes
    return record


def write_json(path: Path, images: list[dict], dataset: str = "coco") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def write_image(path: Path, seed: int, size=(96, 72)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """A COCO-layout dataset: dataset_coco.json + images/{train2014,val2014}/, 4 train, 1 restval, 2 val, 2 test."""
    root = tmp_path / "coco"
    records = []
    layout = ["train"] * 4 + ["restval", "val", "val", "test", "test"]
    for i, split in enumerate(layout):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{100 + i:012d}.jpg"
        write_image(root / "images" / folder / name, i)
        caps = [f"image {i} caption {k}" for k in range(6 if i == 0 else 5)]
        records.append(karpathy_record(name, split, caps, i, cocoid=100 + i, filepath=folder,
                                       boxes=[[4, 4, 40, 30], [50, 20, 90, 70]]))
    write_json(root / "dataset_coco.json", records)
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run_cli(runner: CliRunner, *args: str):
    from userpipe.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_synthetic_store(path: Path, num_images: int = 23, invalid: tuple[int, ...] = (3, 17), seed: int = 0,
                          chunk_size: int = 4) -> Path:
    """A complete store with random contents, variable caption counts and some invalid images, written
    through the real writer (no models needed)."""
    from pipeline.datasets import DatasetIndex, ImageRecord
    from pipeline.extract import collect_failures
    from pipeline.store import create_store, write_attrs
    from schemas.store import ExtractorConfig, GlobalConfig, RegionConfig, SplitSummary, StoreAttrs

    rng = np.random.default_rng(seed)
    records = [ImageRecord(f"img{i}", f"{i}.jpg", tuple(f"caption {k} of image {i}" for k in range(1 + i % 5)))
               for i in range(num_images)]
    config = ExtractorConfig(dataset="synthetic", splits=("train",), max_captions=None, num_regions=6,
                             feature_dim=8, image_size=64, chunk_size=chunk_size,
                             regions=RegionConfig(kind="grid", backbone="efficientnet_lite0"),
                             global_encoder=GlobalConfig(kind="open_clip", model="m", image_dim=5, text_dim=5))
    num_captions = sum(len(r.captions) for r in records)
    attrs = StoreAttrs(extractor=config, splits={"train": SplitSummary(num_images=num_images,
                                                                        num_captions=num_captions)})
    root = create_store(path, attrs, DatasetIndex("synthetic", path.parent, {"train": records}, None))
    group = root["train"]
    num_regions = rng.integers(1, 7, num_images).astype(np.int16)
    regions = rng.normal(size=(num_images, 6, 8)).astype(np.float16)
    for i, k in enumerate(num_regions):
        regions[i, k:] = 0
    valid = np.ones(num_images, bool)
    valid[list(invalid)] = False
    group["regions"][:] = regions
    group["boxes"][:] = rng.uniform(0, 50, (num_images, 6, 4)).astype(np.float32)
    group["num_regions"][:] = num_regions
    group["width"][:], group["height"][:] = 64, 48
    group["valid"][:] = valid
    group["error"][:] = np.array(["" if v else "OSError: broken" for v in valid], dtype=object)
    group["clip_image"][:] = rng.normal(size=(num_images, 5)).astype(np.float16)
    group["clip_text"][:] = rng.normal(size=(num_captions, 5)).astype(np.float16)
    group["images_done"][:] = True
    group["captions_done"][:] = True
    write_attrs(root, collect_failures(root, attrs))
    return path
