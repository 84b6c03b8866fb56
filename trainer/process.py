"""Settings that hold for a whole process, in one place: each is called at an entry point (a command
in userpipe/cli.py or the stage function it calls, tests/conftest.py, a benchmark), never by library
code as a side effect of building or loading something."""

from __future__ import annotations

import os


def reproducible_cpu_math() -> None:
    """MKL's conditional-numerical-reproducibility mode, before the process's first MKL call: what
    `userpipe train --deterministic` (and the test suite, whose comparisons are exact) runs with.

    MKL picks matmul kernels by memory alignment, so the same CPU run differs in the last bits between
    processes, and a resumed run drifts from the uninterrupted one (Adam amplifies it). MKL_CBWR=COMPATIBLE
    fixes that at a cost in speed (bench/results/train_throughput.md), so it is an option, not the default;
    a value already set is kept.
    """
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE")


def quiet_model_loading() -> None:
    """No progress bar per model load (transformers and huggingface_hub read this when imported): it would
    drown a command's one-line output. A value already set is kept."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
