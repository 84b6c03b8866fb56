"""Every stage quiet and beside one competing CPU-bound process: how much of its quiet throughput it keeps.

Stages: extract (the demo, the real command, one worker), shard (the real command), the training loader
(2 workers, a synthetic COCO-shaped store), a training step (the demo config, the loop's thread
adjustment), eval ranking (`retrieval_metrics` on 5,000 x 25,000) and search (faiss, 25,000 caption
queries against 5,000 images and back). Each measurement is a fresh process (`--stage NAME`), run three
ways, alternating over ROUNDS rounds: `before` (as userpipe ran until this policy: libgomp's default spin
count and a fixed thread count, the count it used), `quiet` (the policy of schemas/threads.py) and `loaded`
(the policy, beside `python -c 'while True: pass'`, started before the stage and stopped after it:
bench/report.py). A fair share of this 2-core machine beside one busy process is 50%. A second table
compares OpenMP spin counts (userpipe keeps libgomp's default). Results:
bench/results/contention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report

DATA = Path("data/bench-contention")
ROUNDS = 2
DEMO_IMAGES = 320
LOADER_IMAGES = 2000
EVAL_IMAGES = 5000


def _userpipe(*args: str) -> float:
    """Seconds of one `userpipe` command (its whole process: start, models, writes)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "userpipe", *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def demo_root() -> Path:
    from userpipe.pipeline.demo import ensure_demo

    return ensure_demo(DATA / f"demo-{DEMO_IMAGES}", images=DEMO_IMAGES)


def stage_extract() -> dict:
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        demo = [
            "--dataset",
            "demo",
            "--root",
            str(DATA / f"demo-{DEMO_IMAGES}"),
            "--images",
            str(DEMO_IMAGES),
        ]
        seconds = _userpipe("extract", *demo, "--out", str(Path(tmp) / "s.zarr"), "--workers", "1")
    return {"items": DEMO_IMAGES, "seconds": seconds, "unit": "images/s"}


def stage_shard() -> dict:
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        seconds = _userpipe("shard", "--store", str(DATA / "loader.zarr"), "--out", str(Path(tmp) / "shards"))
    return {"items": LOADER_IMAGES, "seconds": seconds, "unit": "images/s"}


def stage_loader() -> dict:
    from bench.loader_throughput import measure_streaming

    batch, pairs = 128, LOADER_IMAGES * 5
    with _shared():
        result = measure_streaming(str(DATA / "loader-shards"), pairs, batch, workers=2)
    return {"items": result["steady_batches_per_s"] * batch, "seconds": 1.0, "unit": "pairs/s"}


def stage_train() -> dict:
    from bench.train_throughput import measure

    with _shared():
        result = measure("demo", "userpipe", profiled=False)
    batch = 128
    return {"items": batch, "seconds": statistics.median(result["step_s"]), "unit": "pairs/s"}


def stage_ranking() -> dict:
    import numpy as np
    import torch

    from userpipe.trainer.evaluate import retrieval_metrics

    sims = torch.from_numpy(
        np.random.default_rng(0).standard_normal((EVAL_IMAGES, 5 * EVAL_IMAGES), np.float32)
    )
    with _shared():
        seconds = _median_of(7, lambda: retrieval_metrics(sims))
    return {"items": 1, "seconds": seconds, "unit": "rankings/s"}


def stage_search() -> dict:
    import faiss  # noqa: F401  (loaded before the share, as `userpipe search` has it when it searches)
    import numpy as np
    import torch

    from userpipe.retrieval.index import _flat_ip

    rng = np.random.default_rng(0)
    images, captions = (
        torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, 1024), np.float32)), dim=1)
        for n in (EVAL_IMAGES, 5 * EVAL_IMAGES)
    )
    with _shared():
        from userpipe.schemas import threads

        def both_ways():
            threads.adjust()
            _flat_ip(images).search(captions.numpy(), 10)
            _flat_ip(captions).search(images.numpy(), 10)

        seconds = _median_of(3, both_ways)
    return {"items": 6 * EVAL_IMAGES, "seconds": seconds, "unit": "queries/s"}


STAGES = {
    "extract": stage_extract,
    "shard": stage_shard,
    "loader": stage_loader,
    "train step": stage_train,
    "eval ranking": stage_ranking,
    "search": stage_search,
}


def _shared():
    from userpipe.schemas import threads

    return threads.sharing()


def _median_of(repeats: int, work) -> float:
    work()  # warm-up: first-call allocations, the thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare() -> None:
    """The inputs, once: the demo images, a synthetic COCO-shaped store and its shards."""
    from bench.loader_throughput import DIM, REGIONS
    from userpipe.pipeline.synthetic import write_synthetic_store

    DATA.mkdir(parents=True, exist_ok=True)
    demo_root()
    if not (DATA / "loader-shards" / "manifest.json").is_file():
        shutil.rmtree(DATA / "loader.zarr", ignore_errors=True)
        write_synthetic_store(
            DATA / "loader.zarr",
            LOADER_IMAGES,
            num_regions=REGIONS,
            feature_dim=DIM,
            clip_dim=512,
            captions_per_image=5,
            chunk_size=64,
        )
        _userpipe("shard", "--store", str(DATA / "loader.zarr"), "--out", str(DATA / "loader-shards"))


