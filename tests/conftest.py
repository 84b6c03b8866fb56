"""The tests' fixtures and hooks (their helpers are kit.py's): a COCO-layout dataset, the store → shards → run
chain and the session's trained run, and the output-protocol check on every in-process command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from crash.write_events import written_paths
from kit import Chain, Trained, karpathy_record, run_cli, write_chain, write_image, write_json
from typer.testing import CliRunner

from userpipe.trainer.process import quiet_model_loading, reproducible_cpu_math

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: fail at once instead of retrying for ~46 s
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run (slowly) on the CPU; a GPU run sets 0
reproducible_cpu_math()  # as `userpipe train` sets it, before any test's first matmul
quiet_model_loading()  # as every `userpipe` command does


@pytest.fixture
def one_thread(monkeypatch) -> None:
    """Commands run here and in subprocesses on one fixed thread (OMP_NUM_THREADS, the user's setting): for
    tests that compare bytes written by two runs. The adaptive count follows the machine's load, and a
    rerun beside another process would sum the same floats in another order."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


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


@pytest.fixture
def unclaimed_writes() -> list[str]:
    """The writes outside every claim caught so far in this test (a test that provokes one clears it)."""
    return UNCLAIMED_WRITES


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that starts a Dask LocalCluster in-process gets the nanny's OMP_NUM_THREADS=1 & co. written
    into os.environ; later subprocesses must not inherit it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """An S3-compatible endpoint on 127.0.0.1 (moto's server mode, as s3fs's own tests use), in a process of
    its own; the environment carries its address and credentials as users' does (AWS_ENDPOINT_URL, ...),
    for this process and every process the tests start."""
    import socket
    import subprocess
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while socket.socket().connect_ex(("127.0.0.1", port)):
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="userpipe-tests",
        AWS_SECRET_ACCESS_KEY="userpipe-tests",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.kill()
    server.wait()


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    """A new, empty bucket on the endpoint: its URL (s3://NAME)."""
    import hashlib

    import fsspec

    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """`chain(name, **options)`: kit's write_chain (a train store, its shards, a validation store, the tiny
    recipe and, with train=True, a run) in a new temporary folder named after `name`."""

    def make_chain(name: str = "chain", **options) -> Chain:
        return write_chain(tmp_path_factory.mktemp(name), **options)

    return make_chain


@pytest.fixture(scope="session")
def trained(chain) -> Trained:
    """A tiny run trained for 2 epochs on 40 images of 5 captions (validated on 8 `val` images), and an index
    of a 16-image `gallery` built with it."""
    from userpipe.pipeline.synthetic import write_synthetic_store

    made = chain("search", config_overrides={"train.epochs": 2}, train=True)
    gallery = write_synthetic_store(made.tmp / "gallery.zarr", 16, seed=2, split="test", invalid=(3,))
    index = made.tmp / "index"
    result = run_cli(
        CliRunner(), "index", "--run", made.run, "--store", gallery, "--split", "test", "--out", index
    )
    assert result.exit_code == 0, result.output
    return Trained(**vars(made), gallery=gallery, index=index)
