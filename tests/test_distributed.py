"""Several processes (gloo on the CPU): one global batch for the loss, equal queues and keys on every rank."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from kit import Chain, run_cli
from test_model import tiny_bert, tiny_config
from typer.testing import CliRunner

from userpipe.trainer import distributed
from userpipe.trainer.model import build_model
from userpipe.trainer.step import matching_score

PAIRS, STEPS = 8, 2  # the global batch, split over the ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """A global batch of PAIRS pairs (two captions of image 3: a same-image pair across the ranks)."""
    generator = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(2, 7, (PAIRS,), generator=generator)
    regions = torch.randn(PAIRS, 6, 12, generator=generator)
    regions *= (torch.arange(6) < lengths[:, None])[..., None]
    token_lengths = torch.randint(3, 9, (PAIRS,), generator=generator)
    tokens = torch.randint(5, 100, (PAIRS, 8), generator=generator)
    tokens *= torch.arange(8) < token_lengths[:, None]
    ids = torch.arange(PAIRS) + 10 * step
    ids[PAIRS // 2] = ids[0]
    return dict(regions=regions, lengths=lengths, tokens=tokens, token_lengths=token_lengths, ids=ids)


def run_steps(rank: int, world: int, port: int, out: Path, mask_false_negatives: bool) -> None:
    """STEPS training steps of a tiny USER (no dropout) on this rank's part of each global batch."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    device = distributed.start(distributed.world_from_environment())
    bert = tiny_bert()
    bert.config.hidden_dropout_prob = bert.config.attention_probs_dropout_prob = 0.0
    for module in bert.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    config = tiny_config(dropout=0.0, queue_size=32, mask_false_negatives=mask_false_negatives)
    model = build_model(config, bert).train()
    distributed.use_global_batch_statistics(model, True)
    trained = distributed.wrap(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam would magnify the rounding of ~0 gradients
    part = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    first = {name: value[part] for name, value in global_batch(0).items()}
    first = SimpleNamespace(**first, region_lengths=first["lengths"])
    # train.align_start's measure: the global batch's, the same on every rank
    start_score = matching_score(model, first, device)
    steps = []
    for step in range(STEPS):
        batch = {name: value[part] for name, value in global_batch(step).items()}
        losses = trained(
            batch["regions"], batch["lengths"], batch["tokens"], batch["token_lengths"], batch["ids"]
        )
        optimizer.zero_grad()
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        steps.append({"loss": losses["loss"].detach(), "grads": grads})
        optimizer.step()
    torch.save(
        {"steps": steps, "state": model.state_dict(), "start": start_score}, out / f"{world}-{rank}.pt"
    )
    distributed.stop()


def test_two_ranks_train_as_one_process_on_the_global_batch(tmp_path):
    """With the same-image mask on, which reads the global batch's image ids (two captions of one image
    sit on different ranks); everything else is the path without it."""
    threads = torch.get_num_threads()
    try:
        run_steps(0, 1, 0, tmp_path, True)  # in this process: one thread, as each rank has
    finally:
        torch.set_num_threads(threads)  # later tests compare numbers computed with the suite's threads
    mp.start_processes(run_steps, (2, free_port(), tmp_path, True), nprocs=2, start_method="spawn")
    one, ranks = torch.load(tmp_path / "1-0.pt"), [torch.load(tmp_path / f"2-{r}.pt") for r in range(2)]
    assert ranks[0]["start"] == ranks[1]["start"] == pytest.approx(one["start"], abs=1e-6)
    for step, (alone, together) in enumerate(zip(one["steps"], ranks[0]["steps"], strict=True)):
        assert together["loss"].item() == pytest.approx(alone["loss"].item(), rel=1e-5), step
        assert together["grads"].keys() == alone["grads"].keys()
        scale = max(grad.abs().max().item() for grad in alone["grads"].values())
        for name, grad in alone["grads"].items():  # relative to the step's gradient scale: some are ~0
            error = (together["grads"][name] - grad).abs().max().item()
            assert error <= 1e-5 * scale, (step, name, error, scale)
    # every rank holds the same queues, BatchNorm statistics and weights, keys included, to the bit
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    queue = ranks[0]["state"]["text_queue.ids"]
    assert (queue >= 0).sum() == STEPS * PAIRS  # every rank pushed the global batch's keys
    torch.testing.assert_close(ranks[0]["state"]["image_queue.keys"], one["state"]["image_queue.keys"])


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


# restarts need torchrun's rendezvous store kept apart from the process group's (pytorch#135712)
TORCHRUN_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def torchrun_inputs(chain) -> Chain:
    """Shards of 30 images (3 shards; an epoch is ~18 steps at batch 8), a validation store, a tiny config."""
    return chain("torchrun", images=30, config_overrides={"train.epochs": 1, "train.val_every": 4})


def train_command(inputs: Chain, run: Path, *torchrun_options: str) -> list[str]:
    options = ["--shards", inputs.shards, "--val-store", inputs.val, "--config", inputs.config]
    return torchrun(*torchrun_options, "-m", "userpipe", "train", *map(str, [*options, "--out", run]))


def killed_midway(command: list[str], run: Path) -> subprocess.Popen:
    """Start `command`; once a checkpoint is saved and a few more steps are logged, SIGKILL rank 1."""
    output = open(run.with_suffix(".out"), "w")  # noqa: SIM115 - the process writes it until it ends
    group = subprocess.Popen(
        command, env={**os.environ, **TORCHRUN_ENV}, stdout=output, stderr=subprocess.STDOUT
    )
    wait_for_a_checkpoint(run, {group: run.with_suffix(".out")})
    for child in psutil.Process(group.pid).children(recursive=True):
        if child.environ().get("RANK") == "1" and "userpipe" in " ".join(child.cmdline()):
            child.kill()
            return group
    pytest.fail("rank 1 was not found among torchrun's processes")


def wait_for_a_checkpoint(run: Path, launched: dict[subprocess.Popen, Path]) -> None:
    """Return once `run` has a checkpoint and 6 logged steps, every launch (process: its output) alive."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for process, output in launched.items():
            assert process.poll() is None, output.read_text()[-3000:]
        log = run / "log.jsonl"
        steps = log.read_text().count('"loss"') if log.is_file() else 0
        if (run / "checkpoints" / "last").exists() and steps >= 6:
            return
        time.sleep(0.2)
    pytest.fail(f"{run} saved no checkpoint in time")


def logged_steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def userpipe(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "userpipe", *map(str, args)]
    return subprocess.run(command, env={**os.environ, **TORCHRUN_ENV}, capture_output=True, text=True)


def launch(command: list[str], cwd: Path, output: Path) -> subprocess.Popen:
    """One torchrun launch (a "node") writing its output to `output`."""
    log = open(output, "w")  # noqa: SIM115 - the process writes it until it ends
    env = {**os.environ, **TORCHRUN_ENV}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def single_node_run(torchrun_inputs, tmp_path_factory) -> Path:
    """torchrun, 2 gloo processes on one node: rank 1 killed (SIGKILL) mid-run, then `--resume` finishes."""
    run = tmp_path_factory.mktemp("single-node") / "run"
    group = killed_midway(train_command(torchrun_inputs, run), run)
    assert group.wait(timeout=240) != 0
    resumed = subprocess.run(
        [*train_command(torchrun_inputs, run), "--resume"],
        env={**os.environ, **TORCHRUN_ENV},
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return run


@pytest.mark.slow
def test_torchrun_resumes_after_a_rank_is_killed(torchrun_inputs, single_node_run):
    """Each step logged once after the resume; `userpipe eval` loads the run; one process may not resume
    what two trained."""
    steps = logged_steps(single_node_run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 6  # none twice, none missing
    runner = CliRunner()
    evaluated = run_cli(
        runner, "eval", "--run", single_node_run, "--store", torchrun_inputs.val, "--split", "val"
    )
    assert evaluated.exit_code == 0 and "RSUM" in evaluated.output, evaluated.output
    alone = run_cli(runner, "train", "--out", single_node_run, "--resume")
    assert alone.exit_code == 2 and "trained by 2 process(es); resume it with 2" in alone.output


@pytest.mark.slow
def test_two_nodes_without_a_shared_folder_train_as_one_and_resume_after_a_node_is_killed(
    torchrun_inputs, single_node_run, tmp_path
):
    """`torchrun --nnodes 2` as two launches on loopback, each in its own folder (node 0 holds the
    validation store and writes the run; node 1 only the config), the shards served over http from a third
    folder. Node 1 is killed (SIGKILL to all its processes) after a checkpoint; both launches again with
    --resume finish the run, which equals the one-node run of the same global batch step by step."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        shutil.copy(torchrun_inputs.config, node / "tiny.yaml")
    shutil.copytree(torchrun_inputs.val, nodes[0] / "val.zarr")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            torchrun_inputs.shards,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        shards = f"http://127.0.0.1:{port}/"

        def node_command(rank: int, master_port: int, *extra: str) -> list[str]:
            launch_options = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)]
            launch_options += ["--master_addr", "127.0.0.1", "--master_port", str(master_port)]
            train = ["--shards", shards, "--val-store", "val.zarr", "--config", "tiny.yaml", "--out", "run"]
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *launch_options,
                "-m",
                "userpipe",
                "train",
                *train,
                *extra,
            ]

        master = free_port()
        outputs = [tmp_path / f"node{r}.out" for r in range(2)]
        first = [
            launch(node_command(r, master), n, out)
            for r, (n, out) in enumerate(zip(nodes, outputs, strict=True))
        ]
        wait_for_a_checkpoint(nodes[0] / "run", dict(zip(first, outputs, strict=True)))
        killed = psutil.Process(first[1].pid)  # node 1; torchrun starts its workers in sessions of their own
        for process in [killed, *killed.children(recursive=True)]:
            process.kill()
        for launched in first:
            assert launched.wait(timeout=240) != 0
        master = free_port()
        again = [
            launch(node_command(r, master, "--resume"), n, tmp_path / f"node{r}.resumed.out")
            for r, n in enumerate(nodes)
        ]
        for r, launched in enumerate(again):
            assert launched.wait(timeout=240) == 0, (tmp_path / f"node{r}.resumed.out").read_text()[-3000:]
    finally:
        server.kill()
        server.wait()
    assert "resuming" in (tmp_path / "node0.resumed.out").read_text()
    assert not (nodes[1] / "run").exists()  # node 1 wrote nothing: no folder is shared
    two, one = (_records(r) for r in (nodes[0] / "run", single_node_run))
    assert [r["step"] for r in two if "loss" in r] == [r["step"] for r in one if "loss" in r]
    for a, b in zip(two, one, strict=True):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        if "val" in a:
            assert a["val"]["rsum"] == pytest.approx(b["val"]["rsum"], abs=1e-3), a["step"]


