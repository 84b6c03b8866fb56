"""Crash consistency, tested the way SQLite tests it: kill each writer with SIGKILL at seeded random
write operations (tests/crash/sitecustomize.py counts them in every process of the command), run it again
as a user would (the same command; `--resume` for a run that has a checkpoint), and compare with an
uninterrupted run: the same bytes (store, shards, index) or the same steps and metrics (training), and
nothing left beside the output. A full disk on each writer: one line naming the path and the bytes
needed, and no partial file.

`just test` runs CRASH_POINTS kill points per writer; `just test-crash` runs CRASH_POINTS_SLOW.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kit import karpathy_record, log_scalars, tensorboard_scalars, write_image, write_json

pytestmark = pytest.mark.slow  # end-to-end: writers killed and rerun

HOOK = Path(__file__).parent / "crash"
CRASH_POINTS = 1
CRASH_POINTS_SLOW = 24


def userpipe(
    args, env_extra: dict | None = None, limit_file_size: int | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env = {key: value for key, value in merged.items() if value is not None}  # None: leave it unset

    def limit() -> None:  # a disk that is full after `limit_file_size` bytes of one file (no root needed)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "userpipe", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        preexec_fn=limit if limit_file_size else None,
    )


def crash_env(area: Path, counter: Path, at: int = 0) -> dict:
    path = os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")])
    return {
        "PYTHONPATH": path,
        "USERPIPE_CRASH_SCOPE": str(area),
        "USERPIPE_CRASH_COUNTER": str(counter),
        "USERPIPE_CRASH_AT": str(at),
    }


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def training_outcome(run: Path) -> dict:
    """What a resumed run must reproduce: every step (its losses), every validation, the best state, the
    config, the record."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {
        "steps": [r["step"] for r in records if "loss" in r],
        "same_image": [
            r[k] for r in records if "loss" in r for k in ("same_image_batch", "same_image_queue")
        ],
        "losses": [r[k] for r in records if "loss" in r for k in ("loss", "batch", "queue")],
        "vals": [r["step"] for r in records if "val" in r],
        "rsums": [r["val"]["rsum"] for r in records if "val" in r],
        "best": json.loads((run / "checkpoints/best/metrics.json").read_text())["rsum"],
        "config": (run / "config.json").read_text(),
        # the record, but its id: each run gets its own (a resumed run keeps it: the default-resume test)
        "record": {k: v for k, v in json.loads((run / "run.json").read_text()).items() if k != "id"},
        "states": sorted(p.name for p in (run / "checkpoints").iterdir()),
    }


def training_tolerance(outcome: dict) -> dict:
    """Numbers to 1e-5, not bit for bit: Adam moves parameters whose true gradient is ~0 (GPO's
    softmax-shift bias) by its normalised rounding noise, which may differ between two processes."""
    return {
        **outcome,
        "losses": pytest.approx(outcome["losses"], abs=1e-5),
        "rsums": pytest.approx(outcome["rsums"], abs=1e-4),
        "best": pytest.approx(outcome["best"], abs=1e-4),
    }


@dataclass
class Writer:
    name: str
    args: tuple  # the command, with {out} for the output
    snapshot: callable
    tolerance: callable = staticmethod(lambda snapshot: snapshot)  # the reference as the rerun must match it
    before: tuple = ()  # a command that writes the output this one replaces (--overwrite)

    def command(self, out: Path, args: tuple | None = None) -> list:
        return [str(a).replace("{out}", str(out)) for a in (args or self.args)]

    def rerun(self, out: Path) -> list:
        resume = self.name == "train" and (out / "checkpoints" / "last").is_dir()
        return self.command(out) + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def inputs(chain, trained) -> dict:
    made = chain(
        "crash-inputs", captions_per_image=3, val_images=12, val_seed=2, config_overrides={"train.epochs": 2}
    )
    images = made.tmp / "coco"
    records = []
    for i, split in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2):
        name = f"{i:03d}.jpg"
        write_image(images / "images" / name, i)
        records.append(
            karpathy_record(
                name,
                split,
                [f"image {i} caption {k}" for k in range(5)],
                i,
                filepath="images",
                boxes=[[4, 4, 40, 30], [50, 20, 90, 70]],
            )
        )
    return {
        "dataset": write_json(images / "dataset_crash.json", records),
        "images": images,
        "train_store": made.train_store,
        "val_store": made.val,
        "shards": made.shards,
        "config": made.config,
        "run": trained.run,
        "gallery": trained.gallery,
    }


WRITERS = ("extract", "shard", "train", "index")
REPLACING = ("shard --overwrite",)  # the swap of a finished replacement into place: in `just test-crash` only


