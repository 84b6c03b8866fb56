"""Crash injection for tests/test_crash.py (on PYTHONPATH only there): every Python process of the command
counts its write-like file operations under USERPIPE_CRASH_SCOPE in one shared counter file, and the one
that makes the USERPIPE_CRASH_AT-th kills the command's whole process group with SIGKILL, as the OOM
killer or a batch scheduler would. Without USERPIPE_CRASH_AT it only counts (the total of a clean run)."""

import os
import signal
import sys

from write_events import written_paths

_COUNTER = os.environ.get("USERPIPE_CRASH_COUNTER")
_SCOPE = os.environ.get("USERPIPE_CRASH_SCOPE")
_AT = int(os.environ.get("USERPIPE_CRASH_AT", "0"))


def _in_scope(args) -> bool:
    return any(isinstance(a, (str, bytes, os.PathLike)) and os.fsdecode(a).startswith(_SCOPE) for a in args)


if _COUNTER and _SCOPE:
    _descriptor = os.open(_COUNTER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _hook(event: str, args: tuple) -> None:
        if not _in_scope(written_paths(event, args)):
            return
        os.write(_descriptor, b"x")
        if (
            _AT and os.fstat(_descriptor).st_size >= _AT
        ):  # >=: two processes may append between write and stat
            sys.stderr.write(f"crash injected at write operation {_AT}: {event} {args[:2]}\n")
            os.killpg(os.getpgrp(), signal.SIGKILL)

    sys.addaudithook(_hook)