def _records(run: Path) -> list[dict]:
    """The log's steps and validations (a resume's `change` and warning lines left out)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r or "val" in r]


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused_before_any_work(
    torchrun_inputs, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "start", lambda world: torch.device("cpu"))  # rank 0 alone, no group
    out = tmp_path / "odd"
    options = ["--shards", torchrun_inputs.shards, "--val-store", torchrun_inputs.val]
    result = run_cli(
        CliRunner(),
        "train",
        *options,
        "--config",
        torchrun_inputs.config,
        "--out",
        out,
        "--set",
        "train.batch_size=7",
    )
    assert (
        result.exit_code == 2
        and "train.batch_size=7 (the global batch) must give each of 2 processes an equal share"
        in result.output
    )
    assert not out.exists()


@pytest.mark.exhaustive
def test_torchrun_restarts_a_killed_group_that_resumes_by_itself(torchrun_inputs, tmp_path):
    """With --max-restarts, torchrun starts the group again after rank 1's SIGKILL, and it resumes its run
    by itself: every step logged once."""
    run = tmp_path / "restarted"
    group = killed_midway(train_command(torchrun_inputs, run, "--max-restarts", "1"), run)
    assert group.wait(timeout=240) == 0, run.with_suffix(".out").read_text()[-3000:]
    assert "resuming" in run.with_suffix(".out").read_text()
    steps = logged_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 6
