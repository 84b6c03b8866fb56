"""What every schema shares: the frozen model base, reading a validated model from a file, and a file's
sha256 (the identity manifests record)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.errors import InputError
from schemas.sources import decode_text, read_bytes


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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


def read_model(cls: type[Model], path: Path, what: str, error: type[InputError] = InputError) -> Model:
    """A validated `cls` from a JSON file; every way it can be wrong is one line naming the file, raised
    as `error` (e.g. ManifestError for manifests)."""
    if not path.exists():
        raise error(f"no {what} at {path}")
    if path.is_dir():
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
