"""Reading a store's regions: the sharded layout of schema 1.2 (shards of 64 images, one chunk per image)
against the plain chunks of 64 images of 1.1, on the same synthetic split (3,200 images, 36 × 1,280
float16 regions, the demo's sizes).

Two access patterns: a whole-split scan in stored objects (what `shard`, `eval` and `index` do) and one
image alone (random access: an object store, a notebook). Both through the store reader every stage uses
(schemas/store_reader.py); best of 3 scans, 64 single images. Results: bench/results/store_reads.{json,md}.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import report
from userpipe.pipeline import store as writer
from userpipe.pipeline.synthetic import write_synthetic_store
from userpipe.schemas.store_reader import open_store, stored_rows

IMAGES, REGIONS, WIDTH, PER_OBJECT = 3200, 36, 1280, 64


def as_in_1_1(specs):
    return lambda *args: {name: s.model_copy(update={"inner": None}) for name, s in specs(*args).items()}


def measure(path: Path) -> dict:
    regions = open_store(path)[0]["train"]["regions"]
    rows, scans = stored_rows(regions), []
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, IMAGES, rows):
            regions[start : start + rows]
        scans.append(time.perf_counter() - started)
    started = time.perf_counter()
    for image in range(0, IMAGES, IMAGES // 64):
        regions[image]
    return {
        "scan_s": round(min(scans), 3),
        "one_image_ms": round((time.perf_counter() - started) / 64 * 1e3, 2),
    }


def main() -> None:
    layouts = {}
    sharded_specs = writer.split_array_specs
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent.parent / "data") as scratch:
        for layout, specs in (
            ("sharded (1.2)", sharded_specs),
            ("plain chunks (1.1)", as_in_1_1(sharded_specs)),
        ):
            writer.split_array_specs = specs
            try:
                path = write_synthetic_store(
                    Path(scratch) / f"{len(layouts)}.zarr",
                    IMAGES,
                    num_regions=REGIONS,
                    feature_dim=WIDTH,
                    chunk_size=PER_OBJECT,
                )
            finally:
                writer.split_array_specs = sharded_specs
            layouts[layout] = measure(path)
            print(layout, layouts[layout], flush=True)
    sharded, plain = layouts["sharded (1.2)"], layouts["plain chunks (1.1)"]
    result = {"benchmark": "store reads, sharded vs plain chunks", **report.machine(), "layouts": layouts}
    report.write(
        "store_reads",
        result,
        f"Reading regions: {IMAGES:,} images × {REGIONS} × {WIDTH:,} float16, {PER_OBJECT} images per object",
        "Through the store reader every stage uses; a whole-split scan in stored objects (best of 3) and one "
        "image alone (mean of 64).",
        ["layout", "whole split s", "one image ms"],
        [[name, m["scan_s"], m["one_image_ms"]] for name, m in layouts.items()],
        [
            (
                "one image, sharded vs plain",
                f"{plain['one_image_ms'] / sharded['one_image_ms']:.1f}x faster; a whole-split scan "
                f"{sharded['scan_s'] / plain['scan_s']:.1f}x the time",
            )
        ],
    )


if __name__ == "__main__":
    main()
