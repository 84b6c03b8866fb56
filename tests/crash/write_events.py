"""The file operations that count as writes, for the audit hooks of the crash test (sitecustomize.py) and of
the tests' output-protocol check (conftest.py)."""

import os

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "shutil.rmtree",
    "userpipe.exchange",
}


def written_paths(event: str, args: tuple) -> tuple:
    """The arguments of an audit event that name what it writes (none for a read or another event)."""
    if event == "open":
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        return args[:1] if flags & WRITE_FLAGS or any(c in mode for c in "wax+") else ()
    return args if event in WRITE_EVENTS else ()
