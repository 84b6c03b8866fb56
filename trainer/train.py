"""`userpipe train`: streaming batches → USER → UTO → AdamW, with validation, checkpoints and logs.

One loop, nanoGPT-style. The run directory holds:
  config.json              the resolved RunConfig
  run.json                 RunRecord: the data it reads (shard set by content) and any change a resume made
  log.jsonl                one line per step ({"step", "epoch", "loss", "batch", "queue", "lr", ...})
                           and per validation ({"val": {...metrics}})
  checkpoints/             states, and the links last and best to them (trainer/checkpoint.py)
  summary.md, loss.png, val_rsum.png   written at the end
A run killed at any point resumes (`--resume`) from its last checkpoint and, since data order,
augmentation and dropout are all seeded, ends where the uninterrupted run would have; one killed before
its first checkpoint starts again. A resume must use the run's recipe and data, or say so
(`--allow-change`, recorded). A non-finite loss, gradient or validation stops the run (NonFiniteError).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.outputs import RUN, check_apart, create_with, existing, recover, write_text_atomic, writer_lock
from schemas.base import parse_json, read_model
from schemas.errors import InputError, NonFiniteError
from schemas.run import RUN_RECORD_NAME, RunChange, RunConfig, RunData, RunRecord
from trainer import checkpoint
from trainer.captions import CaptionTokenizer
from trainer.checkpoint import CHECKPOINTS
from trainer.encode import encode_split, open_split
from trainer.evaluate import retrieval_metrics
from trainer.loader import LoaderSettings, ShardSet, StreamingLoader
from trainer.model import USER, build_model


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # batches done in `epoch`
    global_step: int = 0
    best_rsum: float = float("-inf")


def check_fits(config: RunConfig, shards: ShardSet, manifest_path: str) -> None:
    """The config must fit the data before any work starts."""
    store = shards.store_config
    model = config.model
    if model.feature_dim != store.feature_dim:
        raise InputError(f"config model.feature_dim={model.feature_dim} but the shards hold {store.feature_dim}-d "
                         f"regions ({manifest_path})")
    if model.enhancement == "cge":
        if not store.global_encoder.image_dim:
            raise InputError("a cge model needs CLIP image features; the shards have none (extract with --clip)")
        if model.clip_dim != store.global_encoder.image_dim:
            raise InputError(f"config model.clip_dim={model.clip_dim} but the shards' CLIP features are "
                             f"{store.global_encoder.image_dim}-d")


def build_optimizer(model: USER, recipe) -> torch.optim.AdamW:
    """The recipe's groups: the text backbone at text_lr_scale x lr, everything else at lr."""
    backbone = [p for p in model.text.bert.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return torch.optim.AdamW([{"params": rest, "lr": recipe.lr, "scale": 1.0},
                              {"params": backbone, "lr": recipe.lr * recipe.text_lr_scale,
                               "scale": recipe.text_lr_scale}],
                             lr=recipe.lr, weight_decay=recipe.weight_decay)


def learning_rate(recipe, epoch: int, global_step: int) -> float:
    """Step schedule (x lr_decay from each listed epoch) with optional linear warmup."""
    lr = recipe.lr * recipe.lr_decay ** sum(epoch >= e for e in recipe.lr_decay_epochs)
    if recipe.warmup_steps and global_step < recipe.warmup_steps:
        lr *= (global_step + 1) / recipe.warmup_steps
    return lr


def initial_model(config: RunConfig, bert=None) -> USER:
    """The untrained model a run of `config` starts from (seeded: the same every time)."""
    torch.manual_seed(config.train.seed)
    return build_model(config.model, bert)


def validate(model: USER, store: Path, tokenizer: CaptionTokenizer, max_images: int | None) -> dict:
    emb = encode_split(model, store, "val", tokenizer, max_images, progress=False)
    return retrieval_metrics(emb.images @ emb.captions.T, emb.caption_image)


class JsonLog:
    """log.jsonl: one JSON object per line, appended. A kill can cut only the line being appended: reading
    drops a last line without its newline, and a resume rewrites the log without it."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")[:-1]  # the part after the last newline: empty, or cut
        records = [parse_json(line, f"{self.path} line {number}") for number, line in enumerate(lines, 1)]
        wrong = next((n for n, r in enumerate(records, 1) if not isinstance(r, dict)), None)
        if wrong is not None:
            raise InputError(f"{self.path} line {wrong} is not a log record (a JSON object)")
        return records

    def truncate_after(self, global_step: int) -> None:
        """On resume: drop what the killed run logged past the checkpoint it resumes from (and the change
        a killed resume recorded there: the resume records its own)."""
        kept = [r for r in self.records()
                if r.get("step", 0) < global_step or r.get("step", 0) == global_step and "change" not in r]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def shards_identity(shards: ShardSet) -> str:
    """The shard set a run reads, by content: the manifest records of the selected shards."""
    records = [[Path(u).name, n, c, h] for u, n, c, h in zip(shards.urls, shards.samples, shards.captions,
                                                              shards.sha256, strict=True)]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def _flat(config: RunConfig) -> dict:
    return {f"{section}.{key}": value for section, fields in config.model_dump(mode="json").items()
            if isinstance(fields, dict) for key, value in fields.items()}


def differences(before: RunConfig, before_data: RunData | None, after: RunConfig, after_data: RunData) -> dict:
    """field -> (before, after) for every recipe, model and data field that differs."""
    old, new = _flat(before), _flat(after)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    if before_data is not None:
        if before_data.shards_sha256 != after_data.shards_sha256:
            changed["shards"] = (before_data.shards, after_data.shards)
        if before_data.val_store != after_data.val_store:
            changed["val_store"] = (before_data.val_store, after_data.val_store)
    return changed


@dataclass
class Start:
    """Where a run begins: from nothing, or from its last checkpoint's state."""

    config: RunConfig
    record: RunRecord
    state: dict | None = None
    change: RunChange | None = None  # made by this resume (--allow-change)


def _start(run: Path, config: RunConfig, data: RunData, resume: bool, allow_change: bool,
           console: Console) -> Start:
    """Decide how the run starts, refusing before anything is written (called under the writer lock)."""
    found = existing(run, RUN)
    recover(run)
    checkpoint.recover(run)
    record_path = run / RUN_RECORD_NAME
    if found == "own" and checkpoint.has_checkpoint(run):
        if not resume:
            raise InputError(f"{run} already holds a run; pass --resume to continue it, or another --out")
        last = run / CHECKPOINTS / "last"
        previous = read_model(RunConfig, last / checkpoint.CONFIG, "checkpoint configuration")
        record = read_model(RunRecord, record_path, "run record") if record_path.is_file() else RunRecord(data=data)
        changed = differences(previous, record.data if record_path.is_file() else None, config, data)
        model_changes = [k for k in changed if k.startswith("model.")]
        if model_changes:
            raise InputError(f"--resume: {run} holds a checkpoint of another model configuration "
                             f"({_listed(changed, model_changes)})")
        # everything a resume reads is read (and a damaged file refused) before anything is written
        JsonLog(run / "log.jsonl").records()
        state = checkpoint.load_state(last / checkpoint.STATE)
        step = state["position"]["global_step"]
        # changes recorded by a resume killed before its next checkpoint were never applied: forget them
        record = record.model_copy(update={"data": data, "changes": tuple(c for c in record.changes if c.step < step)})
        if changed:
            if not allow_change:
                raise InputError(f"--resume: {run} was trained with {_listed(changed, list(changed))}; pass "
                                 "--allow-change to continue with the change recorded in the run, or resume as it was")
            change = RunChange(step=step, fields=changed)
            console.print(f"continuing {run} with {_listed(changed, list(changed))} from step {step}")
            return Start(config, record.model_copy(update={"changes": (*record.changes, change)}), state, change)
        return Start(config, record, state)
    if resume and found != "own":
        raise InputError(f"--resume: no run in {run}")
    if found == "own" and checkpoint.has_states(run):  # damaged or removed by hand: keep what is there
        raise InputError(f"{run}/{CHECKPOINTS} holds saved states but no usable 'last' checkpoint (removed or "
                         "damaged); point the link 'last' at one of them to resume, or choose another --out")
    if found == "own":  # killed before its first checkpoint: nothing to continue, so it starts again
        console.print(f"{run} has no checkpoint yet: starting it again")
        shutil.rmtree(run / CHECKPOINTS, ignore_errors=True)
        (run / "log.jsonl").unlink(missing_ok=True)
    return Start(config, RunRecord(data=data))


def _listed(changed: dict, keys: list[str]) -> str:
    return ", ".join(f"{k} {changed[k][0]} -> {changed[k][1]}" for k in keys)


def train(run: Path, shards_spec: str, val_store: Path, config: RunConfig, resume: bool, console: Console,
          bert=None, allow_change: bool = False) -> dict:
    """Train (or resume) and return the best validation metrics."""
    shards = ShardSet.resolve(shards_spec)
    check_fits(config, shards, shards_spec)
    check_apart(run, [Path(shards.urls[0]).parent, val_store])
    existing(run, RUN)
    spec = Path(shards_spec)  # resolved (a brace pattern: its folder), so a resume works from anywhere
    data = RunData(shards=str(spec.parent.resolve() / spec.name), shards_sha256=shards_identity(shards),
                   val_store=str(val_store.resolve()))
    with writer_lock(run):
        start = _start(run, config, data, resume, allow_change, console)
        return _train(run, shards, shards_spec, val_store, start, console, bert)


def _train(run: Path, shards: ShardSet, shards_spec: str, val_store: Path, start: Start, console: Console,
           bert) -> dict:
    config = start.config
    recipe = config.train
    open_split(val_store, "val", config.model, recipe.val_images)
    tokenizer = CaptionTokenizer.for_text_model(config.model.text_model)
    loader = StreamingLoader(shards, tokenizer, LoaderSettings(recipe.batch_size, recipe.seed, recipe.workers,
                                                               train=True))
    per_epoch = loader.batches_per_epoch()
    if per_epoch == 0:
        raise InputError(f"{shards_spec} holds fewer pairs than one batch of {recipe.batch_size}")
    # every check above ran before the first write
    files = {"config.json": config.model_dump_json(indent=1), RUN_RECORD_NAME: start.record.model_dump_json(indent=1)}
    if existing(run, RUN) == "own":
        for name, text in files.items():
            write_text_atomic(run / name, text)
    else:
        create_with(run, files)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = initial_model(config, bert).to(device)
    optimizer = build_optimizer(model, recipe)
    position = Position()
    log = JsonLog(run / "log.jsonl")
    state = start.state
    if state is not None:
        checkpoint.load_model_weights(model, run / CHECKPOINTS / "last" / checkpoint.WEIGHTS, device)
        optimizer.load_state_dict(state["optimizer"])
        position = Position(**state["position"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            # CPU reductions split work by thread, so the thread count is part of what makes a resumed
            # run compute the bits the uninterrupted one would have
            console.print(f"using the run's {state['threads']} CPU threads (this process had "
                          f"{torch.get_num_threads()})")
            torch.set_num_threads(state["threads"])
        log.truncate_after(position.global_step)
        if start.change:
            log.write({"step": position.global_step, "epoch": position.epoch,
                       "change": start.change.model_dump(mode="json")["fields"]})
        console.print(f"resuming {run} at epoch {position.epoch}, step {position.step}")
    else:  # the untrained model's numbers, the baseline every run is compared with
        log.write({"step": 0, "epoch": 0, "val": validate(model, val_store, tokenizer, recipe.val_images)})
    model.train()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("training", total=recipe.epochs * per_epoch, completed=position.global_step,
                            status="")
        while position.epoch < recipe.epochs:
            started, pairs = time.perf_counter(), 0
            for batch in loader.batches(position.epoch, position.step):
                lr = learning_rate(recipe, position.epoch, position.global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["scale"]
                clip = batch.clip_image.to(device) if config.model.enhancement == "cge" else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    losses = model(batch.regions.to(device), batch.region_lengths.to(device),
                                   batch.tokens.to(device), batch.token_lengths.to(device),
                                   batch.image_index.to(device), clip=clip, backend=recipe.backend)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                check_step_finite(losses["loss"], grad_norm, position)
                optimizer.step()
                position.step += 1
                position.global_step += 1
                pairs += len(batch.image_index)
                rate = pairs / (time.perf_counter() - started)
                log.write({"step": position.global_step, "epoch": position.epoch, "lr": lr,
                           "samples_per_s": round(rate, 1),
                           **{k: round(v.item(), 6) for k, v in losses.items()}})
                bar.update(task, advance=1, status=f"loss {losses['loss'].item():.4f}  {rate:.0f} pairs/s")
                if recipe.val_every and position.global_step % recipe.val_every == 0:
                    _validate_and_save(run, model, optimizer, config, position, val_store, tokenizer, log)
            position.epoch, position.step = position.epoch + 1, 0
            _validate_and_save(run, model, optimizer, config, position, val_store, tokenizer, log)
    write_report(run, log.records())
    return json.loads((run / CHECKPOINTS / "best" / "metrics.json").read_text())


def check_step_finite(loss: torch.Tensor, grad_norm: torch.Tensor, position: Position) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and every later number)."""
    loss_value, norm_value = loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
        raise NonFiniteError(f"step {position.global_step + 1} (epoch {position.epoch}): {what}; the run stopped "
                             "without applying it (lower train.lr or raise train.warmup_steps, then --resume "
                             "from the last checkpoint)")


def _validate_and_save(run, model, optimizer, config, position, val_store, tokenizer, log) -> None:
    metrics = validate(model, val_store, tokenizer, config.train.val_images)  # non-finite: NonFiniteError
    log.write({"step": position.global_step, "epoch": position.epoch, "val": metrics})
    best = metrics["rsum"] > position.best_rsum
    if best:
        position.best_rsum = metrics["rsum"]
    checkpoint.save(run, model, optimizer, config, dict(position.__dict__), metrics, best)


def write_report(run: Path, records: list[dict]) -> None:
    """loss.png, val_rsum.png and summary.md beside the log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "batch", "queue"):
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=key, linewidth=0.8)
    ax.set(xlabel="step", ylabel="UTO", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in vals], [r["val"]["rsum"] for r in vals], marker="o")
    ax.set(xlabel="step", ylabel="RSUM", title="validation RSUM")
    fig.tight_layout()
    fig.savefig(run / "val_rsum.png", dpi=120)
    plt.close(fig)
    from trainer.evaluate import format_table

    best = max(vals, key=lambda r: r["val"]["rsum"])
    untrained = [r for r in vals if r["step"] == 0]
    (run / "summary.md").write_text(
        f"# Run {run.name}\n\n{len(steps)} steps; best validation at step {best['step']} "
        f"(epoch {best['epoch']}).\n\n" + format_table(best["val"], "## Best validation") +
        (format_table(untrained[0]["val"], "\n## Untrained model (step 0)") if untrained else "") +
        "\n![loss](loss.png)\n\n![validation RSUM](val_rsum.png)\n")
