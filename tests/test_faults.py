"""Results you can trust after a fault: non-finite numbers are refused, damaged stores and shards are
named, a resume is the same run, one writer per output, inputs that would block are invalid images.
(Kills and full disks at every writer: tests/test_crash.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from kit import EXTRACT_COCO_GRID, Chain, run_cli

from userpipe.schemas.errors import InputError, NonFiniteError
from userpipe.schemas.outputs import RUN, claim
from userpipe.trainer.evaluate import retrieval_metrics


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_metrics_refuse_non_finite_similarities_instead_of_ranking_them(bad):
    sims = torch.eye(4).repeat_interleave(5, dim=1) + 0.01 * torch.randn(4, 20)
    assert retrieval_metrics(sims)["rsum"] == 600
    sims[2, :] = bad  # one image's embedding is NaN: before, it ranked first everywhere
    with pytest.raises(
        NonFiniteError,
        match=r"20 of 80 similarities are non-finite .* in 1 of 4 images and 20 of "
        r"20 captions",
    ):
        retrieval_metrics(sims)


def test_a_non_finite_loss_or_gradient_stops_training_naming_the_step():
    from userpipe.trainer.step import Position, check_step_finite

    position = Position(epoch=1, step=3, global_step=17)  # in the second epoch, as messages count (from 1)
    check_step_finite(torch.tensor(0.5), torch.tensor(2.0), position)
    with pytest.raises(NonFiniteError, match=r"step 18 \(epoch 2\): loss nan"):
        check_step_finite(torch.tensor(math.nan), torch.tensor(2.0), position)
    with pytest.raises(NonFiniteError, match=r"step 18 \(epoch 2\): gradient norm inf"):
        check_step_finite(torch.tensor(0.5), torch.tensor(math.inf), position)


@pytest.fixture(scope="module")
def trained_run(chain) -> Chain:
    """A run of one epoch on 40 images of 1 to 5 captions (shards of 10), validated on 12 images."""
    return chain(
        "faults",
        captions_per_image=None,
        val_images=12,
        val_seed=2,
        config_overrides={"train.epochs": 1},
        train=True,
    )


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_nan_embeddings_make_eval_fail_instead_of_scoring(runner, trained_run, tmp_path):
    store = copy_store(trained_run.val, tmp_path / "val.zarr")
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.open_group(str(store), mode="r+")["val"]["regions"][5] = np.nan  # a valid image's features
    line = error_line(run_cli(runner, "eval", "--run", trained_run.run, "--store", store, "--split", "val"))
    assert "1 of 12 image embeddings and 0 of" in line and "non-finite" in line


# --------------------------------------------------------------------------- damaged stores


@pytest.mark.slow
def test_a_missing_or_cut_chunk_is_named_by_every_reader_and_repaired_by_extract(
    runner, trained_run, tmp_path
):
    store = copy_store(trained_run.val, tmp_path / "val.zarr")
    chunk = store / "val" / "regions" / "c" / "1" / "0" / "0"
    chunk.unlink()
    info = run_cli(runner, "info", store)
    assert info.exit_code == 0 and "1 chunk file(s) missing (val/regions[1])" in info.output
    verified = run_cli(runner, "verify", store)
    assert verified.exit_code == 1 and "val/regions chunk 1: missing" in verified.output
    line = error_line(run_cli(runner, "eval", "--run", trained_run.run, "--store", store, "--split", "val"))
    assert "chunk 1 (rows 4-7) of array 'val/regions' is missing" in line and "rerun userpipe extract" in line
    shard = ("shard", "--store", store, "--split", "val", "--out", tmp_path / "shards", "--workers", "1")
    line = error_line(run_cli(runner, *shard))
    assert "chunk 1 of array 'val/regions' is missing" in line and "rerun userpipe extract" in line
    assert not (tmp_path / "shards").exists()

    boxes = store / "val" / "boxes" / "c" / "2" / "0" / "0"
    boxes.write_bytes(boxes.read_bytes()[: boxes.stat().st_size // 2])
    verified = run_cli(runner, "verify", store)
    cut = "damaged (the shard's index: crc32c differs)"  # a shard (1.2) ends in its index: cut, it is lost
    assert verified.exit_code == 1 and f"val/boxes chunk 2: {cut}" in verified.output
    assert "val/regions chunk 1: missing" in verified.output
    shutil.copy(trained_run.val / "val" / "regions" / "c" / "1" / "0" / "0", chunk)
    line = error_line(run_cli(runner, *shard))
    assert f"chunk 2 (rows 8-11) of array 'val/boxes' is {cut}" in line
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte changed: the index checksum's last
    line = error_line(run_cli(runner, "eval", "--run", trained_run.run, "--store", store, "--split", "val"))
    assert f"chunk 1 (rows 4-7) of array 'val/regions' is {cut}" in line


@pytest.mark.slow
def test_an_extract_rerun_re_extracts_damaged_chunks_to_the_same_bytes(runner, coco_root, tmp_path):
    args = (*EXTRACT_COCO_GRID, "--root", coco_root, "--clip", "imagenet:efficientnet_lite0")
    out = tmp_path / "coco.zarr"
    assert run_cli(runner, *args, "--out", out).exit_code == 0
    reference = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "train" / "regions" / "c" / "1" / "0" / "0").unlink()
    cut = out / "test" / "clip_image" / "c" / "0" / "0"
    cut.write_bytes(cut.read_bytes()[:10])
    (out / "val" / "caption_text" / "c" / "0").write_bytes(b"\0" * 40)  # an array the dataset index gives
    result = run_cli(runner, *args, "--out", out)
    assert result.exit_code == 0 and "3 missing or damaged chunk(s)" in result.output, result.output
    assert {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    } == reference
    assert run_cli(runner, "verify", out).exit_code == 0


# --------------------------------------------------------------------------- damaged shards


def test_train_refuses_a_shard_set_that_differs_from_its_manifest(runner, trained_run, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(trained_run.shards, shards)
    first = sorted(shards.glob("*.tar"))[0]
    args = ("train", "--shards", shards, "--val-store", trained_run.val, "--config", trained_run.config)
    first.write_bytes(first.read_bytes() + b"\0" * 512)
    line = error_line(run_cli(runner, *args, "--out", tmp_path / "a"))
    assert first.name in line and "bytes" in line and "cut or altered" in line
    first.unlink()
    line = error_line(run_cli(runner, *args, "--out", tmp_path / "b"))
    assert f"{first} is missing" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_sample_with_an_extra_member_or_another_dtype_is_named(tmp_path):
    import io

    from userpipe.pipeline.shard_io import decode_sample
    from userpipe.schemas.shard import SampleError

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    meta = {
        "image_id": "a",
        "split": "train",
        "index": 0,
        "file": "a.jpg",
        "width": 1,
        "height": 1,
        "num_regions": 2,
        "num_captions": 1,
    }
    raw = {
        "__key__": "000000000",
        "__url__": "s.tar",
        "regions.npy": npy(np.zeros((2, 8), np.float16)),
        "boxes.npy": npy(np.zeros((2, 4), np.float32)),
        "captions.json": b'["x"]',
        "meta.json": json.dumps(meta).encode(),
    }
    fields = ("regions.npy", "boxes.npy", "captions.json", "meta.json")
    assert decode_sample(raw, fields, 8).meta.image_id == "a"
    with pytest.raises(SampleError, match="sample 000000000 in s.tar: unexpected member extra.txt"):
        decode_sample({**raw, "extra.txt": b"x"}, fields, 8)
    with pytest.raises(SampleError, match="no clip_image.npy member"):
        decode_sample(raw, (*fields, "clip_image.npy"), 8)
    with pytest.raises(SampleError, match="regions.npy is float32, not float16"):
        decode_sample({**raw, "regions.npy": npy(np.zeros((2, 8), np.float32))}, fields, 8)
    with pytest.raises(SampleError, match="regions are 8-d, the manifest's store has 16-d"):
        decode_sample(raw, fields, 16)


# --------------------------------------------------------------------------- resume is the same run


@pytest.mark.slow
def test_resume_refuses_another_recipe_or_shard_set_unless_the_change_is_recorded(
    runner, trained_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run, symlinks=True)
    base = (
        "train",
        "--shards",
        trained_run.shards,
        "--val-store",
        trained_run.val,
        "--config",
        trained_run.config,
        "--out",
        run,
        "--resume",
    )
    line = error_line(run_cli(runner, *base, "--set", "train.batch_size=4"))
    assert "train.batch_size 8 -> 4" in line and "--allow-change" in line
    other = tmp_path / "other-shards"
    assert (
        run_cli(
            runner,
            "shard",
            "--store",
            trained_run.train_store,
            "--out",
            other,
            "--max-count",
            "7",
            "--workers",
            "1",
        ).exit_code
        == 0
    )
    line = error_line(run_cli(runner, *base[:2], other, *base[3:]))
    assert f"shards {trained_run.shards} -> {other}" in line
    line = error_line(run_cli(runner, *base, "--set", "model.embed_dim=32"))
    assert "another model configuration (model.embed_dim 16 -> 32)" in line

    steps_before = sum('"loss"' in x for x in (run / "log.jsonl").read_text().splitlines())
    extended = run_cli(runner, "train", "--out", run, "--resume", "--set", "train.epochs=2", "--allow-change")
    assert extended.exit_code == 0, extended.output
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    record = json.loads((run / "run.json").read_text())
    assert record["changes"] == [{"step": steps_before, "fields": {"train.epochs": [1, 2]}}]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"step": steps_before, "epoch": 1, "change": {"train.epochs": [1, 2]}} in log
    assert sum("loss" in r for r in log) == 2 * steps_before


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_and_a_torn_log_line_is_dropped(
    runner, trained_run, tmp_path
):
    run = tmp_path / "run"
    args = (
        "train",
        "--shards",
        trained_run.shards,
        "--val-store",
        trained_run.val,
        "--config",
        trained_run.config,
        "--out",
        run,
    )
    run.mkdir()
    shutil.copy(trained_run.run / "config.json", run / "config.json")
    (run / "log.jsonl").write_text('{"step": 0, "epoch": 0, "val": {}}\n{"step": 1, "ep')
    (run / "checkpoints" / ".e000-s000000.partial").mkdir(parents=True)  # a save killed part-way
    result = run_cli(runner, *args)
    assert result.exit_code == 0 and "no checkpoint yet: starting it again" in result.output, result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "e001-s000000", "last"]

    log = run / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 99, "lo')  # a kill while appending
    assert run_cli(runner, *args, "--resume", "--set", "train.epochs=1").exit_code == 0
    assert log.read_text().endswith("\n") and '"step": 99' not in log.read_text()


# --------------------------------------------------------------------------- one writer per output


@pytest.mark.parametrize("command", ["extract", "shard", "train", "index"])
def test_a_second_writer_is_refused_naming_the_holder(runner, trained_run, tmp_path, command):
    out = tmp_path / "out"
    args = {
        "extract": (
            "extract",
            "--dataset",
            "demo",
            "--images",
            "8",
            "--root",
            tmp_path / "demo",
            "--out",
            out,
            "--workers",
            "1",
        ),
        "shard": ("shard", "--store", trained_run.train_store, "--out", out, "--workers", "1"),
        "train": (
            "train",
            "--shards",
            trained_run.shards,
            "--val-store",
            trained_run.val,
            "--config",
            trained_run.config,
            "--out",
            out,
        ),
        "index": (
            "index",
            "--run",
            trained_run.run,
            "--store",
            trained_run.val,
            "--split",
            "val",
            "--out",
            out,
        ),
    }[command]
    with claim(out, RUN):  # another writer (the kind does not matter to the lock)
        line = error_line(run_cli(runner, *args))
    assert f"--out {out} is being written by process {os.getpid()}" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# --------------------------------------------------------------------------- inputs that would block


@pytest.mark.slow
def test_fifos_directories_and_symlink_loops_are_invalid_images_not_hangs(runner, coco_root, tmp_path):
    images = coco_root / "images"
    fifo = images / "train2014" / "COCO_train2014_000000000101.jpg"
    fifo.unlink()
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    loop = images / "val2014" / "COCO_val2014_000000000105.jpg"
    loop.unlink()
    loop.symlink_to(loop.name)
    folder = images / "val2014" / "COCO_val2014_000000000107.jpg"
    folder.unlink()
    folder.mkdir()
    out = tmp_path / "coco.zarr"
    result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, "--clip", "none")
    assert result.exit_code == 1 and "3 image(s) could not be used" in result.output, result.output
    from userpipe.schemas.store_reader import open_store

    _, attrs = open_store(out)
    reasons = {f.file.rsplit("/", 1)[-1]: f.error for f in attrs.failures}
    assert "is a FIFO, not an image file" in reasons[fifo.name]
    assert "Too many levels of symbolic links" in reasons[loop.name]
    assert "is a directory, not an image file" in reasons[folder.name]


def test_an_unreadable_images_reason_names_its_path_and_not_the_runs_file_descriptors(tmp_path):
    """A reason is stored in the store's attributes, so it must not depend on which descriptor the run
    happened to get (a resumed store is compared byte for byte)."""
    from userpipe.pipeline.features import load_image

    rng = np.random.default_rng(0)
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"not an image\n",
        "noise.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "png_magic_only.png": b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 64, dtype=np.uint8).tobytes(),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)

    def reasons() -> dict[str, str]:
        out = {}
        for name in bad:
            with pytest.raises(OSError) as caught:
                load_image(str(tmp_path / name))
            out[name] = str(caught.value)
        return out

    first = reasons()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(7)]  # shifts the next descriptor numbers
    try:
        assert reasons() == first
    finally:
        for descriptor in held:
            os.close(descriptor)
    for name, reason in first.items():
        assert str(tmp_path / name) in reason and "name=" not in reason, reason


def test_checkpoint_recovery_finishes_a_half_switched_save_and_touches_only_its_own_names(tmp_path):
    from userpipe.trainer.checkpoint import CHECKPOINTS, recover

    folder = tmp_path / "run" / CHECKPOINTS
    for name in ("e001-s000000", "e002-s000000", "e002-s000004", ".e003-s000000.partial"):
        (folder / name).mkdir(parents=True)
    (folder / "e002-s000000" / "BEST").touch()
    (folder / "last").symlink_to("e002-s000000")
    (folder / "best").symlink_to("e001-s000000")  # killed after switching last, before switching best
    (folder / "my-notes.txt").write_text("mine")
    (folder / "legacy-last").mkdir()  # unreferenced: an earlier layout's state that a save replaced
    recover(tmp_path / "run")
    assert os.readlink(folder / "last") == os.readlink(folder / "best") == "e002-s000000"
    assert sorted(p.name for p in folder.iterdir()) == ["best", "e002-s000000", "last", "my-notes.txt"]

    old_layout = tmp_path / "old" / CHECKPOINTS / "last"
    old_layout.mkdir(parents=True)
    (old_layout / "state.pt").write_bytes(b"state")
    recover(tmp_path / "old")
    assert os.readlink(old_layout) == "legacy-last" and (old_layout / "state.pt").read_bytes() == b"state"


def test_a_log_line_that_parses_but_lost_a_field_is_refused_in_one_line(tmp_path):
    """A flipped byte can keep a line valid JSON but rename a key ("queue" -> "qteue"): refused, naming the
    line, before a resume writes anything or plots from it (found by the fuzz test)."""
    from userpipe.trainer.run_dir import JsonLog

    step = {"step": 1, "epoch": 0, "lr": 1e-3, "loss": 0.5, "batch": 0.2, "queue": 0.3, "samples_per_s": 9.0}
    val = {
        "step": 1,
        "epoch": 1,
        "val": {side: dict.fromkeys(("r1", "r5", "r10", "medr", "meanr"), 1.0) for side in ("i2t", "t2i")}
        | {"rsum": 6.0},
    }
    start = {"step": 0, "epoch": 0, "start_score": -0.08, "text_negated": True}
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(record) + "\n" for record in (start, step, val)))
    assert JsonLog(log).records() == [start, step, val]
    for broken, message in [
        ({**start, "start_score": 3.0}, "line 1: start_score"),  # a cosine
        ({**step, "qtueue": step["queue"]} | {"queue": None}, "line 1: queue"),
        ({k: v for k, v in step.items() if k != "queue"} | {"qtueue": 0.3}, "line 1: queue"),
        ({"step": 1, "epoch": 0, "lr": 1e-3}, "line 1 is not a log record"),
        ({**step, "val": val["val"]}, "line 1 is not a log record"),
    ]:
        log.write_text(json.dumps(broken) + "\n" + json.dumps(val) + "\n")
        with pytest.raises(InputError, match=message):
            JsonLog(log).records()
