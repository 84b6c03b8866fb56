"""Crash injection for tests/test_crash.py (on PYTHONPATH only there): every Python process of the command
counts its write-like file operations under USERPIPE_CRASH_SCOPE in one shared counter file, and the one
that makes the USERPIPE_CRASH_AT-th kills the command's whole process group with SIGKILL, as the OOM
killer or a batch scheduler would. Without USERPIPE_CRASH_AT it only counts (the total of a clean run)."""

import os
import signal
import sys

_COUNTER = os.environ.get("USERPIPE_CRASH_COUNTER")
_SCOPE = os.environ.get("USERPIPE_CRASH_SCOPE")
_AT = int(os.environ.get("USERPIPE_CRASH_AT", "0"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.truncate",
    "shutil.rmtree",
    "userpipe.exchange",
}


def _in_scope(args) -> bool:
    return any(isinstance(a, (str, bytes, os.PathLike)) and os.fsdecode(a).startswith(_SCOPE) for a in args)


if _COUNTER and _SCOPE:
    _descriptor = os.open(_COUNTER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _hook(event: str, args: tuple) -> None:
        if event == "open":
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if not flags & _WRITE_FLAGS or not _in_scope(args[:1]):
                return
        elif event not in _EVENTS or not _in_scope(args):
            return
        os.write(_descriptor, b"x")
        if (
            _AT and os.fstat(_descriptor).st_size >= _AT
        ):  # >=: two processes may append between write and stat
            sys.stderr.write(f"crash injected at write operation {_AT}: {event} {args[:2]}\n")
            os.killpg(os.getpgrp(), signal.SIGKILL)

    sys.addaudithook(_hook)
