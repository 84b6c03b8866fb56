"""What every schema shares: the frozen model base, reading a validated model from a file, and a file's
sha256 (the identity manifests record)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import decode_text, read_bytes


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ranges shared by configurations and command options (one definition each)
MAX_SEED = 2**32 - 1  # numpy's SeedSequence and torch.manual_seed both take it; offsets stay in int64
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
# more local worker processes than this only compete for the cores (and a typo of 2**70 would fork until
# memory runs out)
LocalWorkers = Annotated[int, Field(ge=1, le=4 * (os.cpu_count() or 1))]


class Options(BaseModel):
    """A command's options, validated where the command starts: a value out of range is one line naming
    its flag, before anything is read or written."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def checked(cls: type[Model], **values) -> Model:
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "options"
            raise InputError(f"{flag} {error.get('input')!r}: {error['msg']}") from None


Model = TypeVar("Model", bound=BaseModel)


def first_problem(exc: ValidationError) -> str:
    """`field.path: message` of a validation error's first problem, on one line."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def parse_json(text: str | bytes | memoryview, source: Path | str):
    """JSON from `text` (bytes: UTF-8, with or without a byte order mark); a parse error names the source
    and the place."""
    try:
        return json.loads(text if isinstance(text, str) else decode_text(text, source))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def read_model(cls: type[Model], path: Path | str, what: str, error: type[InputError] = InputError) -> Model:
    """A validated `cls` from a JSON file (or an object at a URL); every way it can be wrong is one line
    naming the file, raised as `error` (e.g. ManifestError for manifests)."""
    if isinstance(path, Path) and not path.exists():
        raise error(f"no {what} at {path}")
    if isinstance(path, Path) and path.is_dir():
        raise error(f"{path} is a folder, not {what}")
    data = read_bytes(path, what, error)
    try:
        return validate_as(cls, parse_json(data, path), f"{path} ({what})")
    except InputError as exc:
        raise error(str(exc)) from None


def validate_as(cls: type[Model], value, source: str) -> Model:
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise InputError(f"{source}: {first_problem(exc)}") from None


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
