"""Loading run configurations: presets shipped in trainer/configs/, or a user's YAML, with overrides."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml

from userpipe.schemas.base import validate_as
from userpipe.schemas.errors import InputError
from userpipe.schemas.run import RunConfig
from userpipe.schemas.sources import read_text


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for depth, key in enumerate(path):
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise InputError(f"--set {dotted}: {'.'.join(path[: depth + 1])} is a value, not a section")
    tree[leaf] = value


def parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` strings -> {key: value}, the value read as YAML (numbers, booleans, lists)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--set needs key=value, got {pair!r}")
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError(
                f"--set {pair}: the value is not valid YAML ({getattr(exc, 'problem', exc)})"
            ) from None
    return parsed


def load_run_config(source: str | RunConfig, overrides: dict | None = None) -> RunConfig:
    """A preset name (coco, f30k, demo), a YAML/JSON file or a run's configuration, with dotted overrides
    ({"train.lr": 1e-4, "model.enhancement": "none"})."""
    if isinstance(source, RunConfig):
        tree, name = source.model_dump(mode="json"), "the run's configuration"
    else:
        tree, name = _read_tree(source), f"config {source}"
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return validate_as(RunConfig, tree, name)


def _read_tree(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(str(files("userpipe.trainer") / "configs" / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise InputError(f"unknown config '{name_or_path}' (presets: coco, f30k, demo, or a .yaml file)")
    try:
        tree = yaml.safe_load(read_text(path, "the config"))
    except yaml.YAMLError as exc:
        raise InputError(f"config {path} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise InputError(f"config {path} is {'empty' if tree is None else 'not a mapping of sections'}")
    return tree
