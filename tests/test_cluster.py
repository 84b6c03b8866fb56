"""A real Dask cluster, started the way a cluster starts it: `dask scheduler` and two `dask worker`
processes on loopback, each a process of its own, with no folder to write in common: `extract --scheduler`
writes the store to the S3 endpoint (conftest's `s3_endpoint`). One worker is killed with SIGKILL once the
first chunk is done, and the store still ends complete and equal to the store a local run writes
(docs/reference.md, "`userpipe extract`": the same commands for a real cluster)."""

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
import zarr
from kit import run_cli, wait_for_first_done_chunk

pytestmark = pytest.mark.slow  # three Dask processes and two extractions

DEMO = ("--dataset", "demo", "--images", "48", "--chunk-size", "4", "--regions", "boxes")
BIN = Path(sys.executable).parent


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture
def cluster(tmp_path, s3_endpoint):
    """(scheduler address, the two worker processes, started with the endpoint's credentials in their
    environment); everything killed at the end."""
    info = tmp_path / "scheduler.json"
    scheduler = start(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(info),
        ],
        tmp_path / "scheduler.log",
    )
    deadline = time.monotonic() + 60
    while not info.is_file():
        assert scheduler.poll() is None and time.monotonic() < deadline, (
            tmp_path / "scheduler.log"
        ).read_text()
        time.sleep(0.1)
    time.sleep(0.2)  # written whole
    workers = [
        start(
            [
                str(BIN / "dask"),
                "worker",
                "--scheduler-file",
                str(info),
                "--nthreads",
                "1",
                "--no-dashboard",
                "--name",
                f"worker-{i}",
            ],
            tmp_path / f"worker-{i}.log",
        )
        for i in range(2)
    ]
    try:
        yield json.loads(info.read_text())["address"], workers
    finally:
        for process in [*workers, scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_extract_on_a_cluster_into_s3_survives_a_killed_worker_and_equals_a_local_run(
    runner, tmp_path, cluster, bucket
):
    from distributed import Client

    address, workers = cluster
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    root = tmp_path / "demo"
    local = tmp_path / "local.zarr"
    assert run_cli(runner, "extract", *DEMO, "--root", root, "--out", local, "--workers", "1").exit_code == 0
    remote = f"{bucket}/cluster.zarr"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "userpipe",
            "extract",
            *DEMO,
            "--root",
            str(root),
            "--out",
            remote,
            "--scheduler",
            address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wait_for_first_done_chunk(job, remote)
    assert workers[0].poll() is None and job.poll() is None  # mid-run, the worker alive
    os.killpg(workers[0].pid, signal.SIGKILL)  # the worker and its nanny, as a lost node
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert "Remove worker" in (tmp_path / "scheduler.log").read_text()  # the scheduler saw it go
    ours, theirs = zarr.open_group(remote, mode="r"), zarr.open_group(str(local), mode="r")
    assert ours.attrs["userpipe"]["complete"] and run_cli(runner, "verify", remote).exit_code == 0
    for split in ("train", "val", "test"):
        for name, array in theirs[split].arrays():
            values, expected = ours[split][name][:], array[:]
            if np.issubdtype(expected.dtype, np.floating):  # thread counts differ: float sums may too
                np.testing.assert_allclose(values, expected, rtol=1e-2, atol=1e-3, err_msg=f"{split}/{name}")
            else:
                assert np.array_equal(values, expected), f"{split}/{name}"
