"""The one way userpipe reads an input from outside (and writes an object to an object store), and the one
map of how that fails.

A source is a local path, an http(s) URL (read with urllib, its Content-Length checked against what
arrived), an object-store URL (`s3://`, `gs://`, any scheme fsspec has a filesystem for; credentials from
the environment as that filesystem reads them, e.g. AWS_ACCESS_KEY_ID and AWS_ENDPOINT_URL for s3) or
`pipe:CMD` (CMD run by the shell, its standard output read). Every failure to read one is an
InputError (or the caller's subclass of it) of one line that names the source in words: "HTTP 404 (Not
Found) for URL", "connection refused to URL", "`CMD` exited with status 7 (curl: could not connect)".
Text is UTF-8, with or without a byte order mark; other bytes are refused naming the byte and the line.
"""

from __future__ import annotations

import codecs
import http.client
import mmap
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http import HTTPStatus
from pathlib import Path

from userpipe.schemas.errors import InputError

READ_SCHEMES = ("http", "https")
TIMEOUT_S = 60  # without a byte for this long, a server is taken as gone (webdataset's curl waited forever)
# webdataset's `curl --retry 30 --retry-delay 2` retried these answers (curl's transient HTTP errors)
RETRIES, RETRY_DELAY_S = 30, 2.0
TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
NO_HEAD = {405, 501}  # a server that does not answer HEAD: the size is checked as the shard streams
CHUNK = 1 << 20
# what curl's exit status means, for the statuses a download commonly ends with (`man curl`, EXIT CODES)
CURL_EXITS = {
    6: "cannot resolve host",
    7: "could not connect",
    22: "HTTP error >= 400",
    28: "timed out",
    56: "failure receiving data",
}


def is_remote(spec: str) -> bool:
    """A URL (any scheme) or a `pipe:` command, not a local path."""
    return "://" in spec or spec.startswith("pipe:")


def location(spec: str | Path) -> str | Path:
    """A store or shard location as given on a command line: a URL stays text (a Path would fold its
    `//`), a local path becomes a Path."""
    text = str(spec)
    return text if is_remote(text) else Path(text)


def resolved(spec: str | Path) -> str:
    """A location as metadata records it: a URL as given, a local path absolute."""
    text = str(spec)
    return text if is_remote(text) else str(Path(text).resolve())


def joined(folder: str | Path, name: str) -> str | Path:
    """`name` inside a folder or under a URL (a Path would fold a URL's `//`)."""
    return folder / name if isinstance(folder, Path) else f"{folder.rstrip('/')}/{name}"


def is_file(source: str | Path, what: str) -> bool:
    """A local file, or an object at an object-store URL, is there (asked afresh); fails as read_bytes."""
    if not is_remote(str(source)):
        return Path(source).is_file()
    with _object_store(str(source), f"cannot read {what}") as (filesystem, path):
        filesystem.invalidate_cache(path)
        return filesystem.isfile(path)


def write_object(url: str, local: Path, what: str) -> None:
    """Put a local file's bytes at an object-store URL in one request: readers see the previous object or the
    new one, whole. Fails as read_bytes ("cannot write WHAT: ...")."""
    with _object_store(url, f"cannot write {what}") as (filesystem, path):
        filesystem.put_file(str(local), path)


def remove_object(url: str, what: str) -> None:
    """Remove the object at an object-store URL, if it is there."""
    with _object_store(url, f"cannot remove {what}") as (filesystem, path), suppress(FileNotFoundError):
        filesystem.rm_file(path)  # already gone: what was asked


def objects_under(url: str, what: str) -> list[str]:
    """The objects under an object-store URL (empty: nothing is there), listed afresh; fails as read_bytes."""
    with _object_store(url, f"cannot read {what}") as (filesystem, path):
        filesystem.invalidate_cache(path)
        return filesystem.ls(path, detail=False) if filesystem.exists(path) else []


def read_bytes(
    source: str | Path, what: str, error: type[InputError] = InputError, mapped: bool = False
) -> bytes | memoryview:
    """All bytes of `source`. A failure raises `error` as "cannot read WHAT: REASON", the reason naming the
    source. `mapped`: a local regular file comes back as a read-only memoryview of its mapping (slices are
    views of the page cache, not copies)."""
    try:
        return _read(source, mapped)
    except _Unreadable as exc:
        raise error(f"cannot read {what}: {exc}") from None


