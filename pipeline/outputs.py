"""Where a stage may write: the rules every userpipe output folder follows.

1. An output is new, an empty folder, or a folder holding userpipe's own output of the same kind
   (recognised by the metadata file that kind always writes). Anything else is refused: userpipe
   never deletes or overwrites what it did not write.
2. An output never is, contains or lies inside an input of the same command.
3. Replacing one's own output (`--overwrite`) builds the new output beside the old one
   (`.NAME.replacing` where a rerun resumes it, else a fresh `.NAME.new-*`) and swaps it in at the
   end, so an interrupted replacement leaves the old output as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
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
STORE = OutputKind("a userpipe store", lambda f: _validates(f / "zarr.json", StoreAttrs, "attributes", ATTRS_KEY))
SHARDS = OutputKind("userpipe shards", lambda f: _validates(f / MANIFEST_NAME, ShardManifest) or
                    _validates(f / PLAN_NAME, ShardPlanParams))
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
            relation = ("is" if target == source else "contains" if source.is_relative_to(target)
                        else "lies inside")
            raise InputError(f"{option} {out} {relation} the input {given}; choose an {option} apart from "
                             "the inputs")


def existing(out: Path, kind: OutputKind, option: str = "--out") -> str:
    """'new' (nothing there), 'empty' (an empty folder) or 'own' (userpipe's output of `kind`);
    anything else is refused, as are the working directory and the folders above it."""
    if not out.exists():  # a link to a folder not made yet counts as new: the folder is made at its target
        return "new"
    if not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise InputError(f"{option} {out} is the working directory or holds it; name a folder below it")
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
    """Where the replacement of `out` is built and, if interrupted, found again by a rerun (extract, shard:
    resumable); callers check what is there with `existing` before reusing or removing it."""
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.replacing")


def scratch_beside(out: Path) -> Path:
    """A new, uniquely named folder beside `out` to build a replacement in (never an existing folder)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))


def swap_in(new: Path, out: Path) -> None:
    """Put the finished `new` in the place of `out` (which may not exist): two renames, then the old
    output is removed. Only the instant between the renames holds neither. A symlinked `out` keeps its
    link: the folder it points to is the one replaced."""
    out = Path(out).resolve()
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old)  # onto the empty folder just made: nothing of anyone else's is in the way
        os.replace(new, out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)


def write_text_atomic(path: Path, text: str) -> None:
    """A whole file or the previous one, never a part: write beside, then rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