def writer(name: str, inputs: dict) -> Writer:
    return {
        "extract": Writer(
            "extract",
            (
                "extract",
                "--dataset",
                inputs["dataset"],
                "--root",
                inputs["images"],
                "--regions",
                "boxes",
                "--clip",
                "imagenet:efficientnet_lite0",
                "--num-regions",
                "4",
                "--image-size",
                "64",
                "--chunk-size",
                "2",
                "--workers",
                "1",
                "--out",
                "{out}",
            ),
            file_hashes,
        ),
        "shard": Writer(
            "shard",
            (
                "shard",
                "--store",
                inputs["train_store"],
                "--out",
                "{out}",
                "--max-count",
                "6",
                "--workers",
                "1",
            ),
            file_hashes,
        ),
        "train": Writer(
            "train",
            (
                "train",
                "--shards",
                inputs["shards"],
                "--val-store",
                inputs["val_store"],
                "--config",
                inputs["config"],
                "--out",
                "{out}",
                "--deterministic",
            ),
            training_outcome,
            training_tolerance,
        ),
        "index": Writer(
            "index",
            ("index", "--run", inputs["run"], "--store", inputs["gallery"], "--out", "{out}"),
            file_hashes,
        ),
        "shard --overwrite": Writer(
            "shard --overwrite",
            (
                "shard",
                "--store",
                inputs["train_store"],
                "--out",
                "{out}",
                "--max-count",
                "6",
                "--workers",
                "1",
                "--overwrite",
            ),
            file_hashes,
            before=(
                "shard",
                "--store",
                inputs["train_store"],
                "--out",
                "{out}",
                "--max-count",
                "4",
                "--workers",
                "1",
            ),
        ),
    }[name]


