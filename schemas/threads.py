"""The thread policy of every process userpipe runs, decided before torch loads and kept by one mechanism.

`prepare_process()` runs when anything of userpipe is first imported (userpipe/__init__.py), so before
torch in every entry point: the command, `python -m bench.*`, a Dask worker's first task, a torchrun rank.
It starts the first window of the measurement below. OpenMP's wait policy stays libgomp's default (idle
threads spin ~3 ms before they sleep): the fastest alone, and harmless beside a load once the thread count
adapts (bench/results/contention.md compares spin counts). An explicit OMP_NUM_THREADS fixes the count.

Within a command (`sharing()`, entered by userpipe/cli.py's `command` decorator and by each Dask task),
`adjust()` at the heavy loops' steps sets torch's intra-op threads to the cores the last window left free:
its CPUs (affinity, capped by a cgroup quota) less the CPU time other processes used on them, within the
process's budget. OpenMP splits each operation statically across its threads, so one thread that shares a
core with another process holds back all the others; fewer threads, each on a core of its own, finish
sooner. Measurements: docs/architecture.md, "Threads on a shared machine"; bench/results/contention.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

THREADS_SETTING = "OMP_NUM_THREADS"
WINDOW_SECONDS = 1.0  # how often adjust() measures again; shorter windows count too few clock ticks
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit


def prepare_process() -> None:
    """At import, before torch loads: the start of the first measurement window, so that a command's first
    adjust() already knows how busy its cores were while it started."""
    _Window.started = _Window.now()


@dataclass(frozen=True)
class Plan:
    """How many intra-op threads a process may use: `budget`, fewer while its cores are busy unless
    `fixed`. None: torch's own count (its default, or the environment's OMP_NUM_THREADS)."""

    budget: int | None = None
    fixed: bool = False


def user_threads() -> int | None:
    """The user's OMP_NUM_THREADS: it fixes every userpipe process's count. The 1 that torchrun sets for
    its ranks when the user set none is torchrun's, not the user's (torchrun's own environment at its
    start shows which)."""
    value = os.environ.get(THREADS_SETTING, "")
    if not value.isdigit() or int(value) < 1:
        return None
    if "LOCAL_WORLD_SIZE" in os.environ and THREADS_SETTING not in _initial_environment(os.getppid()):
        return None
    return int(value)


def _initial_environment(pid: int) -> set[str]:
    try:
        names = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {THREADS_SETTING}  # cannot tell: the value stands
    return {name.split(b"=", 1)[0].decode(errors="replace") for name in names if name}


def command_plan() -> Plan:
    """A command's plan: the user's OMP_NUM_THREADS, fixed; a torchrun rank's share of its node's cores
    (torchrun sets one thread per rank); otherwise torch's default count, adapting."""
    threads = user_threads()
    if threads is not None:
        return Plan(threads, fixed=True)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return Plan(max(1, available_cpus() // ranks) if ranks > 1 else None)


def worker_plan(workers: int) -> Plan:
    """Each of `workers` Dask worker processes on this machine: its share of the cores, adapting; the
    user's OMP_NUM_THREADS, fixed, when set."""
    threads = user_threads()
    if threads is not None:
        return Plan(threads, fixed=True)
    return Plan(max(1, available_cpus() // max(1, workers)))


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity, capped by its cgroup's CPU quota."""
    cpus, group = len(_affinity()), _Cgroup.find()
    return max(1, min(cpus, math.ceil(group.quota()))) if group else cpus


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


class _Cgroup:
    """This process's cgroup (v2), when it has a CPU quota: its CPU time then is what others compete for."""

    _found: _Cgroup | None | bool = False

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def find(cls) -> _Cgroup | None:
        if cls._found is False:
            cls._found = None
            try:
                lines = Path("/proc/self/cgroup").read_text().splitlines()
                path = next(line[3:] for line in lines if line.startswith("0::"))
                group = cls(Path("/sys/fs/cgroup") / path.lstrip("/"))
                if group.quota():
                    cls._found = group
            except (OSError, StopIteration, ValueError):
                pass
        return cls._found or None

    def quota(self) -> float | None:
        limit, period = (self.folder / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)

    def used_seconds(self) -> float:
        stats = dict(line.split() for line in (self.folder / "cpu.stat").read_text().splitlines())
        return int(stats["usage_usec"]) / 1e6


@dataclass
class _Window:
    """CPU seconds used on this process's CPUs (by everyone) and by this process, at one moment."""

    wall: float
    everyone: float | None  # None: not measurable here (no /proc/stat): the budget stands
    own: float
    started = None  # the first window's start: prepare_process()

    @classmethod
    def now(cls) -> _Window:
        return cls(time.monotonic(), _everyone_seconds(), time.process_time())

    def others_since(self, earlier: _Window) -> float | None:
        """The cores other processes kept busy on average between `earlier` and this window."""
        seconds = self.wall - earlier.wall
        if self.everyone is None or earlier.everyone is None or seconds <= 0:
            return None
        return max(0.0, (self.everyone - earlier.everyone) - (self.own - earlier.own)) / seconds


def _everyone_seconds() -> float | None:
    group = _Cgroup.find()
    if group is not None:
        return group.used_seconds()
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    cpus, ticks = {f"cpu{c}" for c in _affinity()}, 0
    for line in lines:
        name, *fields = line.split()
        if name in cpus:  # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]
    return ticks / _TICK


class _Share:
    """One thread's share. It takes hold of torch's count when torch is loaded (at entry, or at the first
    adjust() or fix()), so a command that never loads torch (info, verify, shard) does not import it."""

    def __init__(self, plan: Plan):
        self.plan, self.fixed = plan, plan.fixed
        self.torch = self.before = self.budget = None
        # the first share's window starts at import: a command's first decision comes with its first step
        self.window, _Window.started = _Window.started or _Window.now(), None
        if "torch" in sys.modules:
            self.hold()

    def hold(self) -> None:
        """torch's count as this share found it, then the plan's budget."""
        if self.torch is None:
            import torch

            self.torch, self.before = torch, torch.get_num_threads()
            self.budget = self.plan.budget or self.before
            self.set(self.budget)

    def set(self, threads: int) -> None:
        """torch's intra-op threads, and faiss's (its own OpenMP pool) once something loaded it."""
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)
        if "faiss" in sys.modules:
            sys.modules["faiss"].omp_set_num_threads(threads)

    def adjust(self) -> None:
        self.hold()
        if self.fixed or time.monotonic() - self.window.wall < WINDOW_SECONDS:
            return
        now = _Window.now()
        others = now.others_since(self.window)
        if others is not None:
            self.set(min(self.budget, max(1, math.floor(available_cpus() - others + 0.5))))
        self.window = now


_active = threading.local()  # OpenMP's thread count is per calling thread: so is the share


@contextlib.contextmanager
def sharing(plan: Plan | None = None) -> Iterator[None]:
    """The calling thread's torch work within `plan` (default: command_plan()), adapting to the free cores
    at each adjust(); the thread's previous count afterwards. Nested: the outer share stands."""
    if getattr(_active, "share", None) is not None:
        yield
        return
    share = _Share(plan or command_plan())
    _active.share = share
    try:
        yield
    finally:
        _active.share = None
        if share.torch is not None:
            share.set(share.before)


def adjust() -> None:
    """At a step of heavy work: the calling thread's torch threads for the cores free now (measured over
    the last WINDOW_SECONDS); nothing outside `sharing()`."""
    share = getattr(_active, "share", None)
    if share is not None:
        share.adjust()


def fix(threads: int | None = None) -> None:
    """From here on the calling thread's count stays `threads` (default: its current one): a deterministic
    run's reductions must split work the same way at every step and on resume."""
    share = getattr(_active, "share", None)
    if share is None:
        return
    share.hold()
    if threads is not None:
        share.set(threads)
    share.fixed = True
