"""`userpipe train`: streaming batches → USER → UTO → AdamW, with validation, checkpoints and logs.

One loop, nanoGPT-style. The run directory holds:
  config.json              the resolved RunConfig
  log.jsonl                one line per step ({"step", "epoch", "loss", "batch", "queue", "lr", ...})
                           and per validation ({"val": {...metrics}})
  checkpoints/last, best   model.safetensors + config.json + state.pt (optimizer, schedule, RNG,
                           loader position, best RSUM), each directory replaced atomically
  summary.md, loss.png, val_rsum.png   written at the end
A run killed at any point resumes (`--resume`) from its last checkpoint and, since data order,
augmentation and dropout are all seeded, ends where the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.outputs import RUN, check_apart, existing
from schemas.base import parse_json, read_model
from schemas.errors import InputError
from schemas.run import RunConfig
from trainer.captions import CaptionTokenizer
from trainer.encode import encode_split, open_split
from trainer.evaluate import retrieval_metrics
from trainer.loader import LoaderSettings, ShardSet, StreamingLoader
from trainer.model import USER, build_model

CHECKPOINTS = "checkpoints"


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


def _save_checkpoint(run: Path, name: str, model: USER, optimizer, config: RunConfig, position: Position) -> None:
    from safetensors.torch import save_model

    final = run / CHECKPOINTS / name
    temporary = run / CHECKPOINTS / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(model, str(temporary / "model.safetensors"))
    (temporary / "config.json").write_text(config.model_dump_json(indent=1))
    torch.save({"optimizer": optimizer.state_dict(), "position": position.__dict__,
                "torch_rng": torch.get_rng_state(), "threads": torch.get_num_threads()}, temporary / "state.pt")
    old = run / CHECKPOINTS / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def initial_model(config: RunConfig, bert=None) -> USER:
    """The untrained model a run of `config` starts from (seeded: the same every time)."""
    torch.manual_seed(config.train.seed)
    return build_model(config.model, bert)


def load_checkpoint(directory: Path, bert=None) -> tuple[USER, RunConfig]:
    """A model and its config from a checkpoint directory (…/checkpoints/best), on the GPU if any."""

    if not (directory / "model.safetensors").is_file():
        raise InputError(f"no checkpoint at {directory}")
    config = read_model(RunConfig, directory / "config.json", "checkpoint configuration")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config.model, bert).to(device)
    load_weights(model, directory / "model.safetensors", device)
    return model, config


def load_state(path: Path) -> dict:
    """A checkpoint's training state (optimizer, position, RNG); a damaged file is one line naming it."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except FileNotFoundError:
        raise InputError(f"{path} is missing: the checkpoint is incomplete") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch all report a damaged file their own way
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(state, dict) or not {"optimizer", "position", "torch_rng"} <= set(state):
        raise InputError(f"{path} is not a userpipe training state")
    return state


def load_weights(model: USER, path: Path, device) -> None:
    """A checkpoint's weights into `model`; a damaged or foreign file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), device=str(device))
    except (SafetensorError, RuntimeError) as exc:
        raise InputError(f"{path} is damaged or holds another model: {str(exc).splitlines()[0][:200]}") from None


def load_trained(directory: Path) -> tuple[USER, RunConfig, CaptionTokenizer]:
    """A checkpoint's model and config, and the tokenizer of its text model: what encoding needs."""
    model, config = load_checkpoint(directory)
    return model, config, CaptionTokenizer.for_text_model(config.model.text_model)


def validate(model: USER, store: Path, tokenizer: CaptionTokenizer, max_images: int | None) -> dict:
    emb = encode_split(model, store, "val", tokenizer, max_images, progress=False)
    return retrieval_metrics(emb.images @ emb.captions.T, emb.caption_image)


class JsonLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = [parse_json(line, f"{self.path} line {number}")
                   for number, line in enumerate(self.path.read_bytes().splitlines(), 1)]
        wrong = next((n for n, r in enumerate(records, 1) if not isinstance(r, dict)), None)
        if wrong is not None:
            raise InputError(f"{self.path} line {wrong} is not a log record (a JSON object)")
        return records

    def truncate_after(self, global_step: int) -> None:
        """On resume: drop what the killed run logged past the checkpoint it resumes from."""
        kept = [r for r in self.records() if r.get("step", 0) <= global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train(run: Path, shards_spec: str, val_store: Path, config: RunConfig, resume: bool, console: Console,
          bert=None) -> dict:
    """Train (or resume) and return the best validation metrics."""
    recipe = config.train
    shards = ShardSet.resolve(shards_spec)
    check_fits(config, shards, shards_spec)
    check_apart(run, [Path(shards.urls[0]).parent, val_store])
    found = existing(run, RUN)
    if resume:
        saved = run / CHECKPOINTS / "last" / "config.json"
        if found != "own" or not saved.is_file():
            raise InputError(f"--resume: no checkpoint in {run}")
        previous = read_model(RunConfig, saved, "checkpoint configuration")
        if previous.model != config.model:
            raise InputError(f"--resume: {run} holds a checkpoint of another model configuration")
        config = previous
        recipe = config.train
        # everything a resume reads is read (and a damaged file refused) before anything is written
        JsonLog(run / "log.jsonl").records()
        state = load_state(run / CHECKPOINTS / "last" / "state.pt")
    elif (run / CHECKPOINTS).exists():
        raise InputError(f"{run} already holds a run; pass --resume to continue it, or another --out")
    open_split(val_store, "val", config.model, recipe.val_images)
    tokenizer = CaptionTokenizer.for_text_model(config.model.text_model)
    loader = StreamingLoader(shards, tokenizer, LoaderSettings(recipe.batch_size, recipe.seed, recipe.workers,
                                                               train=True))
    per_epoch = loader.batches_per_epoch()
    if per_epoch == 0:
        raise InputError(f"{shards_spec} holds fewer pairs than one batch of {recipe.batch_size}")
    # every check above ran before the first write
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(config.model_dump_json(indent=1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = initial_model(config, bert).to(device)
    optimizer = build_optimizer(model, recipe)
    position = Position()
    log = JsonLog(run / "log.jsonl")
    if not resume:  # a run stopped before its first checkpoint starts again from nothing
        log.path.unlink(missing_ok=True)
    else:
        load_weights(model, run / CHECKPOINTS / "last" / "model.safetensors", device)
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
        console.print(f"resuming {run} at epoch {position.epoch}, step {position.step}")

    if not resume:  # the untrained model's numbers, the baseline every run is compared with
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
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
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


def _validate_and_save(run, model, optimizer, config, position, val_store, tokenizer, log) -> None:
    metrics = validate(model, val_store, tokenizer, config.train.val_images)
    log.write({"step": position.global_step, "epoch": position.epoch, "val": metrics})
    if metrics["rsum"] > position.best_rsum:
        position.best_rsum = metrics["rsum"]
        _save_checkpoint(run, "best", model, optimizer, config, position)
        (run / CHECKPOINTS / "best" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _save_checkpoint(run, "last", model, optimizer, config, position)


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
