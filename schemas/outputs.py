"""Where a stage may write: `claim`, the one output protocol every userpipe command that writes uses (an
output apart from the inputs, new or its own kind, one writer at a time, a killed predecessor recovered,
built beside its name and swapped in, its size checked first), and `claimed_paths`, the claims this process
holds. The rules one by one: docs/architecture.md, "Where stages may write".
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from userpipe.schemas.errors import InputError
from userpipe.schemas.index import MANIFEST_NAME as INDEX_MANIFEST_NAME
from userpipe.schemas.index import IndexManifest
from userpipe.schemas.run import RunConfig
from userpipe.schemas.shard import MANIFEST_NAME, ShardManifest, ShardPlanParams
from userpipe.schemas.sources import is_remote, joined, objects_under, read_bytes, remove_object, write_object
from userpipe.schemas.store import ATTRS_KEY, StoreAttrs


def _validates(path: Path | str, model, *keys: str) -> bool:
    """The file (or object) holds JSON (at `keys` inside it, if given) that `model` accepts: userpipe wrote
    it."""
    try:
        value = json.loads(read_bytes(path, "metadata"))
        for key in keys:
            value = value[key]
        model.model_validate(value)
    except (OSError, InputError, ValueError, KeyError, TypeError):  # pydantic's ValidationError: ValueError
        return False
    return True


def _is_demo(folder: Path) -> bool:
    try:
        tag = json.loads((folder / "dataset_demo.json").read_bytes())["userpipe_demo"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(tag, dict) and tag.get("generator") == "userpipe-demo"


def _starts_with(signature: bytes) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as file:
                return file.read(len(signature)) == signature
        except OSError:
            return False

    return recognise


@dataclass(frozen=True)
class OutputKind:
    name: str  # as messages say it: "a userpipe store", ...
    recognise: Callable[[Path | str], bool]  # does this path (or URL) hold userpipe's output of this kind?
    file: bool = False  # a single file (else a folder)
    replaceable: bool = True  # False: the command writes only a new output (its files carry no mark)
    at_url: bool = False  # may be written to an object store (`_existing_at_url`)


PLAN_NAME = ".plan.json"  # the shard plan in progress (pipeline/shard.py writes it first, removes it last)
HTML_SIGNATURE = "<!doctype html><meta charset='utf-8'><title>userpipe search</title>"
STORE = OutputKind(
    "a userpipe store",
    lambda f: _validates(joined(f, "zarr.json"), StoreAttrs, "attributes", ATTRS_KEY),
    at_url=True,
)
SHARDS = OutputKind(
    "userpipe shards",
    lambda f: (
        _validates(joined(f, MANIFEST_NAME), ShardManifest)
        or _validates(joined(f, PLAN_NAME), ShardPlanParams)
    ),
    at_url=True,
)
RUN = OutputKind("a userpipe run", lambda f: _validates(f / "config.json", RunConfig))
INDEX = OutputKind("a userpipe index", lambda f: _validates(f / INDEX_MANIFEST_NAME, IndexManifest))
DEMO = OutputKind("the userpipe demo", _is_demo)
HTML = OutputKind("a userpipe search page", _starts_with(HTML_SIGNATURE.encode()), file=True)
# export's formats carry no mark of who wrote them, so an export never replaces anything
EXPORT_FOLDER = OutputKind("export", lambda f: False, replaceable=False)
EXPORT_FILE = OutputKind("export", lambda f: False, file=True, replaceable=False)


URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")  # also a URL that a Path folded ("s3://b" -> "s3:/b")


def _place(spec: Path | str) -> tuple[str, PurePath]:
    """Where a location is, comparable with another's: (scheme, path) of an object-store URL, ("", absolute
    path) of a local one. (A `pipe:` command or an http(s) source is no place an output can be.)"""
    text = str(spec)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        return scheme.lower(), PurePosixPath("/", rest.strip("/"))
    return "", Path(text).resolve()


def _check_apart(out: Path | str, inputs: Iterable[Path | str | None], option: str) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs (a folder or a URL)."""
    scheme, target = _place(out)
    for given in inputs:
        if given is None or str(given) == "" or str(given).startswith("pipe:"):
            continue
        other, source = _place(given)
        if other != scheme:
            continue
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = (
                "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            )
            raise InputError(
                f"{option} {out} {relation} the input {given}; choose an {option} apart from the inputs"
            )


def _existing(out: Path, kind: OutputKind, option: str) -> str:
    """'new' (nothing there), 'empty' (an empty folder) or 'own' (userpipe's output of `kind`);
    anything else is refused, as are the working directory and the folders above it."""
    if not kind.replaceable and (out.exists() or out.is_symlink()):
        raise InputError(
            f"{option} {out} exists; {kind.name} writes only a new {'file' if kind.file else 'folder'}"
        )
    if not out.exists():  # a link to a folder not made yet counts as new: the folder is made at its target
        return "new"
    if kind.file:
        if out.is_dir():
            raise InputError(f"{option} {out} is a folder, not a file")
        if kind.recognise(out):
            return "own"
        raise InputError(f"{option} {out} exists and is not {kind.name}; choose another {option}")
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


def check_output(
    out: Path, kind: OutputKind, inputs: Iterable[Path | str | None] = (), option: str = "--out"
) -> str:
    """What `claim` checks first, without claiming: for a command to refuse a wrong output before costly
    preparation (loading models, reading a dataset). Returns the state `claim` would find."""
    if URL_LIKE.match(str(out)):
        return _existing_at_url(str(out), kind, inputs, option)
    _check_apart(out, inputs, option)
    return _existing(Path(out), kind, option)


def _existing_at_url(url: str, kind: OutputKind, inputs: Iterable[Path | str | None], option: str) -> str:
    """`_existing` for an output on an object store, apart from the inputs: 'new' (no object under the URL) or
    'own'."""
    if not kind.at_url or not is_remote(url):
        raise InputError(f"{option} {url}: {kind.name} is written to a local folder, not a URL")
    _check_apart(url, inputs, option)
    held = objects_under(url, f"{option} {url}")
    if not held:
        return "new"
    if kind.recognise(url):
        return "own"
    raise InputError(
        f"{option} {url} holds objects that are not {kind.name}; userpipe writes only where nothing is or "
        f"its own output: choose another {option}"
    )


_HELD: list[Path | str] = []  # this process's claimed outputs, resolved (or URLs)


def claimed_paths() -> tuple[Path | str, ...]:
    return tuple(_HELD)


@dataclass
class Output:
    """A claimed output (see `claim`): where to build it and how it is put in place."""

    path: Path | str  # resolved, or a URL (`at_url`)
    given: Path | str  # as the user named it, for messages
    kind: OutputKind
    state: str  # "new", "empty" or "own", as found under the lock
    option: str

    @property
    def at_url(self) -> bool:
        """On an object store: no rename, so nothing is built beside it and swapped in; each object is
        written whole, in one request."""
        return isinstance(self.path, str)

    def replacing(self) -> Path:
        """Where a resumable stage builds the replacement of its own output, found again by a rerun."""
        return self.path.with_name(f".{self.path.name}.replacing")

    def holds_own(self, folder: Path) -> bool:
        """`folder` (the output or its `replacing()`) holds this kind's output."""
        return _existing(folder, self.kind, self.option) == "own"

    def create(self, files: dict[str, str], at: Path | None = None) -> None:
        """Make the output folder (or `at`, its `replacing()`) holding `files`, all in one step: an output
        never exists without the metadata that makes it recognisable as userpipe's (a folder killed
        half-made would be refused by every rerun as someone else's)."""
        with self.built(sum(len(t.encode()) for t in files.values()), into=at) as building:
            for name, text in files.items():
                (building / name).write_text(text, encoding="utf-8")

    @contextmanager
    def built(self, needed: int = 0, into: Path | None = None) -> Iterator[Path]:
        """A fresh `.NAME.new-*` (folder, or file path for a file output) to build the whole output in,
        swapped into the output's place (or `into`) when the block ends; removed if it fails, a full disk
        becoming DiskFullError quoting `needed` bytes."""
        if needed:
            check_free_space(self.path.parent, needed)
        building = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.new-"))
        if self.kind.file:
            building.rmdir()  # the caller writes a file at this fresh name
        try:
            yield building
        except BaseException as exc:
            _remove(building)
            if isinstance(exc, OSError):
                raise disk_full(exc, self.path, needed) or exc from None
            raise
        self.swap_in(building, into)

    def swap_in(self, built: Path, into: Path | None = None) -> None:
        """Put a finished build (or the finished `replacing()`) in the output's place."""
        _swap_in(built, into or self.path)


@contextmanager
def claim(
    out: Path,
    kind: OutputKind,
    inputs: Iterable[Path | str | None] = (),
    option: str = "--out",
    needed: int = 0,
    own_only: bool = False,
) -> Iterator[Output]:
    """The one way a command takes an output: check it lies apart from every input and is new, empty or
    its own (`own_only`: must be its own, for commands that add to an output, e.g. a run's report), refuse
    a known size the disk cannot hold (`needed` bytes), take the writer lock, recover a killed predecessor,
    and yield the `Output` to build and swap in. Folders it made for the lock are removed again if the
    output never appeared."""
    inputs = list(inputs)
    if URL_LIKE.match(str(out)):
        state = _existing_at_url(str(out), kind, inputs, option)
        _HELD.append(str(out))
        try:  # no lock on an object store: what holds instead, docs/architecture.md "Object stores"
            yield Output(str(out), str(out), kind, state, option)
        finally:
            _HELD.remove(str(out))
        return
    out = Path(out)
    if own_only and not (out.is_dir() and kind.recognise(out)):
        raise InputError(f"{option} {out} is not {kind.name}")
    check_output(out, kind, inputs, option)
    if needed:
        check_free_space(out, needed)
    target = out.resolve()
    made = [folder for folder in target.parents if not folder.exists()]
    _HELD.append(target)
    try:
        with _writer_lock(target, out, option):
            _recover(target)
            yield Output(target, out, kind, _existing(out, kind, option), option)
    finally:
        _HELD.remove(target)
        if not target.exists():
            for folder in made:  # deepest first
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: it stays
                    break


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


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished `new` in the place of `out` (which may not exist), then remove the old output.

    Where the filesystem can (ext4, xfs, btrfs, tmpfs), one atomic exchange: every reader and every crash
    sees the old output or the new one. Elsewhere two renames, the old one moved to `.NAME.old-*` first;
    `_recover` puts it back if the process died between them. A symlinked `out` keeps its link: the
    folder it points to is the one replaced."""
    out = Path(out).resolve()
    if not out.exists() or out.is_file():
        os.replace(new, out)  # a file is replaced in one rename
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    if _exchange(new, out):
        os.replace(new, retired)  # the old output, out of the way of a rerun that would resume `new`
    else:
        os.replace(out, retired)  # onto the empty folder just made: nothing of anyone else's is in the way
        os.replace(new, out)
    shutil.rmtree(retired)  # killed part-way: `_recover` finishes it


def _recover(out: Path) -> None:
    """Clear what a killed writer of `out` left beside it (under its writer lock): an old output moved
    aside by an interrupted two-rename swap goes back (or away, if the swap completed), and unfinished
    `.NAME.new-*` builds are removed. `.NAME.replacing` stays: the resumable stages reuse it."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)
    for unfinished in out.parent.glob(f".{out.name}.new-*"):
        _remove(unfinished)


@contextmanager
def _writer_lock(target: Path, out: Path, option: str) -> Iterator[None]:
    """Hold the one-writer lock of `target` (`.NAME.lock` beside it) while the block runs.

    flock: the kernel releases it when the process ends, however it ends, so a killed writer never leaves
    a stale lock. The file is removed on release; a locker re-checks after locking that the file it
    holds is still the one at the path, so two processes can never both hold the lock."""
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
def written_whole(path: Path | str, needed: int = 0, scratch: Path | None = None) -> Iterator[Path]:
    """The one way a file, link or new folder appears under its name: the caller writes it at the scratch
    name this yields (beside `path`: `.NAME.tmp` unless given), and it is renamed onto `path` in one step
    when the block ends, so readers see the previous entry or the new one, whole. At an object-store URL the
    scratch is a local temporary file, put there in one request. A failure removes the scratch entry; a full
    disk becomes DiskFullError quoting `needed` bytes."""
    remote = not isinstance(path, Path)
    if remote:
        descriptor, name = tempfile.mkstemp(prefix=".userpipe-upload-")
        os.close(descriptor)
        temporary = Path(name)
    else:
        temporary = scratch or path.with_name(f".{path.name}.tmp")
        _remove(temporary)
    try:
        yield temporary
        if remote:
            write_object(path, temporary, path)
            temporary.unlink()
        else:
            os.replace(temporary, path)
    except BaseException as exc:
        _remove(temporary)
        if isinstance(exc, OSError):
            raise disk_full(exc, temporary if remote else path, needed) or exc from None
        raise


def remove_entry(entry: Path | str) -> None:
    """Remove a file, folder or link, or an object at an object-store URL, if it is there."""
    if isinstance(entry, Path):
        _remove(entry)
    else:
        remove_object(entry, entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """A whole text file or the previous one, never a part."""
    data = text.encode()
    with written_whole(path, len(data)) as temporary:
        temporary.write_bytes(data)
