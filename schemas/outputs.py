"""Where a stage may write: the rules every userpipe output folder follows.

1. An output is new, an empty folder, or a folder holding userpipe's own output of the same kind
   (recognised by the metadata file that kind always writes). Anything else is refused: userpipe
   never deletes or overwrites what it did not write.
2. An output never is, contains or lies inside an input of the same command.
3. Replacing one's own output (`--overwrite`) builds the new output beside the old one
   (`.NAME.replacing` where a rerun resumes it, else a fresh `.NAME.new-*`) and swaps it in at the
   end with one atomic exchange, so a replacement killed at any instant leaves the old output or the
   new one, whole; `recover` clears what a killed writer left beside it at the next start.
4. One writer per output: `writer_lock` holds an advisory lock beside it for the whole command.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import InputError
from schemas.index import MANIFEST_NAME as INDEX_MANIFEST_NAME
from schemas.index import IndexManifest
from schemas.run import RunConfig
from schemas.shard import MANIFEST_NAME, ShardManifest, ShardPlanParams
from schemas.store import ATTRS_KEY, StoreAttrs


def _validates(path: Path, model, *keys: str) -> bool:
    """The file holds JSON (at `keys` inside it, if given) that `model` accepts: userpipe wrote it."""
    try:
        value = json.loads(path.read_bytes())
        for key in keys:
            value = value[key]
        model.model_validate(value)
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        return False
    return True


def _is_demo(folder: Path) -> bool:
    try:
        tag = json.loads((folder / "dataset_demo.json").read_bytes())["userpipe_demo"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(tag, dict) and tag.get("generator") == "userpipe-demo"


@dataclass(frozen=True)
class OutputKind:
    name: str  # as messages say it: "a userpipe store", ...
    recognise: Callable[[Path], bool]  # does this folder hold userpipe's output of this kind (validated)?


PLAN_NAME = ".plan.json"  # the shard plan in progress (pipeline/shard.py writes it first, removes it last)
STORE = OutputKind(
    "a userpipe store", lambda f: _validates(f / "zarr.json", StoreAttrs, "attributes", ATTRS_KEY)
)
SHARDS = OutputKind(
    "userpipe shards",
    lambda f: _validates(f / MANIFEST_NAME, ShardManifest) or _validates(f / PLAN_NAME, ShardPlanParams),
)
RUN = OutputKind("a userpipe run", lambda f: _validates(f / "config.json", RunConfig))
INDEX = OutputKind("a userpipe index", lambda f: _validates(f / INDEX_MANIFEST_NAME, IndexManifest))
DEMO = OutputKind("the userpipe demo", _is_demo)


def check_apart(out: Path, inputs: Iterable[Path | str | None], option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = (
                "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            )
            raise InputError(
                f"{option} {out} {relation} the input {given}; choose an {option} apart from the inputs"
            )


def existing(out: Path, kind: OutputKind, option: str = "--out") -> str:
    """'new' (nothing there), 'empty' (an empty folder) or 'own' (userpipe's output of `kind`);
    anything else is refused, as are the working directory and the folders above it."""
    if not out.exists():  # a link to a folder not made yet counts as new: the folder is made at its target
        return "new"
    if not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise InputError(f"{option} {out} is the working directory or holds it; name a folder below it")
    if os.path.ismount(out):  # outputs are built beside their name and renamed into place
        raise InputError(f"{option} {out} is a mount point; name a folder inside it")
    if kind.recognise(out):
        return "own"
    if not any(out.iterdir()):
        return "empty"
    raise InputError(
        f"{option} {out} holds files that are not {kind.name}; userpipe writes only into new or "
        f"empty folders or its own output: choose another {option}"
    )


def check_file_target(path: Path, signature: str, option: str) -> None:
    """A single output file may replace only a file that userpipe wrote (it starts with `signature`)."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder, not a file")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(signature.encode())) != signature.encode():
                raise InputError(
                    f"{option} {path} exists and was not written by userpipe; choose another {option}"
                )


def replacement(out: Path) -> Path:
    """Where the replacement of `out` is built and, if interrupted, found again by a rerun (extract, shard:
    resumable); callers check what is there with `existing` before reusing or removing it."""
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.replacing")


