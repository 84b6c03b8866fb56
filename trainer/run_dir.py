"""The run directory around its checkpoints: the record of the data a run reads (run.json), its log
(log.jsonl), and how a run starts from what is there (new, started again, or resumed), decided and
refused before anything is written. Checkpoints: trainer/checkpoint.py; the loop: trainer/train.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from userpipe.schemas.base import parse_json, read_model, validate_as
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import Output, write_text_atomic
from userpipe.schemas.run import LOG_LINES, RUN_RECORD_NAME, RunChange, RunConfig, RunData, RunRecord
from userpipe.schemas.sources import is_remote, location, resolved
from userpipe.trainer import checkpoint
from userpipe.trainer.checkpoint import CHECKPOINTS
from userpipe.trainer.shard_set import ShardSet
from userpipe.trainer.tracking import TENSORBOARD_FOLDER, WANDB_FOLDER

LOG_NAME = "log.jsonl"


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
        for number, record in enumerate(records, 1):
            kinds = [key for key in LOG_LINES if isinstance(record, dict) and key in record]
            if len(kinds) != 1:
                known = ", ".join(LOG_LINES)
                raise InputError(
                    f"{self.path} line {number} is not a log record (exactly one of the keys {known})"
                )
            validate_as(LOG_LINES[kinds[0]], record, f"{self.path} line {number}")
        return records

    def truncate_after(self, global_step: int) -> None:
        """On resume: drop what the killed run logged past the checkpoint it resumes from (and the change
        a killed resume recorded there: the resume records its own)."""
        kept = [
            r
            for r in self.records()
            if r.get("step", 0) < global_step or r.get("step", 0) == global_step and "change" not in r
        ]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def shards_identity(shards: ShardSet) -> str:
    """The shard set a run reads, by content: the manifest records of the selected shards."""
    records = [
        [Path(u).name, n, c, h]
        for u, n, c, h in zip(shards.urls, shards.samples, shards.captions, shards.sha256, strict=True)
    ]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def _flat(config: RunConfig) -> dict:
    return {
        f"{section}.{key}": value
        for section, fields in config.model_dump(mode="json").items()
        if isinstance(fields, dict)
        for key, value in fields.items()
    }


def differences(
    before: RunConfig, before_data: RunData | None, after: RunConfig, after_data: RunData
) -> dict:
    """field -> (before, after) for every recipe, model and data field that differs."""
    old, new = _flat(before), _flat(after)
    changed = {
        k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    }
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


def start_run(
    output: Output, config: RunConfig, data: RunData, resume: bool, allow_change: bool, console: Console
) -> Start:
    """Decide how the run starts, refusing before anything is written (on the claimed run directory)."""
    run, found = output.given, output.state
    checkpoint.recover(run)
    record_path = run / RUN_RECORD_NAME
    if found == "own" and checkpoint.has_checkpoint(run):
        if not resume:
            raise InputError(f"{run} already holds a run; pass --resume to continue it, or another --out")
        last = run / CHECKPOINTS / "last"
        previous = read_model(RunConfig, last / checkpoint.CONFIG, "checkpoint configuration")
        record = (
            read_model(RunRecord, record_path, "run record")
            if record_path.is_file()
            else RunRecord(data=data)
        )
        changed = differences(previous, record.data if record_path.is_file() else None, config, data)
        model_changes = [k for k in changed if k.startswith("model.")]
        if model_changes:
            raise InputError(
                f"--resume: {run} holds a checkpoint of another model configuration "
                f"({_listed(changed, model_changes)})"
            )
        # everything a resume reads is read (and a damaged file refused) before anything is written
        JsonLog(run / LOG_NAME).records()
        state = checkpoint.load_state(last / checkpoint.STATE)
        step = state["position"]["global_step"]
        # changes recorded by a resume killed before its next checkpoint were never applied: forget them
        record = record.model_copy(
            update={
                "data": data,
                "changes": tuple(c for c in record.changes if c.step < step),
                "id": record.id or new_run_id(),
            }
        )
        if changed:
            if not allow_change:
                raise InputError(
                    f"--resume: {run} was trained with {_listed(changed, list(changed))}; pass "
                    "--allow-change to continue with the change recorded in the run, or resume as it was"
                )
            console.print(f"continuing {run} with {_listed(changed, list(changed))} from step {step}")
            if "val_store" in changed:  # RSUMs of two validation sets do not compare: selection restarts
                best = state["position"]["best_rsum"]
                changed["best_rsum"] = (best if math.isfinite(best) else None, None)
                state["position"]["best_rsum"] = float("-inf")
                console.print(
                    "best-model selection starts again on the new validation set (recorded in the run); "
                    "'best' keeps the old set's choice until the first validation"
                )
            change = RunChange(step=step, fields=changed)
            return Start(
                config, record.model_copy(update={"changes": (*record.changes, change)}), state, change
            )
        return Start(config, record, state)
    if resume and found != "own":
        raise InputError(f"--resume: no run in {run}")
    if found == "own" and checkpoint.has_states(run):  # damaged or removed by hand: keep what is there
        raise InputError(
            f"{run}/{CHECKPOINTS} holds saved states but no usable 'last' checkpoint (removed or "
            "damaged); point the link 'last' at one of them to resume, or choose another --out"
        )
    if found == "own":  # killed before its first checkpoint: nothing to continue, so it starts again
        console.print(f"{run} has no checkpoint yet: starting it again")
        for folder in (CHECKPOINTS, TENSORBOARD_FOLDER, WANDB_FOLDER):  # its trackers' runs too
            shutil.rmtree(run / folder, ignore_errors=True)
        (run / LOG_NAME).unlink(missing_ok=True)
    return Start(config, RunRecord(data=data, id=new_run_id()))


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def _listed(changed: dict, keys: list[str]) -> str:
    return ", ".join(f"{k} {changed[k][0]} -> {changed[k][1]}" for k in keys)


def run_data(shards_spec: str, shards: ShardSet, val_store: Path) -> RunData:
    """What the run reads, by resolved path (a brace pattern: its folder), so a resume works from anywhere;
    a URL or pipe command as given."""
    spec = Path(shards_spec)
    return RunData(
        shards=shards_spec if is_remote(shards_spec) else str(spec.parent.resolve() / spec.name),
        shards_sha256=shards_identity(shards),
        val_store=resolved(val_store),
    )


def resume_inputs(run: Path, shards: str | None, val_store: Path | None, resume: bool) -> tuple[str, Path]:
    """The shards and validation store a command trains on: those given, else (on --resume) the run's."""
    if resume and (shards is None or val_store is None) and (run / RUN_RECORD_NAME).is_file():
        data = read_model(RunRecord, run / RUN_RECORD_NAME, "run record").data
        shards, val_store = shards or data.shards, val_store or location(data.val_store)
    if shards is None or val_store is None:
        raise InputError(f"pass {'--shards' if shards is None else '--val-store'}")
    return shards, val_store
