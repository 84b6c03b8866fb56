"""`userpipe train`: streaming batches → USER → UTO → AdamW, with validation, checkpoints and logs.

One loop, nanoGPT-style. The run directory holds:
  config.json              the resolved RunConfig
  run.json                 RunRecord: the data it reads (shard set by content) and any change a resume made
  log.jsonl                one line per step ({"step", "epoch", "loss", "batch", "queue", "lr", ...,
                           "same_image_batch", "same_image_queue": the order's false negatives per query})
                           and per validation ({"val": {...metrics}}); "epoch" is the number of epochs
                           completed when the line was written: a step's counts from 0 (the step is in
                           epoch "epoch" + 1 as messages count), the validation at an epoch's end
                           carries that epoch's number
  checkpoints/             states, and the links last and best to them (trainer/checkpoint.py)
  training.md, loss.png, val_rsum.png   written at the end
Progress: rich's bar on a terminal; elsewhere (a log file, which the bar leaves empty) a plain line every
PROGRESS_SECONDS (env USERPIPE_PROGRESS_SECONDS) and one at each epoch's end, from rank 0 only.
A run killed at any point resumes (`--resume`) from its last checkpoint and, since data order,
augmentation and dropout are all seeded, ends where the uninterrupted run would have; one killed before
its first checkpoint starts again. A resume must use the run's recipe and data, or say so
(`--allow-change`, recorded). A non-finite loss, gradient or validation stops the run (NonFiniteError).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import RUN, Output, check_free_space, claim, write_text_atomic
from userpipe.schemas.run import RUN_RECORD_NAME, RunConfig
from userpipe.schemas.sources import is_remote
from userpipe.trainer import checkpoint, distributed
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import CHECKPOINTS, initial_model
from userpipe.trainer.config import load_run_config, parse_overrides
from userpipe.trainer.data_order import same_image_counts
from userpipe.trainer.distributed import World
from userpipe.trainer.encode import embedding_metrics, encode_split, open_split
from userpipe.trainer.evaluate import with_sizes
from userpipe.trainer.loader import LoaderSettings, StreamingLoader
from userpipe.trainer.model import USER
from userpipe.trainer.process import keep_freed_memory, reproducible_cpu_math
from userpipe.trainer.progress import PROGRESS_SECONDS, TrainingProgress, progress_seconds
from userpipe.trainer.run_dir import LOG_NAME, JsonLog, Start, resume_inputs, run_data, start_run
from userpipe.trainer.shard_set import ShardSet
from userpipe.trainer.step import Position, build_optimizer, learning_rate, train_step
from userpipe.trainer.training_page import validation_sizes, write_training_summary


def resume_message(run: Path, position: Position, epochs: int, per_epoch: list[int]) -> str:
    """Where a resumed run continues, its epochs counted from 1 as the other messages count them."""
    if position.epoch >= epochs:
        return f"resuming {run}: its {epochs} epoch(s) are done ({position.global_step} steps)"
    if position.step == 0:
        return f"resuming {run} at the start of epoch {position.epoch + 1} of {epochs}"
    return (
        f"resuming {run} in epoch {position.epoch + 1} of {epochs}, after its step {position.step} "
        f"of {per_epoch[position.epoch]}"
    )


def check_fits(
    config: RunConfig, shards: ShardSet, manifest_path: str, device: torch.device, world: World
) -> None:
    """The config must fit the data, the device and the processes before any work starts."""
    store = shards.store_config
    model = config.model
    if model.num_regions != store.num_regions:
        raise InputError(
            f"config model.num_regions={model.num_regions} but the shards hold up to {store.num_regions} "
            f"regions per image ({manifest_path}); SGE's BatchNorm runs over exactly that many"
        )
    if config.train.backend == "triton" and device.type != "cuda":
        raise InputError(
            f"config train.backend=triton runs on CUDA GPUs; this run trains on {device.type} "
            "(use auto, eager or chunked)"
        )
    if config.train.batch_size % world.size or config.train.batch_size // world.size < 2:
        raise InputError(
            f"config train.batch_size={config.train.batch_size} (the global batch) must give each of "
            f"{world.size} processes an equal share of at least 2 rows (SGE's BatchNorm)"
        )
    if model.feature_dim != store.feature_dim:
        raise InputError(
            f"config model.feature_dim={model.feature_dim} but the shards hold {store.feature_dim}-d "
            f"regions ({manifest_path})"
        )
    if model.enhancement == "cge":
        if not store.global_encoder.image_dim:
            raise InputError(
                "a cge model needs CLIP image features; the shards have none (extract with --clip)"
            )
        if model.clip_dim != store.global_encoder.image_dim:
            raise InputError(
                f"config model.clip_dim={model.clip_dim} but the shards' CLIP features are "
                f"{store.global_encoder.image_dim}-d"
            )


def validate(model: USER, store: Path, tokenizer: CaptionTokenizer, max_images: int | None) -> dict:
    return embedding_metrics([encode_split(model, store, "val", tokenizer, max_images, progress=False)])


def train_command(
    run: Path,
    shards: str | None,
    val_store: Path | None,
    config: str | None,
    overrides: list[str],
    resume: bool,
    allow_change: bool,
    console: Console,
) -> dict | None:
    """`userpipe train`, in one process or in each process torchrun starts: the process group, the run's
    inputs (on --resume, the run's own unless given; rank 0 reads them), its configuration, then `train`.
    The process keeps freed memory for the next step, and a deterministic run sets its CPU math, before the
    first matmul (trainer/process.py). A group that torchrun restarts (--max-restarts) resumes by itself.
    Returns the best validation metrics on rank 0, None on the other ranks."""
    world = distributed.world_from_environment()
    device = distributed.start(world)
    try:

        def inputs() -> tuple[bool, str, Path, RunConfig]:  # rank 0 reads the run directory
            resuming = resume or restarted_by_torchrun(run)
            spec, val = resume_inputs(run, shards, val_store, resuming)
            base = config or (checkpoint.run_config_of(run) if resuming else "demo")
            return resuming, spec, val, load_run_config(base, parse_overrides(overrides))

        resuming, spec, val, run_config = distributed.from_main(inputs)
        keep_freed_memory()
        if run_config.train.deterministic:
            reproducible_cpu_math()
        return train(
            run,
            spec,
            val,
            run_config,
            resuming,
            console if world.main else Console(quiet=True),
            allow_change=allow_change,
            world=world,
            device=device,
        )
    finally:
        distributed.stop()


def restarted_by_torchrun(run: Path) -> bool:
    """torchrun --max-restarts starts the same command again: continue the run it was writing."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and checkpoint.has_checkpoint(run)


def train(
    run: Path,
    shards_spec: str,
    val_store: Path,
    config: RunConfig,
    resume: bool,
    console: Console,
    bert=None,
    allow_change: bool = False,
    world: World = World(),
    device: torch.device | None = None,
) -> dict | None:
    """Train (or resume) and return the best validation metrics (rank 0; None on the others). Rank 0 alone
    reads and writes the run directory and the validation store; what the others need of it (the start,
    the state to resume) reaches them from rank 0."""
    every = progress_seconds()  # a bad value is refused before any work
    shards = ShardSet.resolve(shards_spec)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_fits(config, shards, shards_spec, device, world)

    with contextlib.ExitStack() as held:
        claimed: list[Output] = []  # rank 0's claim of the run directory, held for the whole run

        def begin() -> Start:  # on rank 0; an error in it is raised on every rank
            inputs = [val_store, *(Path(u).parent for u in shards.urls[:1] if not is_remote(u))]
            claimed.append(held.enter_context(claim(run, RUN, inputs)))
            return start_run(
                claimed[0], config, run_data(shards_spec, shards, val_store), resume, allow_change, console
            )

        start = distributed.from_main(begin)
        return _train(
            run, claimed, shards, shards_spec, val_store, start, console, bert, world, device, every
        )


class _NoLog:
    """The log of a rank other than 0: it writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, global_step: int) -> None:
        pass


def _train(
    run: Path,
    claimed: list[Output],
    shards: ShardSet,
    shards_spec: str,
    val_store: Path,
    start: Start,
    console: Console,
    bert,
    world: World,
    device: torch.device,
    every: float = PROGRESS_SECONDS,
) -> dict | None:
    config = start.config
    recipe = config.train
    tokenizer = CaptionTokenizer.for_text_model(config.model.text_model, config.model.max_tokens)
    rank_batch = recipe.batch_size // world.size
    loader = StreamingLoader(
        shards,
        tokenizer,
        LoaderSettings(rank_batch, recipe.seed, recipe.workers, train=True),
        rank=world.rank,
        world=world.size,
    )
    # per epoch: how shards split among ranks differs between epochs
    per_epoch = [loader.batches_per_epoch(epoch) for epoch in range(recipe.epochs)]
    if min(per_epoch) == 0:
        raise InputError(f"{shards_spec} holds fewer pairs than one batch of {recipe.batch_size}")
    pairs = min(per_epoch) * recipe.batch_size
    if config.model.use_queue and config.model.queue_size > pairs:
        raise InputError(
            f"config model.queue_size={config.model.queue_size} is more than the {pairs} pairs an epoch of "
            f"{shards_spec} trains on: the queue would hold each pair's own key among its negatives; "
            f"use at most {pairs}"
        )
    state = start.state
    saved_world = world.size if state is None else state.get("world_size", 1)
    if saved_world != world.size:
        raise InputError(
            f"--resume: {run} was trained by {saved_world} process(es); resume it with {saved_world} "
            f"(the data position is planned per process), not {world.size}"
        )

    model = initial_model(config, bert).to(device)  # the same on every rank (DDP also copies rank 0's)

    def prepare_run_directory() -> None:  # rank 0: every check above ran before the first write
        open_split(val_store, "val", config.model, recipe.val_images)
        check_free_space(run, checkpoint.checkpoint_bytes(model))  # a save's size, before an epoch trains
        files = {
            "config.json": config.model_dump_json(indent=1),
            RUN_RECORD_NAME: start.record.model_dump_json(indent=1),
        }
        if claimed[0].holds_own(run):
            for name, text in files.items():
                write_text_atomic(run / name, text)
        else:
            claimed[0].create(files)

    distributed.from_main(prepare_run_directory)
    position = Position()
    log = JsonLog(run / LOG_NAME) if world.main else _NoLog()
    if state is not None and world.main:
        checkpoint.load_model_weights(model, run / CHECKPOINTS / "last" / checkpoint.WEIGHTS, device)
    distributed.use_global_batch_statistics(model, recipe.global_batchnorm)
    trained = distributed.wrap(model, device)  # DDP with several processes (its parameters from rank 0)
    optimizer = build_optimizer(model, recipe)
    if state is not None:
        position = checkpoint.restore(state, optimizer, world.rank, console)
        log.truncate_after(position.global_step)
        if start.change:
            log.write(
                {
                    "step": position.global_step,
                    "epoch": position.epoch,
                    "change": start.change.model_dump(mode="json")["fields"],
                }
            )
        console.print(resume_message(run, position, recipe.epochs, per_epoch), highlight=False)
    else:
        if world.size > 1:  # each rank its own dropout masks, as one process draws them per row
            torch.manual_seed(recipe.seed * 1_000_003 + world.rank)
        if world.main:  # the untrained model's numbers, the baseline every run is compared with
            baseline = validate(model, val_store, tokenizer, recipe.val_images)
            log.write({"step": 0, "epoch": 0, "val": baseline})

    def validate_and_save() -> dict | None:
        return _validate_and_save(run, model, optimizer, config, position, val_store, tokenizer, log, world)

    model.train()
    with TrainingProgress(
        console, sum(per_epoch), recipe.epochs, position.global_step, every, shown=world.main
    ) as progress:
        while position.epoch < recipe.epochs:
            started, pairs = time.perf_counter(), 0
            for batch in loader.batches(position.epoch, position.step):
                lr = learning_rate(recipe, position.epoch, position.global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["scale"]
                # before the step: the queue the global batch is scored against
                same_image = same_image_counts(
                    distributed.gather(batch.image_index.to(device)),
                    model.text_queue.ids if config.model.use_queue else None,
                )
                losses = train_step(trained, optimizer, batch, config, device, position)
                position.step += 1
                position.global_step += 1
                pairs += len(batch.image_index) * world.size
                rate = pairs / (time.perf_counter() - started)
                log.write(
                    {
                        "step": position.global_step,
                        "epoch": position.epoch,
                        "lr": lr,
                        "samples_per_s": round(rate, 1),
                        **{k: round(v, 4) for k, v in same_image.items()},
                        **{k: round(v.item(), 6) for k, v in losses.items()},
                    }
                )
                progress.step(position, losses["loss"].item(), lr, rate)
                # at the epoch's last step the epoch's own validation follows: one, so that a run resumed
                # from this step's checkpoint validates as often as the uninterrupted run
                if (
                    recipe.val_every
                    and position.global_step % recipe.val_every == 0
                    and position.step < per_epoch[position.epoch]
                ):
                    validate_and_save()
            position.epoch, position.step = position.epoch + 1, 0
            progress.epoch_end(position, validate_and_save())
    if not world.main:
        return None
    write_training_summary(run, log.records())
    best = json.loads((run / CHECKPOINTS / "best" / "metrics.json").read_text())
    return with_sizes(best, *validation_sizes(run))  # the table's title states what was validated on


def _validate_and_save(
    run, model, optimizer, config, position, val_store, tokenizer, log, world
) -> dict | None:
    """Rank 0 validates and saves, with every rank's RNG state (each draws its own dropout masks), and
    returns the metrics (None on the other ranks)."""
    rng_states = distributed.gather_objects(torch.get_rng_state())
    if not world.main:
        return None
    metrics = validate(model, val_store, tokenizer, config.train.val_images)  # non-finite: NonFiniteError
    log.write({"step": position.global_step, "epoch": position.epoch, "val": metrics})
    best = metrics["rsum"] > position.best_rsum
    if best:
        position.best_rsum = metrics["rsum"]
    rng = rng_states if world.size > 1 else rng_states[0]
    checkpoint.save(run, model, optimizer, config, dict(position.__dict__), metrics, best, rng, world.size)
    return metrics
