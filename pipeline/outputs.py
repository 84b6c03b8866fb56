"""Where a stage may write: the rules every userpipe output folder follows.

1. An output is new, an empty folder, or a folder holding userpipe's own output of the same kind
   (recognised by the metadata file that kind always writes). Anything else is refused: userpipe
   never deletes or overwrites what it did not write.
2. An output never is, contains or lies inside an input of the same command.
3. Replacing one's own output (`--overwrite`) builds the new output beside the old one
   (`.NAME.replacing`) and swaps it in at the end, so an interrupted replacement leaves the old
   output as it was; a rerun picks the replacement up again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import InputError


def _json_has(path: Path, *keys: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def _is_store(folder: Path) -> bool:
    try:
        with open(folder / "zarr.json", encoding="utf-8") as f:
            attributes = json.load(f).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and "userpipe" in attributes


@dataclass(frozen=True)
class OutputKind:
    name: str  # as messages say it: "a store", "shards", ...
    recognise: Callable[[Path], bool]  # does this folder hold userpipe's output of this kind?


STORE = OutputKind("a userpipe store", _is_store)
SHARDS = OutputKind("userpipe shards", lambda f: (f / "manifest.json").is_file() or (f / ".plan.json").is_file())
RUN = OutputKind("a userpipe run", lambda f: _json_has(f / "config.json", "model", "train"))
INDEX = OutputKind("a userpipe index", lambda f: (f / "index.json").is_file())
DEMO = OutputKind("the userpipe demo", lambda f: _json_has(f / "dataset_demo.json", "userpipe_demo"))


def check_apart(out: Path, inputs: Iterable[Path | str | None], option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = ("is" if target == source else "contains" if source.is_relative_to(target)
                        else "lies inside")
            raise InputError(f"{option} {out} {relation} the input {given}; choose an {option} apart from "
                             "the inputs")


def existing(out: Path, kind: OutputKind, option: str = "--out") -> str:
    """'new' (nothing there), 'empty' (an empty folder) or 'own' (userpipe's output of `kind`);
    anything else is refused."""
    if not out.exists() and not out.is_symlink():
        return "new"
    if not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder")
    if kind.recognise(out):
        return "own"
    if not any(out.iterdir()):
        return "empty"
    raise InputError(f"{option} {out} holds files that are not {kind.name}; userpipe writes only into new or "
                     f"empty folders or its own output: choose another {option}")


def check_file_target(path: Path, signature: str, option: str) -> None:
    """A single output file may replace only a file that userpipe wrote (it starts with `signature`)."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder, not a file")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(signature.encode())) != signature.encode():
                raise InputError(f"{option} {path} exists and was not written by userpipe; choose another {option}")


def replacement(out: Path) -> Path:
    """Where the replacement of `out` is built."""
    return out.with_name(f".{out.name}.replacing")


def swap_in(new: Path, out: Path) -> None:
    """Put the finished `new` in the place of `out` (which may not exist): two renames, then the old
    output is removed. Only the instant between the renames holds neither."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """A whole file or the previous one, never a part: write beside, then rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
