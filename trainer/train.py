"""`userpipe train`: streaming batches → USER → UTO → AdamW, with validation, checkpoints and logs.

One loop over the library's parts (trainer/step.py, loader.py, checkpoint.py, run_dir.py, progress.py).
A run directory holds config.json, run.json, log.jsonl, checkpoints/ and, at the end, training.md with
its plots (docs/reference.md, "`userpipe train`"); a run killed at any point resumes with `--resume`
(docs/architecture.md, "The trainer").
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape

from userpipe.schemas import threads
from userpipe.schemas.base import Seed, first_problem
from userpipe.schemas.errors import InputError, NotLearningError
from userpipe.schemas.outputs import RUN, Output, check_free_space, check_output, claim, write_text_atomic
from userpipe.schemas.progress import progress_seconds
from userpipe.schemas.run import RUN_RECORD_NAME, RunConfig, TrainRecipe
from userpipe.schemas.sources import is_remote
from userpipe.trainer import checkpoint, distributed
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import CHECKPOINTS, initial_model
from userpipe.trainer.config import load_run_config, parse_overrides
from userpipe.trainer.data_order import same_image_counts
from userpipe.trainer.distributed import World
from userpipe.trainer.encode import embedding_metrics, encode_split, open_split
from userpipe.trainer.evaluate import rsum_noise, with_sizes
from userpipe.trainer.loader import LoaderSettings, StreamingLoader
from userpipe.trainer.model import USER
from userpipe.trainer.process import keep_freed_memory, reproducible_cpu_math
from userpipe.trainer.progress import TrainingProgress
from userpipe.trainer.run_dir import LOG_NAME, JsonLog, Start, resume_inputs, run_data, start_run
from userpipe.trainer.shard_set import ShardSet
from userpipe.trainer.step import Position, build_optimizer, learning_rate, matching_score, train_step
from userpipe.trainer.tracking import TrackedLog, parse_report_to
from userpipe.trainer.training_page import validation_sizes, write_training_summary


def resume_message(
    run: Path, position: Position, epochs: int, per_epoch: list[int], max_steps: int | None = None
) -> str:
    """Where a resumed run continues, its epochs counted from 1 as the other messages count them."""
    if max_steps is not None and position.global_step >= max_steps:
        return f"resuming {run}: its {max_steps} steps (train.max_steps) are done"
    if position.epoch >= epochs:
        return f"resuming {run}: its {epochs} epoch(s) are done ({position.global_step} steps)"
    if position.step == 0:
        return f"resuming {run} at the start of epoch {position.epoch + 1} of {epochs}"
    return (
        f"resuming {run} in epoch {position.epoch + 1} of {epochs}, after its step {position.step} "
        f"of {per_epoch[position.epoch]}"
    )


def last_step(recipe: TrainRecipe, per_epoch: list[int]) -> int:
    """The run's last global step: its epochs' steps, or train.max_steps if it ends the run earlier."""
    return min(sum(per_epoch), recipe.max_steps or sum(per_epoch))


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


NOT_LEARNING_ERRORS = 3.0  # a first validation at most this many noise units above the untrained start


def not_learning(baseline: dict, metrics: dict) -> str | None:
    """What to say when a run's first validation is within noise of its untrained start (step 0), else
    None: released USER runs stuck near chance went unnoticed for whole runs (USER issues #4, #6)."""
    noise = rsum_noise(baseline)
    if metrics["rsum"] - baseline["rsum"] > NOT_LEARNING_ERRORS * noise:
        return None
    return (
        f"the run is not learning: validation RSUM {metrics['rsum']:.1f} against {baseline['rsum']:.1f} "
        f"untrained, within {NOT_LEARNING_ERRORS:g} x its noise ({noise:.1f}); check that captions belong "
        "to their images (the shards' store and split), the learning rate and warm-up, and the loss in "
        "log.jsonl"
    )


@dataclass
class RunInputs:
    """What a run trains on and how, as rank 0 resolves them (on --resume, the run's own unless given)."""

    shards: str  # the shard set as given (`ShardSet.resolve` reads it)
    val_store: Path
    config: RunConfig
    resume: bool
    report_to: tuple[str, ...] = ()  # trackers (trainer/tracking.py), their packages checked


@dataclass(frozen=True)
class TrainRequest:
    """What `userpipe train` is asked, as given (None: the run's own on --resume, else the default)."""

    shards: str | None = None
    val_store: Path | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    resume: bool = False
    allow_change: bool = False
    report_to: str | None = None  # comma-separated tracker names
    seeds: tuple[int, ...] = ()  # one run per seed (`seed_runs`); () one run at the config's seed


def parse_seeds(text: str | None) -> tuple[int, ...]:
    """`--seeds 1,2,3` -> distinct seeds, each in the config's range (one line naming the value if not)."""
    if text is None:
        return ()
    try:
        seeds = TypeAdapter(tuple[Seed, ...]).validate_python(tuple(text.split(",")))
    except ValidationError as exc:
        raise InputError(f"--seeds {text!r}: {first_problem(exc)}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text!r}: give distinct seeds, comma-separated (e.g. 1,2,3,4,5)")
    return seeds


def seed_runs(out: Path, request: TrainRequest) -> list[tuple[Path, TrainRequest]]:
    """The runs a request trains: `out` itself, or with seeds one run per seed in OUT/seed-N, its config's
    train.seed set to N. (Each is an ordinary run: eval, report and --resume take it as any other.)"""
    if not request.seeds:
        return [(out, request)]
    if any(o.partition("=")[0] == "train.seed" for o in request.overrides):
        raise InputError("--seeds sets train.seed of each run: leave out --set train.seed")
    return [
        (
            out / f"seed-{seed}",
            replace(request, overrides=(*request.overrides, f"train.seed={seed}"), seeds=(seed,)),
        )
        for seed in request.seeds
    ]


def train_command(run: Path, request: TrainRequest, console: Console) -> list[tuple[Path, dict]]:
    """`userpipe train`, in one process or in each process torchrun starts: the process group, then each run
    of `seed_runs` in turn: its inputs (on --resume, the run's own unless given; rank 0 reads them), its
    configuration, then `train`. The process keeps freed memory for the next step, and a deterministic run
    sets its CPU math, before the first matmul (trainer/process.py). A group that torchrun restarts
    (--max-restarts) resumes by itself. With seeds and --resume, each seed's run that has a checkpoint
    continues and the others start. Returns each run's best validation metrics on rank 0 ([] on the
    other ranks)."""
    world = distributed.world_from_environment()
    device = distributed.start(world)
    try:
        runs = seed_runs(run, request)
        if len(runs) > 1 and not request.resume:  # refused before the first seed trains, not at the last
            distributed.from_main(lambda: _check_new_runs([out for out, _ in runs]))
        results = []
        for out, asked in runs:
            best = _train_run(out, asked, world, device, console)
            if best is not None:
                results.append((out, best))
        return results
    finally:
        distributed.stop()


def _check_new_runs(runs: list[Path]) -> None:
    """What `start_run` refuses for each seed's run, asked of all of them before the first trains."""
    for out in runs:
        if check_output(out, RUN) == "own" and checkpoint.has_checkpoint(out):
            raise InputError(f"--out {out.parent} holds the run {out}: pass --resume to continue the seeds")


def _train_run(
    run: Path, request: TrainRequest, world: World, device: torch.device, console: Console
) -> dict | None:
    def inputs() -> RunInputs:  # rank 0 reads the run directory
        resuming = request.resume or restarted_by_torchrun(run)
        if request.seeds and not checkpoint.has_checkpoint(run):
            resuming = False  # a seed the interrupted command had not started yet
        spec, val = resume_inputs(run, request.shards, request.val_store, resuming)
        base = request.config or (checkpoint.run_config_of(run) if resuming else "demo")
        run_config = load_run_config(base, parse_overrides(list(request.overrides)))
        return RunInputs(spec, val, run_config, resuming, parse_report_to(request.report_to))

    run_inputs = distributed.from_main(inputs)
    keep_freed_memory()
    if run_inputs.config.train.deterministic:
        reproducible_cpu_math()
        threads.fix()  # reductions split by thread count: one count for the whole run
    return train(
        run,
        run_inputs,
        console if world.main else Console(quiet=True),
        allow_change=request.allow_change,
        world=world,
        device=device,
    )


def restarted_by_torchrun(run: Path) -> bool:
    """torchrun --max-restarts starts the same command again: continue the run it was writing."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and checkpoint.has_checkpoint(run)


def train(
    run: Path,
    inputs: RunInputs,
    console: Console,
    *,
    allow_change: bool = False,
    world: World = World(),
    device: torch.device | None = None,
    bert=None,
) -> dict | None:
    """Train (or resume) and return the best validation metrics (rank 0; None on the others). Rank 0 alone
    reads and writes the run directory and the validation store; what the others need of it (the start,
    the state to resume) reaches them from rank 0."""
    every = progress_seconds()  # a bad value is refused before any work
    shards = ShardSet.resolve(inputs.shards)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_fits(inputs.config, shards, inputs.shards, device, world)

    with contextlib.ExitStack() as held:
        claimed: list[Output] = []  # rank 0's claim of the run directory, held for the whole run

        def begin() -> Start:  # on rank 0; an error in it is raised on every rank
            local = [Path(u).parent for u in shards.urls[:1] if not is_remote(u)]
            claimed.append(held.enter_context(claim(run, RUN, [inputs.val_store, *local])))
            data = run_data(inputs.shards, shards, inputs.val_store)
            return start_run(claimed[0], inputs.config, data, inputs.resume, allow_change, console)

        start = distributed.from_main(begin)
        config = start.config
        tokenizer = CaptionTokenizer.for_text_model(config.model.text_model, config.model.max_tokens)
        loader, per_epoch = _epoch_plan(config, shards, inputs.shards, tokenizer, world)
        _check_world_size(run, start.state, world)
        model = initial_model(config, bert).to(device)  # the same on every rank (DDP also copies rank 0's)
        # on rank 0, once every check above has passed: the run directory's first write
        distributed.from_main(lambda: _prepare_run_directory(run, claimed[0], start, model, inputs.val_store))
        if start.state is not None and world.main:
            checkpoint.load_model_weights(model, run / CHECKPOINTS / "last" / checkpoint.WEIGHTS, device)
        distributed.use_global_batch_statistics(model, config.train.global_batchnorm)
        trained = distributed.wrap(model, device)  # DDP with several processes (its parameters from rank 0)
        log = TrackedLog(JsonLog(run / LOG_NAME) if world.main else _NoLog())
        held.push(log.close_on_exit)  # the trackers opened so far, told whether the run failed
        if inputs.report_to:  # on rank 0; a tracker that cannot start is an error on every rank
            first_step = 0 if start.state is None else start.state["position"]["global_step"] + 1
            distributed.from_main(
                lambda: log.open(inputs.report_to, run, first_step, start.record.id, config)
            )
        training = _Training(
            run=run,
            config=config,
            model=model,
            trained=trained,
            optimizer=build_optimizer(model, config.train),
            val_store=inputs.val_store,
            tokenizer=tokenizer,
            log=log,
            world=world,
            device=device,
            console=console,
        )
        if start.state is not None:
            training.resume(start, per_epoch, console)
        else:
            training.begin(loader)
        model.train()
        with TrainingProgress(
            console,
            last_step(config.train, per_epoch),
            config.train.epochs,
            training.position.global_step,
            every,
            shown=world.main,
        ) as progress:
            training.run_epochs(loader, per_epoch, progress)
        if not world.main:
            return None
        write_training_summary(run, log.records())
        best = json.loads((run / CHECKPOINTS / "best" / "metrics.json").read_text())
        return with_sizes(best, *validation_sizes(run))  # the table's title states what was validated on


def _epoch_plan(
    config: RunConfig, shards: ShardSet, shards_spec: str, tokenizer: CaptionTokenizer, world: World
) -> tuple[StreamingLoader, list[int]]:
    """This rank's loader and the batches of each epoch, refused when an epoch is too short for a batch
    or for the queue."""
    recipe = config.train
    loader = StreamingLoader(
        shards,
        tokenizer,
        LoaderSettings(recipe.batch_size // world.size, recipe.seed, recipe.workers, train=True),
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
    return loader, per_epoch


def _check_world_size(run: Path, state: dict | None, world: World) -> None:
    saved_world = world.size if state is None else state.get("world_size", 1)
    if saved_world != world.size:
        raise InputError(
            f"--resume: {run} was trained by {saved_world} process(es); resume it with {saved_world} "
            f"(the data position is planned per process), not {world.size}"
        )


def _prepare_run_directory(run: Path, claimed: Output, start: Start, model: USER, val_store: Path) -> None:
    """Rank 0, before the first write: the validation split readable, room for a checkpoint, then the run's
    config and record written."""
    config = start.config
    open_split(val_store, "val", config.model, config.train.val_images)
    check_free_space(run, checkpoint.checkpoint_bytes(model))  # a save's size, before an epoch trains
    files = {
        "config.json": config.model_dump_json(indent=1),
        RUN_RECORD_NAME: start.record.model_dump_json(indent=1),
    }
    if claimed.holds_own(run):
        for name, text in files.items():
            write_text_atomic(run / name, text)
    else:
        claimed.create(files)


class _NoLog:
    """The log of a rank other than 0: it writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, global_step: int) -> None:
        pass


