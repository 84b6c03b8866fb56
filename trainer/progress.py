"""What `userpipe train` shows while it runs: rich's bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from userpipe.trainer.step import Position


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

    def epoch_end(self, position: Position, metrics: dict | None, last_step: bool = False) -> None:
        """After an epoch's validation (`position.epoch` counts that epoch as done), or (`last_step`) the
        validation at train.max_steps, within an epoch."""
        if self.shown and self.epoch_losses:
            mean = sum(self.epoch_losses) / len(self.epoch_losses)
            validation = f"  validation RSUM {metrics['rsum']:.1f}" if metrics else ""
            done = (
                f"stopped in epoch {position.epoch + 1}/{self.epochs} (train.max_steps)"
                if last_step
                else f"epoch {position.epoch}/{self.epochs} done"
            )
            self.console.print(
                f"{done}  {self._numbers(position.global_step, mean)}" + validation,
                highlight=False,
            )
        self.losses.clear()
        self.epoch_losses.clear()
        self.last_line = time.monotonic()