def crash_and_recover(w: Writer, tmp: Path, points: int, seed: int) -> tuple[list[str], int]:
    """Kill `w` at `points` seeded write operations; after each, rerun and compare. Returns what was seen
    and how many write operations an uninterrupted run makes."""
    area = tmp / "area"
    area.mkdir()
    out = area / "out"
    counter = tmp / "count"
    if w.before:
        assert userpipe(w.command(out, w.before)).returncode == 0
    clean = userpipe(w.command(out), crash_env(area, counter))
    assert clean.returncode == 0, clean.stderr[-2000:]
    total = counter.stat().st_size
    reference = w.tolerance(w.snapshot(out))
    # stratified: one seeded point in each of `points` equal parts of the run's write operations (every
    # operation when the writer makes no more than `points`)
    rng = np.random.default_rng(seed)
    edges = np.linspace(1, total + 1, points + 1).astype(int)
    kill_points = (
        range(1, total + 1)
        if total <= points
        else [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    )
    seen = []
    for at in kill_points:
        for leftover in area.iterdir():
            subprocess.run(["rm", "-rf", str(leftover)], check=True)
        counter.unlink()
        if w.before:
            assert userpipe(w.command(out, w.before)).returncode == 0
        killed = userpipe(w.command(out), crash_env(area, counter, int(at)))
        assert killed.returncode in (-signal.SIGKILL, 0), killed.stderr[-2000:]
        left = sorted(p.name for p in area.iterdir())
        again = userpipe(w.rerun(out))
        assert again.returncode == 0, f"after a kill at write {at} ({left}): {again.stderr[-2000:]}"
        assert w.snapshot(out) == reference, f"after a kill at write {at}, the rerun wrote something else"
        assert sorted(p.name for p in area.iterdir()) == ["out"], (
            f"left beside the output: {list(area.iterdir())}"
        )
        seen.append(f"write {at}/{total}: {'killed' if killed.returncode else 'finished first'}, left {left}")
    return seen, total


# Training's kill and resume runs in `just test` as test_a_default_resume_... (the default math users get);
# its --deterministic variant, at every one of the 24 points, in `just test-crash` (below).
@pytest.mark.parametrize("name", [w for w in WRITERS if w != "train"])
@pytest.mark.usefixtures("one_thread")  # the rerun must write the same bytes
def test_killed_writer_is_repaired_by_a_rerun(name, inputs, tmp_path):
    seen, _ = crash_and_recover(writer(name, inputs), tmp_path, CRASH_POINTS, seed=WRITERS.index(name))
    assert len(seen) == CRASH_POINTS


def test_a_default_resume_continues_the_data_position_queues_optimizer_and_trackers(inputs, tmp_path):
    """Default math (MKL as it comes, not bit for bit): a run killed two steps past a mid-epoch checkpoint and
    resumed reads the same batches against the same queue ids (same-image counts per step), validates at the
    same steps with the optimizer's step count carried over, and its losses stay within a rounding drift of
    the uninterrupted run's. With `--report-to tensorboard` (its event files then hold steps the resume trains
    again), TensorBoard's reader shows exactly log.jsonl's numbers, each step once."""
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    run = tmp_path / "out"
    args = [a for a in writer("train", inputs).command(run) if a != "--deterministic"]
    args += ["--set", "train.val_every=3", "--report-to", "tensorboard"]  # checkpoints mid-epoch
    fast = {"MKL_CBWR": None}
    assert userpipe(args, fast).returncode == 0
    uninterrupted = training_outcome(run)
    optimizer_steps = optimizer_step_counts(run)
    subprocess.run(["rm", "-rf", str(run)], check=True)
    # log.jsonl's records: val@0, steps 1-3, val@3 (checkpoint), a warning or not, step 4, (step 5): the
    # command is killed as it opens the log for its 8th record
    killed = userpipe(args, {**fast, **crash_env(run / "log.jsonl", tmp_path / "count", at=8)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_id = json.loads((run / "run.json").read_text())["id"]
    before = [step for step, _ in tensorboard_scalars(run / "tensorboard")["train/loss"]]
    assert before in ([1, 2, 3, 4], [1, 2, 3, 4, 5])  # flushed as logged, past the checkpoint at step 3
    again = userpipe([*args, "--resume"], fast)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout + again.stderr
    resumed = training_outcome(run)
    assert resumed["vals"] == uninterrupted["vals"], str((resumed["vals"], uninterrupted["vals"]))
    assert resumed == {
        **uninterrupted,
        "losses": pytest.approx(uninterrupted["losses"], rel=1e-3, abs=1e-4),
        "rsums": resumed["rsums"],
        "best": resumed["best"],
    }
    assert optimizer_step_counts(run) == optimizer_steps
    assert json.loads((run / "config.json").read_text())["train"]["deterministic"] is False
    assert json.loads((run / "run.json").read_text())["id"] == run_id  # the trackers' run continues
    shown, logged = tensorboard_scalars(run / "tensorboard"), log_scalars(run)
    assert set(shown) == set(logged)
    assert len(logged["train/loss"]) == len({step for step, _ in logged["train/loss"]}) > 4
    for tag, values in logged.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in values], tag
        assert [v for _, v in shown[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag


def optimizer_step_counts(run: Path) -> list[float]:
    import torch

    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=False)
    return sorted({float(s["step"]) for s in state["optimizer"]["state"].values()})


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", WRITERS + REPLACING)
@pytest.mark.usefixtures("one_thread")
def test_killed_writer_is_repaired_by_a_rerun_at_many_points(name, inputs, tmp_path):
    seen, total = crash_and_recover(
        writer(name, inputs), tmp_path, CRASH_POINTS_SLOW, seed=100 + (WRITERS + REPLACING).index(name)
    )
    print(f"\n{name}: " + "\n".join(seen))
    assert len(seen) == min(CRASH_POINTS_SLOW, total)


@contextmanager
def small_disk(folder: Path, size: int):
    """A `size`-byte tmpfs mounted at `folder` (needs root; skips the test where mounting fails)."""
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root; the file-size-limit case covers this writer")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def plain_folder(folder: Path, size: int):
    folder.mkdir()
    yield


# (writer, tmpfs size, file size limit): each makes the writer fail part-way
DISKS = [
    ("extract", 96 << 10, 4 << 10),
    ("shard", 64 << 10, 16 << 10),
    ("train", 256 << 10, 256 << 10),
    ("index", 8 << 10, 2 << 10),
]


def can_mount_tmpfs() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as folder:
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", folder], capture_output=True
        ).returncode:
            return False
        subprocess.run(["umount", folder], check=True)
    return True


def full_disk_cases():
    """Both ways for training (the tmpfs case is refused by the free-space check before the checkpoint is
    written, the file-size limit fails part-way through it); for the other writers, by default, the real
    full disk where this test can mount one, else the file-size limit (the other way: `exhaustive`)."""
    default = "tmpfs" if can_mount_tmpfs() else "file-size limit"
    for name, tmpfs_size, file_limit in DISKS:
        for how in ("tmpfs", "file-size limit"):
            slow = name != "train" and how != default
            yield pytest.param(
                name, tmpfs_size, file_limit, how, marks=[pytest.mark.exhaustive] if slow else []
            )


@pytest.mark.parametrize("name,tmpfs_size,file_limit,how", list(full_disk_cases()))
def test_full_disk_is_one_line_and_leaves_no_partial_file(
    name, tmpfs_size, file_limit, how, inputs, tmp_path
):
    """tmpfs: the disk really fills (ENOSPC); file-size limit (RLIMIT_FSIZE, no root needed): a write fails
    with EFBIG once a file passes the limit, which the writers treat as a full disk."""
    w = writer(name, inputs)
    disk = tmp_path / "disk"
    with (small_disk if how == "tmpfs" else plain_folder)(disk, tmpfs_size):
        result = userpipe(w.command(disk / "out"), limit_file_size=file_limit if how != "tmpfs" else None)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(errors) == 1 and str(disk) in errors[0] and "needs about" in errors[0], result.stderr[
            -3000:
        ]
        partial = [
            p
            for p in disk.rglob("*")
            if p.name.endswith((".partial", ".tmp", ".lock"))
            or ".tmp-" in p.name
            or ".new-" in p.name
            or ".old-" in p.name
        ]
        assert not partial, partial
