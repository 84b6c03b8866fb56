"""Experiment trackers (`train --report-to tensorboard,wandb`), fed from the records log.jsonl gets: the
log is the run's one record and every tracker shows the same numbers at the same steps.

A resumed run continues the same tracked run: TensorBoard's purge step hides what a killed run logged past
the checkpoint the resume starts from (as log.jsonl drops those lines), and W&B resumes the run id recorded
in run.json. What a tracker has is flushed before each checkpoint is saved, so no step that a checkpoint
covers is missing after a kill.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from userpipe.schemas.errors import InputError
from userpipe.schemas.run import RunConfig

TENSORBOARD_FOLDER, WANDB_FOLDER = "tensorboard", "wandb"  # in the run directory
WANDB_PROJECT = "userpipe"  # unless WANDB_PROJECT says otherwise

_NOT_SCALARS = ("step", "epoch")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a log.jsonl record by tracker tag: a step's as train/<key>, a validation's as
    val/rsum and val/<direction>/<metric>; a change or warning has none (it is text)."""
    if "val" in record:
        val = record["val"]
        tags = {"val/rsum": val["rsum"]}
        for direction in ("i2t", "t2i"):
            tags.update({f"val/{direction}/{name}": value for name, value in val[direction].items()})
        return tags
    if "loss" in record:
        return {
            f"train/{key}": value
            for key, value in record.items()
            if key not in _NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)
        }
    return {}


def _note(record: dict) -> tuple[str, str] | None:
    """A change or warning as (tag, text)."""
    if "warning" in record:
        return "warning", record["warning"]
    if "change" in record:
        return "change", json.dumps(record["change"])
    return None


class TensorBoardTracker:
    """Event files in RUN/tensorboard, written by torch's SummaryWriter (`tensorboard --logdir RUN`)."""

    def __init__(self, run: Path, first_step: int, run_id: str, config: RunConfig):
        from torch.utils.tensorboard import SummaryWriter  # checked by `check_trackers`

        # purge_step: events a killed run wrote from this step on are hidden by TensorBoard's readers
        self.writer = SummaryWriter(str(run / TENSORBOARD_FOLDER), purge_step=first_step)
        if first_step == 0:
            self.writer.add_text("config", f"```\n{config.model_dump_json(indent=1)}\n```", 0)

    def record(self, record: dict) -> None:
        step = record["step"]
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        note = _note(record)
        if note:
            self.writer.add_text(*note, step)
        self.writer.flush()  # watched while it runs; a flush is one write, small beside a training step

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run with the run's id (in RUN/wandb; WANDB_MODE=offline keeps it there for `wandb sync`)."""

    def __init__(self, run: Path, first_step: int, run_id: str, config: RunConfig):
        import wandb  # checked by `check_trackers`

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                id=run_id,
                name=run.name,
                dir=str(run),  # W&B writes RUN/wandb (WANDB_FOLDER)
                resume="allow",  # a resumed userpipe run continues its W&B run
                config=config.model_dump(mode="json"),
                settings=wandb.Settings(console="off", silent=True),  # rich owns the console
            )
        except Exception as exc:  # noqa: BLE001 - W&B's errors (no login, no network) have no common base
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"--report-to wandb: {first} (run `wandb login`, or set WANDB_MODE=offline to sync later)"
            ) from None

    def record(self, record: dict) -> None:
        values: dict = {**scalars(record)}
        note = _note(record)
        if note:
            values[note[0]] = note[1]
        if values:
            # W&B keeps a run's history in increasing steps: a resume re-logging steps a killed run already
            # sent keeps the first values (rewinding a run is not generally available)
            self.run.log(values, step=record["step"])

    def flush(self) -> None:
        pass  # W&B's service process receives each record as it is logged

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # a failed run is marked so in W&B


# name -> (module it needs, the tracker); `--report-to` takes a comma-separated list of names
TRACKERS: dict[str, tuple[str, Callable]] = {
    "tensorboard": ("tensorboard", TensorBoardTracker),
    "wandb": ("wandb", WandbTracker),
}


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """`--report-to a,b` -> the tracker names, each known and its package installed (one line if not)."""
    import importlib.util

    if not value:
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",")))
    for name in names:
        if name not in TRACKERS:
            raise InputError(f"--report-to: unknown tracker '{name}' (choose from {', '.join(TRACKERS)})")
        module = TRACKERS[name][0]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"--report-to {name} needs the {module} package: pip install {module}")
    return names


class TrackedLog:
    """log.jsonl and the trackers: each record goes to the log first, then to every tracker."""

    def __init__(self, log):
        self.log, self.trackers = log, []

    def open(
        self, names: tuple[str, ...], run: Path, first_step: int, run_id: str, config: RunConfig
    ) -> None:
        """The trackers named, continuing the run from `first_step` (0 for a new run); each is kept as it
        opens, so one that fails leaves the others to be closed."""
        for name in names:
            self.trackers.append(TRACKERS[name][1](run, first_step, run_id, config))

    def write(self, record: dict) -> None:
        self.log.write(record)
        for tracker in self.trackers:
            tracker.record(record)

    def records(self) -> list[dict]:
        return self.log.records()

    def truncate_after(self, global_step: int) -> None:
        self.log.truncate_after(global_step)

    def flush(self) -> None:
        """Before a checkpoint is saved: what the trackers hold is written out."""
        for tracker in self.trackers:
            tracker.flush()

    def close_on_exit(self, exc_type, exc, traceback) -> bool:
        """An ExitStack exit callback: close every tracker, telling it whether the run failed."""
        for tracker in self.trackers:
            tracker.close(failed=exc_type is not None)
        return False
