"""Stores and shards on an object store: a real S3 endpoint on 127.0.0.1 (conftest's `s3_endpoint`, moto's
server), reached through fsspec with the credentials and address from the environment, as users reach
theirs. Every stage that reads a store reads it there; extract writes it there, resumes a run killed
mid-upload, and repairs a damaged object; shard writes there and completes what a killed run left; training
streams its shards from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import zarr
from kit import EXTRACT_COCO_GRID, log_scalars, run_cli, wait_for_first_done_chunk

pytestmark = pytest.mark.slow  # extractions and a training run

DEMO = ("--dataset", "demo", "--images", "48", "--chunk-size", "4", "--regions", "boxes")


def assert_same_store(ours: zarr.Group, theirs: zarr.Group, rtol: float = 1e-2) -> None:
    assert (
        ours.attrs["userpipe"]["complete"]
        and ours.attrs["userpipe"]["extractor"] == (theirs.attrs["userpipe"]["extractor"])
    )
    for split, group in theirs.groups():
        for name, array in group.arrays():
            values, expected = ours[split][name][:], array[:]
            if np.issubdtype(expected.dtype, np.floating) and rtol:  # thread counts differ: float sums too
                np.testing.assert_allclose(values, expected, rtol=rtol, atol=1e-3, err_msg=f"{split}/{name}")
            else:
                np.testing.assert_array_equal(values, expected, err_msg=f"{split}/{name}")


def objects(url: str) -> list[str]:
    filesystem = fsspec.filesystem("s3")
    filesystem.invalidate_cache()
    return filesystem.find(url.removeprefix("s3://"))


def test_a_store_extracted_to_s3_equals_a_local_one_and_every_stage_reads_it(
    runner, coco_root, bucket, tmp_path
):
    url, local = f"{bucket}/coco.zarr", tmp_path / "local.zarr"
    for out in (url, local):
        result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, "--clip", "none")
        assert result.exit_code == 0, result.output
    assert_same_store(zarr.open_group(url, mode="r"), zarr.open_group(str(local), mode="r"))
    verified = run_cli(runner, "verify", url)
    assert verified.exit_code == 0 and f"{url} OK, complete: crc32c of every chunk" in verified.output
    info = json.loads(run_cli(runner, "info", url, "--json").output)
    assert info["complete"] and info["objects"] == len(objects(url))  # the count info states is the real one
    # shards from a store at a URL: the same bytes as from the same store in a folder
    copy = f"{bucket}/copy.zarr"
    fsspec.filesystem("s3").put(str(local), copy.removeprefix("s3://"), recursive=True)
    for store, out in ((copy, tmp_path / "from-s3"), (local, tmp_path / "from-disk")):
        result = run_cli(
            runner, "shard", "--store", store, "--split", "train", "--out", out, "--workers", "1"
        )
        assert result.exit_code == 0, result.output
    manifests = [json.loads((tmp_path / f / "manifest.json").read_text()) for f in ("from-s3", "from-disk")]
    assert manifests[0]["params"]["source_store"] == copy
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    inside = run_cli(runner, "shard", "--store", copy, "--out", f"{copy}/shards")
    assert inside.exit_code == 2 and f"--out {copy}/shards lies inside the input {copy}" in inside.output
    # a store at a URL is never replaced (no rename there), and a URL is no output for other kinds
    again = run_cli(
        runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", url, "--clip", "none", "--overwrite"
    )
    assert again.exit_code == 2 and "cannot be replaced in one step" in again.output
    elsewhere = run_cli(
        runner, "export", "--store", local, "--split", "train", "--format", "npz", "--out", f"{bucket}/npz"
    )
    assert elsewhere.exit_code == 2 and "export is written to a local folder, not a URL" in elsewhere.output


def test_shards_written_to_s3_equal_a_folder_s_and_a_rerun_completes_what_a_killed_run_left(
    runner, trained, bucket, tmp_path
):
    url, local = f"{bucket}/shards", tmp_path / "shards"
    options = ("shard", "--store", trained.train_store, "--max-count", "8", "--workers", "1", "--out")
    for out in (url, local):
        result = run_cli(runner, *options, out)
        assert result.exit_code == 0, result.output
    s3 = fsspec.filesystem("s3")

    def key(name: str) -> str:
        return f"{url}/{name}".removeprefix("s3://")

    def assert_same_as_the_folder() -> None:  # every object byte for byte; no record or plan left behind
        names = sorted(p.name for p in local.iterdir())
        assert sorted(o.rsplit("/", 1)[-1] for o in objects(url)) == names
        for name in names:
            assert s3.cat_file(key(name)) == (local / name).read_bytes(), name

    assert_same_as_the_folder()
    verified = run_cli(runner, "verify", url)
    assert verified.exit_code == 0 and "5 shards OK (40 samples)" in verified.output
    # what a run killed part-way leaves (it writes the plan first, then each shard and its record, the
    # manifest last): shard 0 finished; shard 1 finished and since damaged; shard 2's record without its
    # object (removed since); shard 3 uploaded without its record; shard 4 not written
    manifest = json.loads((local / "manifest.json").read_text())
    s3.rm([key("manifest.json"), key("sizes.json"), key("train-000002.tar"), key("train-000004.tar")])
    s3.pipe_file(key(".plan.json"), json.dumps(manifest["params"]).encode())
    for record in manifest["shards"][:3]:
        s3.pipe_file(key(f".{record['name']}.json"), json.dumps(record).encode())
    damaged = bytearray(s3.cat_file(key("train-000001.tar")))
    damaged[1000] ^= 0xFF
    s3.pipe_file(key("train-000001.tar"), bytes(damaged))
    resumed = run_cli(runner, *options, url)
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "train-000001.tar: altered: its sha256 differs from the manifest; writing it again" in said
    assert f"train-000002.tar: cannot read a shard: {url}/train-000002.tar does not exist; writing" in said
    assert f"resuming {url}: 1 of 5 shards already written and verified" in resumed.output
    assert_same_as_the_folder()
    # shards of another plan are never replaced at a URL: there is no rename to keep them whole meanwhile
    for extra, expected in (
        ((), "holds shards of another plan; pass --overwrite"),
        (("--overwrite",), "--overwrite cannot replace shards at a URL"),
    ):
        other = run_cli(runner, *options, url, "--seed", "1", *extra)
        assert other.exit_code == 2 and expected in other.output, other.output
    assert_same_as_the_folder()


def test_eval_and_index_read_a_store_at_a_url_as_they_read_a_folder(runner, trained, bucket, tmp_path):
    url = f"{bucket}/gallery.zarr"
    fsspec.filesystem("s3").put(str(trained.gallery), url.removeprefix("s3://"), recursive=True)
    scores = []
    for store in (url, trained.gallery):
        result = run_cli(runner, "eval", "--run", trained.run, "--store", store, "--split", "test", "--json")
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.output))
    assert scores[0] == scores[1]
    result = run_cli(
        runner, "index", "--run", trained.run, "--store", url, "--split", "test", "--out", tmp_path / "i"
    )
    assert result.exit_code == 0, result.output
    manifest, theirs = (json.loads((f / "index.json").read_text()) for f in (tmp_path / "i", trained.index))
    assert manifest["store"] == url
    assert (manifest["num_images"], manifest["num_captions"]) == (
        theirs["num_images"],
        theirs["num_captions"],
    )


def test_an_extraction_to_s3_killed_mid_upload_resumes_and_a_damaged_object_is_repaired(
    runner, bucket, tmp_path
):
    """SIGKILL to the whole extraction once its first chunk is done (uploads in flight are cut: S3 keeps no
    part of an object whose upload did not finish); the rerun keeps what was done, extracts the rest, and
    the store equals a local run's. Then one object's bytes are altered: verify names it, a rerun
    re-extracts it."""
    root, local, url = tmp_path / "demo", tmp_path / "local.zarr", f"{bucket}/demo.zarr"
    assert run_cli(runner, "extract", *DEMO, "--root", root, "--out", local, "--workers", "1").exit_code == 0
    command = [sys.executable, "-m", "userpipe", "extract", *DEMO, "--root", str(root), "--out", url]
    job = subprocess.Popen(
        [*command, "--workers", "1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_first_done_chunk(job, url)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not zarr.open_group(url, mode="r").attrs["userpipe"]["complete"]
    resumed = run_cli(runner, "extract", *DEMO, "--root", root, "--out", url, "--workers", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "images already done" in resumed.output
    assert_same_store(zarr.open_group(url, mode="r"), zarr.open_group(str(local), mode="r"))
    shard = f"{url}/train/regions/c/1/0/0"
    filesystem = fsspec.filesystem("s3")
    data = bytearray(filesystem.cat_file(shard.removeprefix("s3://")))
    data[len(data) // 2] ^= 0xFF
    filesystem.pipe_file(shard.removeprefix("s3://"), bytes(data))
    damaged = run_cli(runner, "verify", url)
    assert damaged.exit_code == 1 and "train/regions chunk 1: damaged" in " ".join(damaged.output.split())
    repaired = run_cli(runner, "extract", *DEMO, "--root", root, "--out", url, "--workers", "1")
    assert repaired.exit_code == 0 and "extracting them again" in repaired.output, repaired.output
    assert run_cli(runner, "verify", url).exit_code == 0
    assert_same_store(zarr.open_group(url, mode="r"), zarr.open_group(str(local), mode="r"))


def test_training_streams_its_shards_from_s3_as_from_a_folder(runner, trained, bucket, tmp_path):
    fsspec.filesystem("s3").put(str(trained.shards), f"{bucket}/shards".removeprefix("s3://"), recursive=True)
    run = tmp_path / "run"
    result = run_cli(
        runner,
        "train",
        "--shards",
        f"{bucket}/shards/",
        "--val-store",
        trained.val,
        "--config",
        trained.config,
        "--out",
        run,
        "--set",
        "train.epochs=2",
    )
    assert result.exit_code == 0, result.output
    ours, theirs = log_scalars(run), log_scalars(trained.run)
    for tag in ("train/loss", "val/rsum"):
        assert [s for s, _ in ours[tag]] == [s for s, _ in theirs[tag]]
        np.testing.assert_allclose(
            [v for _, v in ours[tag]], [v for _, v in theirs[tag]], atol=1e-5, err_msg=tag
        )
    assert json.loads((run / "run.json").read_text())["data"]["shards"] == f"{bucket}/shards/"


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, "error: no Zarr store at s3://no-such-bucket/x.zarr"),
        (
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
            "error: the object store: EndpointConnectionError: Could not",
        ),
        (
            {
                "AWS_ACCESS_KEY_ID": None,
                "AWS_SECRET_ACCESS_KEY": None,
                "AWS_SHARED_CREDENTIALS_FILE": "/none",
            },
            "error: the object store: NoCredentialsError: Unable to locate credentials",
        ),
    ],
    ids=["no-store", "no-endpoint", "no-credentials"],
)
def test_an_object_store_that_cannot_answer_is_one_line(s3_endpoint, environment, expected):
    """In a process of its own, as a user's: the filesystem reads the environment once per process."""
    env = {
        k: v for k, v in {**os.environ, "AWS_CONFIG_FILE": "/none", **environment}.items() if v is not None
    }
    done = subprocess.run(
        [sys.executable, "-m", "userpipe", "info", "s3://no-such-bucket/x.zarr"],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), lines


def test_a_url_holding_someone_else_s_objects_is_refused_and_left_as_it_was(runner, coco_root, bucket):
    theirs = f"{bucket}/theirs.zarr"
    fsspec.filesystem("s3").pipe_file(
        f"{theirs}/notes.txt".removeprefix("s3://"), b"three years of field notes"
    )
    result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", theirs, "--clip", "none")
    assert result.exit_code == 2 and result.output.startswith(
        f"error: --out {theirs} holds objects that are not a userpipe store"
    ), result.output
    assert objects(theirs) == [f"{theirs.removeprefix('s3://')}/notes.txt"]
