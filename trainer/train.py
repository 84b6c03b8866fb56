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
import datetime
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.profiler import record_function

from userpipe.schemas.errors import InputError, NonFiniteError
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
from userpipe.trainer.run_dir import LOG_NAME, JsonLog, Start, resume_inputs, run_data, start_run
from userpipe.trainer.run_report import validation_sizes, write_training_summary
from userpipe.trainer.shard_set import ShardSet


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # batches done in `epoch`
    global_step: int = 0
    best_rsum: float = float("-inf")


PROGRESS_SECONDS = 30.0  # off a terminal: a plain progress line this often (env USERPIPE_PROGRESS_SECONDS)
PROGRESS_ENV = "USERPIPE_PROGRESS_SECONDS"


def progress_seconds() -> float:
    """The interval between plain progress lines: PROGRESS_SECONDS, or the environment's."""
    value = os.environ.get(PROGRESS_ENV)
    if value is None:
        return PROGRESS_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InputError(f"{PROGRESS_ENV}={value!r} is not a number of seconds (0 or more)")
    return seconds


class TrainingProgress:
    """What `train` shows while it runs. On a terminal, rich's bar. Elsewhere the bar draws nothing until
    the end (36 silent minutes in a log file), so a plain line every `every` seconds instead: epoch,
    step/total, the mean loss since the previous line, lr, pairs/s and the ETA. On both, a line at each
    epoch's end with its validation RSUM. `shown` False (the ranks other than 0): nothing."""

    def __init__(
        self, console: Console, total: int, epochs: int, done: int, every: float, shown: bool = True
    ):
        self.console, self.total, self.epochs, self.done, self.every = console, total, epochs, done, every
        self.shown = shown
        self.bar: Progress | None = None
        self.losses: list[float] = []  # since the last plain line
        self.epoch_losses: list[float] = []
        self.lr = self.rate = 0.0
        self.started = self.last_line = time.monotonic()

    def __enter__(self) -> TrainingProgress:
        if self.shown and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("training", total=self.total, completed=self.done, status="")
        self.started = self.last_line = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _numbers(self, global_step: int, loss: float) -> str:
        steps = global_step - self.done  # by this process: a resumed run's ETA from its own pace
        eta = (time.monotonic() - self.started) / steps * (self.total - global_step) if steps > 0 else None
        return (
            f"step {global_step}/{self.total}  loss {loss:.4f}  lr {self.lr:.2e}  {self.rate:.0f} pairs/s  "
            f"ETA {'?' if eta is None else datetime.timedelta(seconds=round(eta))}"
        )

    def step(self, position: Position, loss: float, lr: float, rate: float) -> None:
        """After a step (`position` counts it)."""
        self.losses.append(loss)
        self.epoch_losses.append(loss)
        self.lr, self.rate = lr, rate
        if self.bar is not None:
            self.bar.update(self.task, advance=1, status=f"loss {loss:.4f}  {rate:.0f} pairs/s")
        elif self.shown and time.monotonic() - self.last_line >= self.every:
            mean = sum(self.losses) / len(self.losses)
            self.console.print(
                f"epoch {position.epoch + 1}/{self.epochs}  {self._numbers(position.global_step, mean)}",
                highlight=False,
            )
            self.losses.clear()
            self.last_line = time.monotonic()

    def epoch_end(self, position: Position, metrics: dict | None) -> None:
        """After an epoch's validation (`position.epoch` counts that epoch as done)."""
        if self.shown and self.epoch_losses:
            mean = sum(self.epoch_losses) / len(self.epoch_losses)
            validation = f"  validation RSUM {metrics['rsum']:.1f}" if metrics else ""
            self.console.print(
                f"epoch {position.epoch}/{self.epochs} done  {self._numbers(position.global_step, mean)}"
                + validation,
                highlight=False,
            )
        self.losses.clear()
        self.epoch_losses.clear()
        self.last_line = time.monotonic()


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


def build_optimizer(model: USER, recipe) -> torch.optim.AdamW:
    """The recipe's groups: the text backbone at text_lr_scale x lr, everything else at lr. AdamW runs as one
    fused kernel, several times faster than the default per-tensor loop (bench/train_throughput.py)."""
    backbone = [p for p in model.text.bert.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return torch.optim.AdamW(
        [
            {"params": rest, "lr": recipe.lr, "scale": 1.0},
            {"params": backbone, "lr": recipe.lr * recipe.text_lr_scale, "scale": recipe.text_lr_scale},
        ],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        fused=True,
    )


def learning_rate(recipe, epoch: int, global_step: int) -> float:
    """Step schedule (x lr_decay from each listed epoch) with optional linear warmup."""
    lr = recipe.lr * recipe.lr_decay ** sum(epoch >= e for e in recipe.lr_decay_epochs)
    if recipe.warmup_steps and global_step < recipe.warmup_steps:
        lr *= (global_step + 1) / recipe.warmup_steps
    return lr


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
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a state saved by the per-tensor loop resumes fused too
            group["fused"] = True
        position = Position(**state["position"])
        rng = state["torch_rng"]
        torch.set_rng_state(rng[world.rank] if isinstance(rng, list) else rng)
        if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            # CPU reductions split work by thread, so the thread count is part of what makes a resumed
            # run compute the bits the uninterrupted one would have
            console.print(
                f"using the run's {state['threads']} CPU threads (this process had {torch.get_num_threads()})"
            )
            torch.set_num_threads(state["threads"])
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


def train_step(
    model: USER, optimizer: torch.optim.Optimizer, batch, config: RunConfig, device, position: Position
) -> dict[str, torch.Tensor]:
    """One optimizer step: forward (bf16 autocast on CUDA; the losses stay fp32), backward, clipping, the
    finiteness check, AdamW. Returns the losses."""
    clip = batch.clip_image.to(device) if config.model.enhancement == "cge" else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = model(
            batch.regions.to(device),
            batch.region_lengths.to(device),
            batch.tokens.to(device),
            batch.token_lengths.to(device),
            batch.image_index.to(device),
            clip=clip,
            backend=config.train.backend,
        )
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        losses["loss"].backward()
    with record_function("optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        check_step_finite(losses["loss"], grad_norm, position)
        optimizer.step()
    return losses


def check_step_finite(loss: torch.Tensor, grad_norm: torch.Tensor, position: Position) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and every later number)."""
    loss_value, norm_value = loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
        raise NonFiniteError(
            f"step {position.global_step + 1} (epoch {position.epoch + 1}): {what}; the run stopped "
            "without applying it (lower train.lr or raise train.warmup_steps, then --resume "
            "from the last checkpoint)"
        )


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
