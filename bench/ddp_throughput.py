"""Training in several processes on this CPU: the demo config's step on a global batch of 64 pairs, one
process with 2 threads against 2 processes (gloo, as torchrun starts them) with 1 thread each.

Each measurement runs in fresh processes, and the layouts alternate over rounds (this machine's speed drifts
between minutes). Reported: pairs/s over the measured steps, and for 2 processes the share of their step
spent communicating or waiting for each other: 1 - t(one process, 1 thread, the 32 pairs of one rank) /
t(2 processes, 64 pairs). Results: bench/results/ddp_throughput.{json,md}.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench import report

GLOBAL_BATCH, WARMUP, MEASURED, ROUNDS = 64, 3, 10, 3
LAYOUTS = {  # name: (processes, threads per process, pairs per process)
    "1 process x 2 threads": (1, 2, GLOBAL_BATCH),
    "2 processes x 1 thread (gloo)": (2, 1, GLOBAL_BATCH // 2),
    "1 process x 1 thread, one rank's 32 pairs": (1, 1, GLOBAL_BATCH // 2),
}


def synthetic_batch(step: int, config, pairs: int, rank: int):
    """Rank `rank`'s part of step `step`'s global batch: regions and captions of the demo's shapes."""
    import torch

    generator = torch.Generator().manual_seed(step)
    model = config.model
    regions = torch.randn(GLOBAL_BATCH, model.num_regions, model.feature_dim, generator=generator)
    tokens = torch.randint(1000, 20000, (GLOBAL_BATCH, 16), generator=generator)
    part = slice(rank * pairs, (rank + 1) * pairs)
    return SimpleNamespace(
        regions=regions[part].half(),
        region_lengths=torch.full((pairs,), model.num_regions),
        tokens=tokens[part],
        token_lengths=torch.full((pairs,), 16),
        image_index=torch.arange(GLOBAL_BATCH)[part] + step * GLOBAL_BATCH,
        clip_image=None,
    )


def measure(rank: int, world: int, threads: int, pairs: int, port: int, out: Path) -> None:
    """WARMUP + MEASURED steps of `trainer.step.train_step` on this rank; rank 0 writes the step times."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = "0"
    import torch

    from userpipe.trainer import distributed
    from userpipe.trainer.checkpoint import initial_model
    from userpipe.trainer.config import load_run_config
    from userpipe.trainer.step import Position, build_optimizer, train_step

    torch.set_num_threads(threads)
    device = distributed.start(distributed.world_from_environment())
    config = load_run_config("demo")
    model = initial_model(config).train()
    distributed.use_global_batch_statistics(model, config.train.global_batchnorm)
    trained = distributed.wrap(model, device)
    optimizer = build_optimizer(model, config.train)
    times = []
    for step in range(WARMUP + MEASURED):
        batch = synthetic_batch(step, config, pairs, rank)
        start = time.perf_counter()
        train_step(trained, optimizer, batch, config, device, Position())
        times.append(time.perf_counter() - start)
    if rank == 0:
        (out / "times.json").write_text(json.dumps(times[WARMUP:]))
    distributed.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(processes: int, threads: int, pairs: int) -> float:
    """The median step time of one fresh run of the layout."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        args = (processes, threads, pairs, free_port(), out)
        mp.start_processes(measure, args, nprocs=processes, start_method="spawn")
        return statistics.median(json.loads((out / "times.json").read_text()))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = []
    for round_ in range(ROUNDS):
        for name, (processes, threads, pairs) in LAYOUTS.items():
            seconds = run_layout(processes, threads, pairs)
            runs.append({"layout": name, "round": round_, "step_s": round(seconds, 4)})
            print(runs[-1], flush=True)
    step = {name: statistics.median(r["step_s"] for r in runs if r["layout"] == name) for name in LAYOUTS}
    one, two, alone = (step[name] for name in LAYOUTS)
    rows = [
        {"layout": name, "step_s": round(seconds, 4), "pairs_per_s": round(processes * pairs / seconds, 1)}
        for name, seconds in step.items()
        for processes, _, pairs in [LAYOUTS[name]]
    ]
    share = 1 - alone / two
    result = {
        "benchmark": f"demo config, global batch {GLOBAL_BATCH}, {MEASURED} measured steps per run",
        **report.machine(),
        "rows": rows,
        "communication_share": round(share, 3),
        "runs": runs,
    }
    report.write(
        "ddp_throughput",
        result,
        f"Several processes: {result['benchmark']}",
        f"Medians of {ROUNDS} alternating runs, each in fresh processes (`trainer.step.train_step`: "
        "forward, backward, clipping, AdamW; synthetic batches of the demo's shapes). The 2-process step "
        f"spends {share:.0%} of its time communicating or waiting: 1 - the third row's step / the second's.",
        ["layout", "step (s)", "pairs/s"],
        [[r["layout"], r["step_s"], f"{r['pairs_per_s']:,}"] for r in rows],
        [
            (
                "training step, demo, 1 process x 2 threads vs 2 gloo processes x 1 thread",
                f"{GLOBAL_BATCH / one:,.1f} vs {GLOBAL_BATCH / two:,.1f} pairs/s; communication "
                f"{share:.0%} of the 2-process step",
            )
        ],
    )


if __name__ == "__main__":
    main()
