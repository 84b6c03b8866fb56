"""`--regions npz:DIR`: bottom-up-attention.pytorch (MILVLG) files, one IMAGE_ID.npz per image, with each
box's object and attribute when their `info` holds them."""

from __future__ import annotations

from pathlib import Path

from userpipe.pipeline.region_kinds.registry import imported_kind, register


def _dataset(options, request):
    from userpipe.pipeline.importers import index_npz, plan_import

    index = request.load()
    return index, plan_import(f"npz:{options.source}", index_npz(Path(options.source)), index)


def _read(ref, feature_dim: int, detections: bool):
    from userpipe.pipeline.importers import checked_imported, read_npz

    return checked_imported(read_npz(ref, detections), feature_dim, detections)


register(imported_kind("npz", "bottom-up-attention.pytorch npz files", "DIR", _dataset, _read))