def read_text(source: str | Path, what: str, error: type[InputError] = InputError) -> str:
    """The UTF-8 text of `source` (read_bytes), without a byte order mark."""
    return decode_text(read_bytes(source, what, error), str(source), error=error)


def decode_text(
    data: bytes | memoryview,
    source: str | Path,
    start: int = 0,
    line: int = 1,
    error: type[InputError] = InputError,
) -> str:
    """UTF-8 bytes as text, a leading byte order mark dropped. `start`, `line`: where the bytes begin in
    `source` (a piece of a larger file), for the message on bytes that are not UTF-8, which names the byte
    offset and the line."""
    data = bytes(data)
    skip = len(codecs.BOM_UTF8) if start == 0 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line += data.count(b"\n", 0, at)
        bad = data[at : skip + exc.end]
        raise error(
            f"{source} is not UTF-8 text at byte offset {start + at} (line {line}): {bad!r} ({exc.reason})"
        ) from None


class _Unreadable(Exception):
    """Why a source could not be read, in words naming it (read_bytes prefixes what it is)."""


def _read(source: str | Path, mapped: bool) -> bytes | memoryview:
    if isinstance(source, Path):
        return _read_file(source, mapped)
    if source.startswith("pipe:"):
        return _read_pipe(source[len("pipe:") :])
    if "://" not in source:
        return _read_file(Path(source), mapped)
    scheme = source.split("://", 1)[0].lower()
    if scheme in READ_SCHEMES:
        return _read_http(source)
    if scheme == "file":  # as webdataset read it
        return _read_file(Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)), mapped)
    return _read_object(source)


def _read_object(url: str) -> bytes:
    """An object through fsspec (s3://, gs://, ...): whole, or one line naming why not."""
    filesystem, path = _filesystem(url)
    with _object_errors(url):
        return filesystem.cat_file(path)


def _filesystem(url: str):
    """(fsspec filesystem, path in it) of an object-store URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # no filesystem for the scheme, e.g. "Install s3fs to access S3"
        raise _Unreadable(f"{url}: {exc}") from None


@contextmanager
def _object_store(url: str, failure: str) -> Iterator[tuple]:
    """(fsspec filesystem, path in it) of `url` for the block; whatever fails there is one InputError,
    "FAILURE: REASON"."""
    try:
        filesystem, path = _filesystem(url)
        with _object_errors(url):
            yield filesystem, path
    except _Unreadable as exc:
        raise InputError(f"{failure}: {exc}") from None


@contextmanager
def _object_errors(url: str) -> Iterator[None]:
    """The one map of an object store's answers to a line naming `url`."""
    try:
        yield
    except FileNotFoundError:
        raise _Unreadable(f"{url} does not exist") from None
    except PermissionError:
        raise _Unreadable(f"{url}: access denied") from None
    except Exception as exc:  # noqa: BLE001 - each backend has its own errors (botocore's NoCredentialsError, ...)
        raise _Unreadable(f"{url}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def _read_file(path: Path, mapped: bool) -> bytes | memoryview:
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if mapped and stat.S_ISREG(status.st_mode):
                if status.st_size == 0:  # an empty file cannot be mapped
                    return b""
                return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
            return file.read()
    except FileNotFoundError:
        raise _Unreadable(f"{path} does not exist") from None
    except IsADirectoryError:
        raise _Unreadable(f"{path} is a folder, not a file") from None
    except PermissionError:
        raise _Unreadable(f"{path}: permission denied") from None
    except OSError as exc:
        raise _Unreadable(f"{path}: {exc.strerror or exc}") from None


def _read_pipe(command: str) -> bytes:
    """The command's standard output; its standard error, on success, passes through."""
    try:  # by the shell, as webdataset's pipe: ran it
        done = subprocess.run(command, shell=True, capture_output=True)
    except OSError as exc:
        raise _Unreadable(f"`{command}` could not start ({exc.strerror or exc})") from None
    if done.returncode == 0:
        if done.stderr:
            sys.stderr.write(done.stderr.decode(errors="replace"))
        return done.stdout
    if done.returncode < 0:
        try:
            ending = f"was killed by {signal.Signals(-done.returncode).name}"
        except ValueError:  # a signal without a name (a real-time one)
            ending = f"was killed by signal {-done.returncode}"
    else:
        ending = f"exited with status {done.returncode}"
        try:
            program = Path(shlex.split(command)[0]).name
        except (ValueError, IndexError):
            program = ""
        if program == "curl" and done.returncode in CURL_EXITS:
            ending += f" (curl: {CURL_EXITS[done.returncode]})"
    said = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    last_said = f": {said[-1][:200]}" if said else ""  # e.g. curl -sS's or aws's own reason
    raise _Unreadable(f"`{command}` {ending}{last_said}")


def _read_http(url: str) -> bytes:
    """GET `url`, following redirects; an answer that may pass (TRANSIENT_HTTP) is asked again."""
    tries = 1
    while True:
        try:
            return _get(url)
        except _Transient as exc:
            if tries > RETRIES:
                raise _Unreadable(f"{exc} (after {tries} tries)") from None
            tries += 1
            time.sleep(RETRY_DELAY_S)


class _Transient(_Unreadable):
    """An HTTP answer that may pass (TRANSIENT_HTTP), asked again."""


def _open(url: str, method: str = "GET"):
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "userpipe"}, method=method), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as exc:
        exc.close()
        reason = _phrase(exc.code, exc.reason)
        failure = _Transient if exc.code in TRANSIENT_HTTP else _Unreadable
        refusal = failure(f"HTTP {exc.code}{f' ({reason})' if reason else ''} for {url}")
        refusal.status = exc.code
        raise refusal from None
    except urllib.error.URLError as exc:
        raise _connection_failure(url, exc.reason) from None
    except (http.client.HTTPException, OSError, ValueError) as exc:  # ValueError: a URL that does not parse
        raise _connection_failure(url, exc) from None


