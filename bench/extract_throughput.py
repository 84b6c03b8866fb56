"""Throughput of `userpipe extract` on the demo dataset with 1 and 2 Dask workers.

Runs the real command end to end (cluster start, model loading, Zarr writes included) on a fresh
store for each worker count, and writes bench/results/extract_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--images", type=int, default=3200, help="demo images (default: the demo's default size)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from pipeline.demo import ensure_demo

    root = Path("data") / f"demo-bench-{args.images}"
    ensure_demo(root, images=args.images)
    userpipe = shutil.which("userpipe") or str(Path(sys.executable).parent / "userpipe")
    runs = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "demo.zarr"
            start = time.perf_counter()
            subprocess.run(
                [
                    userpipe,
                    "extract",
                    "--dataset",
                    "demo",
                    "--root",
                    str(root),
                    "--images",
                    str(args.images),
                    "--out",
                    str(out),
                    "--workers",
                    str(workers),
                ],
                check=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            seconds = time.perf_counter() - start
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        runs.append(
            {
                "workers": workers,
                "images": args.images,
                "seconds": round(seconds, 1),
                "images_per_s": round(args.images / seconds, 2),
                "store_mb": round(size / 1e6, 1),
            }
        )
        print(runs[-1])
    result = {
        "benchmark": "userpipe extract --dataset demo (boxes regions, efficientnet_lite0, imagenet global)",
        **report.machine(),
        "runs": runs,
    }
    report.write(
        "extract_throughput",
        result,
        result["benchmark"],
        "Wall time of the whole command (Dask cluster start and model loading included).",
        ["workers", "images", "seconds", "images/s", "store MB"],
        [[r["workers"], r["images"], r["seconds"], r["images_per_s"], r["store_mb"]] for r in runs],
        [
            (
                f"extract, {r['images']:,} demo images, {r['workers']} worker(s)",
                f"{r['images_per_s']} images/s",
            )
            for r in runs
        ],
    )


if __name__ == "__main__":
    main()
