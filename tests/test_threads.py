"""The thread policy (schemas/threads.py): set before torch loads, the user's settings win, a command's
threads follow the cores other processes leave free, a deterministic run keeps one count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from kit import run_cli
from typer.testing import CliRunner

from userpipe.schemas import threads


def fresh_process(code: str, **env: str | None) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    environ.update({k: v for k, v in env.items() if v is not None})
    for name in (k for k, v in env.items() if v is None):
        environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=environ
    ).stdout.strip()


STARTED = """
import os, sys, userpipe
from userpipe.schemas import threads
print(threads._Window.started is not None, "torch" in sys.modules, *(k for k in os.environ if "OMP" in k))
"""


def test_importing_userpipe_starts_the_first_window_before_torch_and_leaves_openmp_alone():
    assert fresh_process(STARTED, OMP_NUM_THREADS=None) == "True False"
    assert (
        fresh_process(STARTED, OMP_NUM_THREADS=None, OMP_WAIT_POLICY="PASSIVE")
        == "True False OMP_WAIT_POLICY"
    )


def test_the_users_omp_num_threads_fixes_the_count_and_torchruns_default_does_not(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.command_plan() == threads.Plan(3, fixed=True)
    assert threads.worker_plan(4) == threads.Plan(3, fixed=True)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.command_plan() == threads.Plan(None)
    assert threads.worker_plan(2) == threads.Plan(max(1, threads.available_cpus() // 2))
    # a torchrun rank: torchrun set OMP_NUM_THREADS=1 (its own environment at start had none)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "_initial_environment", lambda pid: {"PATH"})
    assert threads.command_plan() == threads.Plan(max(1, threads.available_cpus() // 2))
    monkeypatch.setattr(threads, "_initial_environment", lambda pid: {"OMP_NUM_THREADS"})  # the user's
    assert threads.command_plan() == threads.Plan(1, fixed=True)


class Competitor:
    """CPU time used on this process's CPUs: this process's own, plus `cores` busy others."""

    def __init__(self, monkeypatch, cores: float):
        self.cores, self.since, self.used = cores, time.monotonic(), 0.0
        monkeypatch.setattr(threads, "_everyone_seconds", self.everyone)
        monkeypatch.setattr(threads, "available_cpus", lambda: 4)
        monkeypatch.setattr(threads, "WINDOW_SECONDS", 0.0)

    def busy(self, cores: float) -> None:
        self.used, self.since, self.cores = self.others(), time.monotonic(), cores

    def others(self) -> float:
        return self.used + self.cores * (time.monotonic() - self.since)

    def everyone(self) -> float:
        return time.process_time() + self.others()


@pytest.mark.parametrize(("others", "expected"), [(0.0, 4), (0.3, 4), (1.0, 3), (2.6, 1), (3.9, 1)])
def test_a_share_uses_the_cores_others_leave_free_within_its_budget(monkeypatch, others, expected):
    before = torch.get_num_threads()
    Competitor(monkeypatch, others)
    with threads.sharing(threads.Plan(4)):
        time.sleep(0.05)
        threads.adjust()
        assert torch.get_num_threads() == expected
    assert torch.get_num_threads() == before  # the thread's count is back


def test_a_share_follows_a_competitor_that_comes_and_goes_and_faiss_follows_torch(monkeypatch):
    import faiss

    competitor = Competitor(monkeypatch, 0.0)
    with threads.sharing(threads.Plan(4)):
        counts = []
        for cores in (0.0, 2.0, 2.0, 0.0):
            threads.adjust()  # the window starts
            competitor.busy(cores)
            time.sleep(0.05)
            threads.adjust()
            counts.append((torch.get_num_threads(), faiss.omp_get_max_threads()))
    assert counts == [(4, 4), (2, 2), (2, 2), (4, 4)]


def test_a_fixed_plan_and_a_fixed_share_never_change(monkeypatch):
    Competitor(monkeypatch, 3.0)
    with threads.sharing(threads.Plan(2, fixed=True)):
        time.sleep(0.02)
        threads.adjust()
        assert torch.get_num_threads() == 2
    with threads.sharing(threads.Plan(4)):
        threads.fix(3)  # a deterministic run: one count for the whole run
        time.sleep(0.02)
        threads.adjust()
        assert torch.get_num_threads() == 3


def test_adjust_outside_a_share_changes_nothing(monkeypatch):
    before = torch.get_num_threads()
    Competitor(monkeypatch, 3.9)
    threads.adjust()
    threads.fix(before + 1)
    assert torch.get_num_threads() == before


MEASURED = """
import json, time, userpipe
from userpipe.schemas import threads
import torch
with threads.sharing():
    budget = torch.get_num_threads()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        pass
    threads.adjust()
    seen = {"budget": budget, "threads": torch.get_num_threads(), "cpus": threads.available_cpus()}
    print(json.dumps(seen))
"""


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures other processes through /proc/stat")
def test_a_real_busy_process_beside_a_command_takes_a_thread_from_it():
    busy = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"
    competitor = subprocess.Popen([sys.executable, "-c", busy])
    try:
        time.sleep(0.3)
        seen = json.loads(fresh_process(MEASURED, OMP_NUM_THREADS=None))
    finally:
        competitor.kill()
        competitor.wait()
    assert seen["threads"] <= max(1, seen["cpus"] - 1)
    assert seen["threads"] <= seen["budget"]


def test_every_command_runs_within_a_share(monkeypatch, tmp_path):
    import userpipe.schemas.store_reader as store_reader

    seen = []

    def summary(path):
        seen.append(threads._active.share is not None)
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(store_reader, "store_summary", summary)
    result = run_cli(CliRunner(), "info", tmp_path / "none.zarr")
    assert result.exit_code == 2 and seen == [True]
    assert threads._active.share is None


def test_a_command_that_does_not_load_torch_is_not_made_to_by_its_share(tmp_path):
    """`sharing()` takes hold of torch's count only once torch is loaded: `userpipe info` stays quick."""
    code = f"""
import sys
from userpipe.cli import main
sys.argv = ["userpipe", "info", {str(tmp_path / "none.zarr")!r}]
try:
    main()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""
    assert fresh_process(code).splitlines()[-1] == "2 False"
