"""The Visual Genome BUTD detector's checkpoints as users have them (airsplay's .pkl, MILVLG's .pth), mapped
onto pipeline/butd_vg.py's network through explicit key tables: a file loads only if every key and shape
is accounted for. The two formats: docs/architecture.md, "The Visual Genome detector".
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from userpipe.pipeline.array_pickle import load_arrays
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import WeightsRef

Format = Literal["airsplay", "milvlg"]
ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
OBJECTNESS = "proposal_generator.rpn_head.objectness_logits."
MILVLG_NAMES = {  # this network's module -> MILVLG's
    "roi_heads.box_predictor.cls_embedding.": "roi_heads.box_predictor.cls_embed.",
    "roi_heads.box_predictor.fc_attr.": "roi_heads.box_predictor.attr_linear1.",
    "roi_heads.box_predictor.attr_score.": "roi_heads.box_predictor.attr_linear2.",
}
BACKGROUND_FIRST = (  # rows MILVLG orders with background (or "no attribute") first
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.cls_embedding.",
    "roi_heads.box_predictor.attr_score.",
)
BOX_DELTAS = "roi_heads.box_predictor.bbox_pred."
MILVLG_BATCHNORM_STAGES = ("backbone.res4.", "roi_heads.res5.")  # FREEZE_AT 3 leaves these trainable


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Entry:
    """One file key and how its tensor becomes the network's (and back)."""

    file_key: str
    to_model: Callable[[torch.Tensor], torch.Tensor] = _same
    to_file: Callable[[torch.Tensor], torch.Tensor] = _same


def _milvlg_entry(key: str) -> Entry:
    file_key = key
    for ours, theirs in MILVLG_NAMES.items():
        file_key = file_key.replace(ours, theirs)
    if key.startswith(BACKGROUND_FIRST):
        return Entry(file_key, lambda x: torch.roll(x, -1, 0), lambda x: torch.roll(x, 1, 0))
    if key.startswith(BOX_DELTAS):  # Caffe also regresses the background box: 4 more rows, first
        return Entry(file_key, lambda x: x[4:], lambda x: torch.cat([torch.zeros_like(x[:4]), x]))
    if key.startswith(OBJECTNESS):  # softmax over a (background, object) pair = sigmoid of their difference
        half = lambda x: len(x) // 2  # noqa: E731
        return Entry(
            file_key, lambda x: x[half(x) :] - x[: half(x)], lambda x: torch.cat([torch.zeros_like(x), x])
        )
    return Entry(file_key)


def key_table(model_keys, fmt: Format, folded_norms: bool = False) -> dict[str, Entry]:
    """Network key -> its entry in a `fmt` file. `folded_norms`: the file's norms hold no running
    statistics (airsplay's variant); they then load as mean 0, variance 1."""
    if fmt == "milvlg":
        return {k: _milvlg_entry(k) for k in model_keys}
    return {
        k: Entry(k) for k in model_keys if not (folded_norms and k.endswith(("running_mean", "running_var")))
    }


def file_state(model_state: dict[str, torch.Tensor], fmt: Format) -> dict[str, torch.Tensor]:
    """A network's state as a `fmt` file holds it (checkpoints for tests and benchmarks)."""
    state = {e.file_key: e.to_file(model_state[k]) for k, e in key_table(model_state, fmt).items()}
    if fmt == "milvlg":
        for key in model_state:
            if key.endswith(".norm.weight") and key.startswith(MILVLG_BATCHNORM_STAGES):
                state[key.replace(".weight", ".num_batches_tracked")] = torch.tensor(0)
    return state


def write_checkpoint(model_state: dict[str, torch.Tensor], path: Path, fmt: Format) -> None:
    state = file_state(model_state, fmt)
    if fmt == "airsplay":
        arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": arrays, "__author__": "userpipe (random weights)"}, f)
    else:
        torch.save({"model": state}, path)


def read_checkpoint(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        if zipfile.is_zipfile(path):  # torch.save
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = load_arrays(f)
            if isinstance(data, int):  # the magic number that starts torch.save's legacy format
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read detector weights {source}: {type(exc).__name__}: {exc}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise InputError(f"detector weights {source} hold a {type(data).__name__}, not a dict of tensors")
    state = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise InputError(f"detector weights {source}: '{key}' is a {type(value).__name__}, not an array")
        state[str(key)] = value
    return state


def checkpoint_format(state: dict[str, torch.Tensor], source: str) -> Format:
    if any(k.startswith(tuple(MILVLG_NAMES.values())) for k in state):
        return "milvlg"
    if any(k.startswith(tuple(MILVLG_NAMES)) for k in state):
        return "airsplay"
    raise InputError(
        f"detector weights {source} are neither airsplay's .pkl nor MILVLG's .pth BUTD checkpoint "
        "(no attribute head: roi_heads.box_predictor.cls_embedding or cls_embed)"
    )


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_checkpoint(model: nn.Module, ref: WeightsRef, check_only: bool = False) -> None:
    """Load `ref` into `model` through its format's key table; any missing or unexpected key or any other
    shape is a one-line InputError naming them. `check_only`: check keys and shapes (the model may be on
    the meta device)."""
    state = read_checkpoint(Path(ref.path), ref.source)
    fmt = checkpoint_format(state, ref.source)
    folded = fmt == "airsplay" and not any(k.endswith("running_var") for k in state)
    model_state = model.state_dict()
    table = key_table(model_state, fmt, folded)
    expected = {e.file_key: e.to_file(model_state[k]).shape for k, e in table.items()}
    optional = {ANCHORS}  # the config's anchors stand; a file's must equal them (below)
    counters = {
        k
        for k in state
        if fmt == "milvlg"
        and k.endswith(".num_batches_tracked")
        and k.replace(".num_batches_tracked", ".weight") in expected
    }
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected) - counters)
    reshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{len(missing)} missing ({_listed(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_listed(unexpected)})" if unexpected else "",
            f"{len(reshaped)} of another shape ({_listed(reshaped)})" if reshaped else "",
        ]
        raise InputError(
            f"detector weights {ref.source} ({fmt} format) do not fit the detector config: "
            + "; ".join(p for p in problems if p)
        )
    # the RPN's channels follow the anchors it was trained with: other anchors (detectron2's own order or
    # centring) would pair each channel with another box
    if (
        ANCHORS in state
        and ANCHORS in model_state
        and not torch.equal(state[ANCHORS].float(), model_state[ANCHORS])
    ):
        raise InputError(
            f"detector weights {ref.source}: {ANCHORS} differs from the config's Caffe anchors "
            f"(file {state[ANCHORS][0].tolist()}..., config {model_state[ANCHORS][0].tolist()}...)"
        )
    if check_only:
        return
    loaded = {k: e.to_model(state[e.file_key]) for k, e in table.items() if e.file_key in state}
    for key, value in model_state.items():  # the config's anchors; folded norms: mean 0, variance 1
        if key not in loaded:
            loaded[key] = (
                torch.ones_like(value)
                if key.endswith("running_var")
                else (torch.zeros_like(value) if key.endswith("running_mean") else value)
            )
    model.load_state_dict(loaded, strict=True)