@dataclass
class _Training:
    """A run's parts as the loop uses them: where it writes, what it trains and how, and where it stands."""

    run: Path
    config: RunConfig
    model: USER
    trained: torch.nn.Module  # the model as the step calls it: DDP with several processes
    optimizer: torch.optim.Optimizer
    val_store: Path
    tokenizer: CaptionTokenizer
    log: TrackedLog
    world: World
    device: torch.device
    console: Console
    position: Position = field(default_factory=Position)
    baseline: dict | None = None  # the untrained model's validation, until the first validation is judged

    def resume(self, start: Start, per_epoch: list[int], console: Console) -> None:
        """Continue from the last checkpoint's state: the position, the optimizer, the RNGs, the log."""
        position = self.position = checkpoint.restore(
            start.state, self.optimizer, self.world.rank, console, self.config.train.deterministic
        )
        self.log.truncate_after(position.global_step)
        if start.change:
            self.log.write(
                {
                    "step": position.global_step,
                    "epoch": position.epoch,
                    "change": start.change.model_dump(mode="json")["fields"],
                }
            )
        console.print(
            resume_message(
                self.run, position, self.config.train.epochs, per_epoch, self.config.train.max_steps
            ),
            highlight=False,
        )

    def begin(self, loader: StreamingLoader) -> None:
        """A new run: each rank its own dropout masks, as one process draws them per row; rank 0 logs the
        untrained model's numbers (after train.align_start), the baseline every run is compared with."""
        if self.world.size > 1:
            torch.manual_seed(self.config.train.seed * 1_000_003 + self.world.rank)
        if self.config.train.align_start:
            self._align_start(loader)
        if self.world.main:
            baseline = validate(self.model, self.val_store, self.tokenizer, self.config.train.val_images)
            self.log.write({"step": 0, "epoch": 0, "val": baseline})
            self.baseline = with_sizes(baseline, *validation_sizes(self.run))

    def _align_start(self, loader: StreamingLoader) -> None:
        """The untrained model scores every pair about alike, at a sign its draw decides; below zero UTO's
        reward has no gradient and a run can stay there (docs/architecture.md, "Seeds"). Scored on the first
        batch the run trains on (every rank's rows); rank 0's decision holds on every rank, so that no
        rounding difference near zero can leave the ranks' weights apart (DDP copies them once only)."""
        self.model.train()  # as the first step sees it, and BatchNorm's all-reduce on every rank alike
        with contextlib.closing(loader.batches(0)) as batches:
            score = matching_score(self.model, next(batches), self.device)
        negate = distributed.from_main(lambda: score < 0)
        if negate:
            self.model.negate_text_projection()
        self.log.write({"step": 0, "epoch": 0, "start_score": round(score, 6), "text_negated": negate})

    def run_epochs(self, loader: StreamingLoader, per_epoch: list[int], progress: TrainingProgress) -> None:
        """From the position to the last epoch (or `max_steps`): steps, their log lines, and the validations
        and saves."""
        position = self.position
        final = last_step(self.config.train, per_epoch)
        while position.epoch < self.config.train.epochs and position.global_step < final:
            started, pairs = time.perf_counter(), 0
            asked = started  # when the loop asked the loader for the next batch
            for batch in loader.batches(position.epoch, position.step):
                threads.adjust()
                got = time.perf_counter()
                lr, same_image, losses = self.step(batch)
                done = time.perf_counter()
                pairs += len(batch.image_index) * self.world.size
                rate = pairs / (done - started)
                self.log.write(
                    {
                        "step": position.global_step,
                        "epoch": position.epoch,
                        "lr": lr,
                        "samples_per_s": round(rate, 1),
                        "step_s": round(done - got, 4),
                        "loader_wait_s": round(got - asked, 4),
                        **{k: round(v, 4) for k, v in same_image.items()},
                        **{k: round(v.item(), 6) for k, v in losses.items()},
                    }
                )
                progress.step(position, losses["loss"].item(), lr, rate)
                if position.global_step == final and position.step < per_epoch[position.epoch]:
                    progress.epoch_end(position, self.validate_and_save(), last_step=True)
                    return
                if _validates_after_step(self.config.train.val_every, position, per_epoch):
                    self.validate_and_save()
                asked = time.perf_counter()
            position.epoch, position.step = position.epoch + 1, 0
            progress.epoch_end(position, self.validate_and_save())

    def step(self, batch) -> tuple[float, dict, dict]:
        """One training step at the position's learning rate; returns the lr, the same-image counts of the
        batch and queue it was scored against, and the losses."""
        position = self.position
        lr = learning_rate(self.config.train, position.epoch, position.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        # before the step: the queue the global batch is scored against
        same_image = same_image_counts(
            distributed.gather(batch.image_index.to(self.device)),
            self.model.text_queue.ids if self.config.model.use_queue else None,
        )
        losses = train_step(self.trained, self.optimizer, batch, self.config, self.device, position)
        position.step += 1
        position.global_step += 1
        return lr, same_image, losses

    def validate_and_save(self) -> dict | None:
        """Rank 0 validates and saves, with every rank's RNG state (each draws its own dropout masks), and
        returns the metrics (None on the other ranks); an error there (non-finite metrics, a run stopped for
        not learning) is raised on every rank."""
        rng_states = distributed.gather_objects(torch.get_rng_state())
        metrics = distributed.from_main(lambda: self._validate_and_save(rng_states))
        return metrics if self.world.main else None

    def _validate_and_save(self, rng_states: list) -> dict:
        position = self.position
        # non-finite metrics: NonFiniteError
        metrics = validate(self.model, self.val_store, self.tokenizer, self.config.train.val_images)
        self.log.write({"step": position.global_step, "epoch": position.epoch, "val": metrics})
        self.log.flush()  # the trackers hold every step the checkpoint covers before it is saved
        best = metrics["rsum"] > position.best_rsum
        if best:
            position.best_rsum = metrics["rsum"]
        rng = rng_states if self.world.size > 1 else rng_states[0]
        checkpoint.save(
            self.run, self.model, self.optimizer, self.config, dict(position.__dict__), metrics, best, rng
        )
        self._judge_learning(metrics)
        return metrics

    def _judge_learning(self, metrics: dict) -> None:
        """The first validation against the untrained start: a warning in the log and on the console, and
        the end of the run with train.stop_if_not_learning."""
        baseline, self.baseline = self.baseline, None
        warning = baseline and not_learning(baseline, metrics)
        if not warning:
            return
        self.log.write({"step": self.position.global_step, "epoch": self.position.epoch, "warning": warning})
        if self.config.train.stop_if_not_learning:
            raise NotLearningError(f"{warning} (stopped: train.stop_if_not_learning; the checkpoint is kept)")
        self.console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)


def _validates_after_step(val_every: int | None, position: Position, per_epoch: list[int]) -> bool:
    """Every `val_every` steps, except at an epoch's last step: the epoch's own validation follows it, and
    one is enough, so that a run resumed from this step's checkpoint validates as often as the
    uninterrupted run."""
    return (
        bool(val_every)
        and position.global_step % val_every == 0
        and position.step < per_epoch[position.epoch]
    )
