"""Dask plumbing shared by the stages: a client on a LocalCluster or an existing scheduler, and
running a list of tasks under a rich progress bar."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from userpipe.schemas import threads
from userpipe.schemas.progress import progress_seconds


@contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[tuple[object, threads.Plan]]:
    """Yields (client, each task's thread plan): on a LocalCluster each worker's share of this machine's
    cores; on an existing scheduler the worker's own count (its OMP_NUM_THREADS, one under Dask's nanny)."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client, threads.Plan()
        return
    # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers; any value turns off glibc's adaptive mmap
    # threshold, so every large tensor is mmap'd and unmapped again: measured 2x slower extraction,
    # half the CPU spent in the kernel. Workers get Dask's other settings without it.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # The nanny writes those settings (OMP_NUM_THREADS=1, ...) into *this* process's environment to
    # spawn its worker, and leaves them there: every later subprocess of the caller would run on one
    # thread (a training run started after an extract computed other numbers than one started before).
    caller_environ = dict(os.environ)
    # One worker runs in this process (a thread): starting a worker process and importing torch, zarr
    # and the models again in it took longer than the whole task list of a small job.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _workers_ignore_ctrl_c():
        # Task errors reach us through the futures; worker logs would add only shutdown races (a last
        # heartbeat to the closed scheduler is logged as an ERROR with a traceback).
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=workers > 1,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        )
    try:
        with Client(cluster) as client:
            yield client, threads.worker_plan(workers)
    finally:
        cluster.close()
        os.environ.clear()
        os.environ.update(caller_environ)


@contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Ctrl-C reaches every process of the terminal's foreground group. Worker processes started while
    SIGINT is ignored keep ignoring it (Python installs no KeyboardInterrupt handler then), so only this
    process stops, and closing the cluster ends the workers, without a traceback from each."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:6.1f} {self.unit}/s" if speed else f"   ... {self.unit}/s"


def run_tasks(
    client, tasks: list[tuple[str, int, Callable, tuple]], console: Console, unit: str = "items"
) -> list:
    """Submit (bar name, size, function, args) tasks; advance each bar by the task's size as it ends.

    Returns the results in task order. A task's exception propagates (the stage stays resumable).
    """
    from distributed import as_completed

    every = progress_seconds()
    results: dict[str, object] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        bars = {}
        for name, size, _, _ in tasks:
            if name not in bars:
                bars[name] = progress.add_task(name, total=0)
            progress.update(bars[name], total=progress.tasks[bars[name]].total + size)
        futures = [client.submit(fn, *args, pure=False) for _, _, fn, args in tasks]
        meta = {f.key: (tasks[i][0], tasks[i][1]) for i, f in enumerate(futures)}
        last_line = time.monotonic()
        for future in as_completed(futures):
            results[future.key] = future.result()
            name, size = meta[future.key]
            progress.advance(bars[name], size)
            if not console.is_terminal and time.monotonic() - last_line >= every:
                console.print(_plain_line(progress.tasks, unit), highlight=False)
                last_line = time.monotonic()
    return [results[f.key] for f in futures]


def _plain_line(tasks, unit: str) -> str:
    """The bars as one line, for a log file (rich's bar draws nothing there until the end)."""
    parts = []
    for task in tasks:
        rate = f", {task.speed:.1f} {unit}/s" if task.speed else ""
        eta = f", ETA {datetime.timedelta(seconds=round(task.time_remaining))}" if task.time_remaining else ""
        parts.append(f"{task.description} {task.completed:.0f}/{task.total:.0f}{rate}{eta}")
    return "; ".join(parts)