def scratch_beside(out: Path) -> Path:
    """A new, uniquely named folder beside `out` to build a replacement in (never an existing folder)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))


def create_with(out: Path, files: dict[str, str], output: Path | None = None) -> None:
    """Make the folder `out` (nothing there, or an empty folder) holding `files`, all in one step: an
    output never exists without the metadata that makes it recognisable as userpipe's (a folder killed
    half-made would be refused by every rerun as someone else's). `output`: the output `out` is built
    for, when `out` is its `.NAME.replacing` (scratch is named after the output, so `recover` finds it)."""
    building = scratch_beside(output or out)
    try:
        for name, text in files.items():
            (building / name).write_text(text, encoding="utf-8")
    except OSError as exc:
        shutil.rmtree(building, ignore_errors=True)
        raise disk_full(exc, out, sum(len(t.encode()) for t in files.values())) or exc from None
    swap_in(building, out)


RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the kernel or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 on Linux
        return False
    at_cwd = -100
    sys.audit("userpipe.exchange", str(a), str(b))  # a system call made through ctypes is not audited
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_in(new: Path, out: Path) -> None:
    """Put the finished `new` in the place of `out` (which may not exist), then remove the old output.

    Where the filesystem can (ext4, xfs, btrfs, tmpfs), one atomic exchange: every reader and every crash
    sees the old output or the new one. Elsewhere two renames, the old one moved to `.NAME.old-*` first;
    `recover` puts it back if the process died between them. A symlinked `out` keeps its link: the
    folder it points to is the one replaced."""
    out = Path(out).resolve()
    if not out.exists():
        os.replace(new, out)
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    if _exchange(new, out):
        os.replace(new, retired)  # the old output, out of the way of a rerun that would resume `new`
    else:
        os.replace(out, retired)  # onto the empty folder just made: nothing of anyone else's is in the way
        os.replace(new, out)
    shutil.rmtree(retired)  # killed part-way: `recover` finishes it


def recover(out: Path) -> None:
    """Clear what a killed writer of `out` left beside it (call while holding `writer_lock(out)`): an old
    output moved aside by an interrupted two-rename swap goes back (or away, if the swap completed), and
    unfinished `.NAME.new-*` builds are removed. `.NAME.replacing` stays: the resumable stages reuse it."""
    out = Path(out).resolve()
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)
    for unfinished in out.parent.glob(f".{out.name}.new-*"):
        shutil.rmtree(unfinished)


@contextmanager
def writer_lock(out: Path, option: str = "--out") -> Iterator[None]:
    """Hold the one-writer lock of `out` (`.NAME.lock` beside it) while the block runs.

    flock: the kernel releases it when the process ends, however it ends, so a killed writer never leaves
    a stale lock. The file is removed on release; a locker re-checks after locking that the file it
    holds is still the one at the path, so two processes can never both hold the lock."""
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise InputError(
                f"{option} {out} is being written by process {holder}; wait for it to finish or "
                f"choose another {option}"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)  # the previous holder removed the file between our open and our lock: retry
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:  # still ours: never another's lock file
                os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(descriptor)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(InputError):
    """A write that did not fit; the message names the path and the bytes it needed."""


def human_bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{int(size)} bytes"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that `path` (or its nearest existing parent) is on."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full(exc: BaseException, path: Path, needed: int) -> DiskFullError | None:
    """The one-line error for a write of about `needed` bytes into `path` that failed for lack of space
    (None when `exc` is another failure)."""
    if not (isinstance(exc, OSError) and exc.errno in DISK_FULL):
        return None
    free = free_bytes(path)
    return DiskFullError(
        f"{path}: {exc.strerror}: the write needs about {human_bytes(needed)}, "
        f"{human_bytes(free)} are free there"
    )


def check_free_space(path: Path, needed: int) -> None:
    """Refuse a write of `needed` bytes before starting it when the filesystem cannot hold it."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(
            f"{path}: no space left: the write needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} are free there"
        )


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a folder: the names in it, so renames survive
    a power cut)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def written_whole(path: Path, needed: int = 0, scratch: Path | None = None) -> Iterator[Path]:
    """The one way a file, link or new folder appears under its name: the caller writes it at the scratch
    name this yields (beside `path`: `.NAME.tmp` unless given), and it is renamed onto `path` in one step
    when the block ends, so readers see the previous entry or the new one, whole. A failure removes the
    scratch entry; a full disk becomes DiskFullError quoting `needed` bytes."""
    temporary = scratch or path.with_name(f".{path.name}.tmp")
    _remove(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as exc:
        _remove(temporary)
        if isinstance(exc, OSError):
            raise disk_full(exc, path, needed) or exc from None
        raise


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """A whole text file or the previous one, never a part."""
    data = text.encode()
    with written_whole(path, len(data)) as temporary:
        temporary.write_bytes(data)
