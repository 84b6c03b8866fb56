"""Settings that hold for a whole process, in one place: each is called at an entry point (a command
in userpipe/cli.py or the stage function it calls, tests/conftest.py, a benchmark), never by library
code as a side effect of building or loading something."""

from __future__ import annotations

import os
from pathlib import Path

# MKL's strict reproducibility mode on this CPU's own code path: matmuls whose bits do not depend on memory
# alignment (measured at 1.01-1.05x the default step; COMPATIBLE, one code path for every x86 CPU, 2.2-3.4x:
# bench/results/train_throughput.md)
REPRODUCIBLE_MKL = "AUTO,STRICT"


def reproducible_cpu_math() -> None:
    """MKL's conditional-numerical-reproducibility mode, before the process's first MKL call: what
    `userpipe train --deterministic` (and the test suite, whose comparisons are exact) runs with.

    MKL picks matmul kernels by memory alignment, so the same CPU run differs in the last bits between
    processes, and a resumed run drifts from the uninterrupted one (Adam amplifies it). REPRODUCIBLE_MKL
    fixes that on the same kind of CPU at a small cost in speed; a value already set is kept
    (MKL_CBWR=COMPATIBLE: the same bits on every x86 CPU).
    """
    os.environ.setdefault("MKL_CBWR", REPRODUCIBLE_MKL)


def cpu_model() -> str:
    """This machine's CPU, as the kernel names it: MKL's AUTO code path depends on it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def quiet_model_loading() -> None:
    """No progress bar per model load (transformers and huggingface_hub read this when imported): it would
    drown a command's one-line output. A value already set is kept."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def keep_freed_memory() -> bool:
    """glibc malloc keeps what a training step frees for the next step instead of handing it back: no
    mmap for large blocks (M_MMAP_MAX = 0) and no trimming of the heap's top (M_TRIM_THRESHOLD).

    By default every tensor over 32 MB (and many smaller ones) is a fresh mmap, so each step page-faults
    its activations in again: about 1 µs per 4 KiB page here, some 100k pages per image-encoder step at
    COCO size. Memory is reused at the step's peak rather than returned to the system, which a training
    process wants anyway. Only where the C library is glibc (elsewhere nothing changes: False).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
