"""Loading run configurations: presets shipped in trainer/configs/, or a user's YAML, with overrides."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.errors import InputError
from schemas.run import RunConfig


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for key in path:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def load_run_config(name_or_path: str, overrides: dict | None = None) -> RunConfig:
    """A preset name (coco, f30k, demo) or a YAML/JSON file, with dotted overrides
    ({"train.lr": 1e-4, "model.enhancement": "none"})."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(str(files("trainer") / "configs" / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise InputError(f"unknown config '{name_or_path}' (presets: coco, f30k, demo, or a .yaml file)")
    tree = yaml.safe_load(path.read_text())
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig(**tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"config {name_or_path}: {where}: {first['msg']}") from None
