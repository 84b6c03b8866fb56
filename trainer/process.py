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
