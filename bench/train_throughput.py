"""Training throughput of the demo config: (image, caption) pairs per second through the whole step
(streaming loader, model, UTO with queues, backward, AdamW, momentum update), on a synthetic store
with the demo's shapes (36 x 1280 regions, 5 captions per image). Results: bench/results/train_throughput.*
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.process import reproducible_cpu_math

reproducible_cpu_math()  # as `userpipe train` runs, before torch's first matmul

import torch  # noqa: E402

import report  # noqa: E402
from pipeline.synthetic import write_synthetic_store  # noqa: E402
from trainer.captions import CaptionTokenizer  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.loader import LoaderSettings, ShardSet, StreamingLoader  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.train import build_optimizer  # noqa: E402

STEPS, WARMUP = 30, 3


def main() -> None:
    config = load_run_config("demo")
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_store(
            Path(tmp) / "s.zarr", 1000, num_regions=36, feature_dim=1280, captions_per_image=5, chunk_size=64
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
                f"{tmp}/shards",
                "--max-count",
                "250",
                "--workers",
                "1",
            ],
            check=True,
            capture_output=True,
        )
        tokenizer = CaptionTokenizer.for_text_model(config.model.text_model, config.model.max_tokens)
        torch.manual_seed(0)
        model = build_model(config.model).train()
        optimizer = build_optimizer(model, config.train)
        loader = StreamingLoader(
            ShardSet.resolve(f"{tmp}/shards"),
            tokenizer,
            LoaderSettings(config.train.batch_size, workers=config.train.workers),
        )
        batches = loader.batches(epoch=0)
        for step in range(STEPS + WARMUP):
            if step == WARMUP:
                start = time.perf_counter()
            batch = next(batches)
            losses = model(
                batch.regions, batch.region_lengths, batch.tokens, batch.token_lengths, batch.image_index
            )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
        seconds = time.perf_counter() - start
    pairs = STEPS * config.train.batch_size
    result = {
        "benchmark": f"training steps of the demo config (batch {config.train.batch_size}, "
        f"text_layers {config.model.text_layers}, MKL_CBWR={os.environ['MKL_CBWR']})",
        **report.machine(),
        "steps": STEPS,
        "seconds": round(seconds, 1),
        "pairs_per_s": round(pairs / seconds, 1),
    }
    print(result)
    report.write(
        "train_throughput",
        result,
        result["benchmark"],
        "CPU, after 3 warm-up steps.",
        ["steps", "seconds", "pairs/s"],
        [[STEPS, result["seconds"], result["pairs_per_s"]]],
        [(f"training, demo config, MKL_CBWR={os.environ['MKL_CBWR']}", f"{result['pairs_per_s']} pairs/s")],
    )


if __name__ == "__main__":
    main()