def announced_size(url: str, what: str, error: type[InputError] = InputError) -> int | None:
    """The size an http(s) server (a HEAD request) or an object store announces for `url`, None where it
    does not say or the source is neither: to find a missing or cut file before a long job reads it. Fails
    as read_bytes."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme and scheme not in (*READ_SCHEMES, "file"):
        try:
            filesystem, path = _filesystem(url)
            with _object_errors(url):
                return int(filesystem.size(path))
        except _Unreadable as exc:
            raise error(f"cannot read {what}: {exc}") from None
    if scheme not in READ_SCHEMES:
        return None
    try:
        with _open(url, "HEAD") as response:
            length = response.headers.get("Content-Length")
    except _Unreadable as exc:
        if getattr(exc, "status", None) in NO_HEAD:
            return None
        raise error(f"cannot read {what}: {exc}") from None
    return int(length) if length and length.isdigit() else None


def _get(url: str) -> bytes:
    response = _open(url)
    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        chunks, got, cut = [], 0, False
        try:
            while chunk := response.read(CHUNK):  # b"" at the end, or where the server closed early
                chunks.append(chunk)
                got += len(chunk)
        except http.client.IncompleteRead as exc:  # a chunked body cut short
            got, cut = got + len(exc.partial), True
        except TimeoutError:
            raise _Unreadable(f"no data from {url} for {TIMEOUT_S} s after {_of(got, expected)}") from None
        except (http.client.HTTPException, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise _Unreadable(f"the connection to {url} failed after {_of(got, expected)} ({why})") from None
    if cut or expected is not None and got != expected:
        raise _Unreadable(f"the connection to {url} closed after {_of(got, expected)}")
    return b"".join(chunks)


def _of(got: int, expected: int | None) -> str:
    return f"{got:,} of {expected:,} bytes" if expected is not None else f"{got:,} bytes"


def _phrase(code: int, reason: object) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return str(reason or "")


def _connection_failure(url: str, reason: object) -> _Unreadable:
    if isinstance(reason, ConnectionRefusedError):
        return _Unreadable(f"connection refused to {url}")
    if isinstance(reason, socket.gaierror):
        return _Unreadable(f"cannot resolve host {urllib.parse.urlsplit(url).hostname} in {url}")
    if isinstance(reason, TimeoutError):
        return _Unreadable(f"no answer from {url} within {TIMEOUT_S} s")
    if isinstance(reason, http.client.RemoteDisconnected):
        return _Unreadable(f"{url} closed the connection without a response")
    if isinstance(reason, OSError) and reason.strerror:
        return _Unreadable(f"cannot connect to {url} ({reason.strerror})")
    return _Unreadable(f"cannot connect to {url} ({' '.join(str(reason).split())})")