def measure(stage: str, settings: dict[str, str], loaded: bool) -> dict:
    """One fresh process of `stage` with these environment settings, alone or beside a busy process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env.update(settings)
    with report.beside_a_busy_process(loaded):
        out = subprocess.run(
            [sys.executable, "-m", "bench.contention", "--stage", stage],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"stage": stage, "rate": result["items"] / result["seconds"], **result}


def alternating(stages, conditions: dict[str, tuple[dict, bool]], rounds: int) -> list[dict]:
    """Every stage under every condition, the conditions alternating over the rounds (this machine's speed
    drifts between minutes)."""
    runs = []
    for stage in stages:
        for round_ in range(rounds):
            for name, (settings, loaded) in conditions.items():
                runs.append({**measure(stage, settings, loaded), "condition": name, "round": round_})
                print(runs[-1], flush=True)
    return runs


def medians(runs: list[dict], stage: str, conditions) -> dict[str, tuple[float, float, float]]:
    """condition -> (median, lowest, highest) rate of the stage's runs."""
    out = {}
    for condition in conditions:
        rates = [r["rate"] for r in runs if (r["stage"], r["condition"]) == (stage, condition)]
        out[condition] = (statistics.median(rates), min(rates), max(rates))
    return out


def _torch_default_threads() -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if "OMP" not in k},
    ).stdout
    return int(out)


SPIN_STAGES = ("extract", "train step")  # the ranking counts with numpy: no OpenMP barrier to spin at
SPIN_COUNTS = ("0", "30000", "300000")
LIBGOMP_SPIN_COUNT = "300000"  # libgomp's own default when no wait policy is set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child: one measurement
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--spin-rounds", type=int, default=1, help="rounds of the spin counts' table (0: none)"
    )
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(STAGES[args.stage]()))
        return
    prepare()
    fixed = str(_torch_default_threads())
    conditions = {
        "before": ({"GOMP_SPINCOUNT": LIBGOMP_SPIN_COUNT, "OMP_NUM_THREADS": fixed}, False),
        "quiet": ({}, False),
        "loaded": ({}, True),
    }
    runs = alternating(args.stages, conditions, args.rounds)
    rows, table = [], []
    for stage in args.stages:
        rate = medians(runs, stage, conditions)
        row = {
            "stage": stage,
            "unit": next(r["unit"] for r in runs if r["stage"] == stage),
            **{condition: [round(x, 3) for x in values] for condition, values in rate.items()},
            "kept_loaded": round(rate["loaded"][0] / rate["quiet"][0], 3),
            "quiet_vs_before": round(rate["quiet"][0] / rate["before"][0], 3),
        }
        rows.append(row)
        table.append(
            [
                stage,
                row["unit"],
                *(_cell(rate[c]) for c in conditions),
                f"{100 * row['kept_loaded']:.0f}%",
                f"{100 * (row['quiet_vs_before'] - 1):+.1f}%",
            ]
        )
    spin_runs, extra = [], []
    if args.spin_rounds:
        spin_runs, extra = spin_counts([s for s in SPIN_STAGES if s in args.stages], fixed, args.spin_rounds)
    result = {
        "benchmark": "every stage quiet and beside one busy process",
        **report.machine(),
        "runs": runs,
        "stages": rows,
        "spin_runs": spin_runs,
    }
    report.write(
        "contention",
        result,
        "Every stage quiet and beside one competing CPU-bound process",
        "Median (lowest–highest) of the rounds; each measurement a fresh process. `before`: libgomp's "
        "default spin count and torch's default thread count, fixed, as userpipe ran before its "
        "thread policy; `quiet` and `loaded`: the policy (schemas/threads.py), alone and beside "
        "`while True: pass`. Goals: loaded ≥ 45% of quiet (a fair share is 50%), quiet within 3% of before.",
        ["stage", "unit", "before", "quiet", "loaded", "loaded / quiet", "quiet vs before"],
        table,
        [(f"{r['stage']} beside one busy process", f"{100 * r['kept_loaded']:.0f}% of quiet") for r in rows],
        extra,
    )


def spin_counts(stages, fixed: str, rounds: int) -> tuple[list[dict], list[str]]:
    """Each spin count with the policy (quiet, loaded) and with a fixed thread count beside the load (what a
    user's OMP_NUM_THREADS or a deterministic run gets)."""
    conditions = {}
    for spin in SPIN_COUNTS:
        conditions[f"{spin} quiet"] = ({"GOMP_SPINCOUNT": spin}, False)
        conditions[f"{spin} loaded"] = ({"GOMP_SPINCOUNT": spin}, True)
        conditions[f"{spin} fixed loaded"] = ({"GOMP_SPINCOUNT": spin, "OMP_NUM_THREADS": fixed}, True)
    runs = alternating(stages, conditions, rounds)
    lines = [
        "",
        "## The spin count (GOMP_SPINCOUNT; libgomp's default, which userpipe keeps, is 300,000)",
        "",
        f"Rate, median (lowest–highest) of {rounds} round(s); `fixed`: {fixed} threads whatever the load, as "
        "with a user's OMP_NUM_THREADS or `--deterministic`.",
        "",
        "| stage | spin count | policy, quiet | policy, loaded | fixed, loaded |",
        "|---|---|---|---|---|",
    ]
    for stage in stages:
        rate = medians(runs, stage, conditions)
        for spin in SPIN_COUNTS:
            cells = (_cell(rate[f"{spin} {c}"]) for c in ("quiet", "loaded", "fixed loaded"))
            lines.append(f"| {stage} | {int(spin):,} | " + " | ".join(cells) + " |")
    return runs, lines


def _cell(rate: tuple[float, float, float]) -> str:
    return " ".join((_number(rate[0]), f"({_number(rate[1])}–{_number(rate[2])})"))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    main()
