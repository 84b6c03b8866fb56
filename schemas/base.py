"""What every schema shares: the frozen model base and reading a validated model from a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.errors import InputError


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Model = TypeVar("Model", bound=BaseModel)


def first_problem(exc: ValidationError) -> str:
    """`field.path: message` of a validation error's first problem, on one line."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def parse_json(text: str | bytes, source: Path | str):
    """JSON from `text`; a parse error names the source and the place."""
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise InputError(f"{source} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def read_model(cls: type[Model], path: Path, what: str) -> Model:
    """A validated `cls` from a JSON file; every way it can be wrong is one line naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no {what} at {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not {what}") from None
    return validate_as(cls, parse_json(data, path), f"{path} ({what})")


def validate_as(cls: type[Model], value, source: str) -> Model:
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise InputError(f"{source}: {first_problem(exc)}") from None
