"""`--regions precomp:DIR`: SCAN's precomputed features ({split}_ims.npy, {split}_caps.txt, {split}_ids.txt),
the dataset read from those files, the images only for a global encoder."""

from __future__ import annotations

from pathlib import Path

from userpipe.pipeline.region_kinds.registry import imported_kind, register


def _dataset(options, request):
    from userpipe.pipeline.importers import load_precomp

    return load_precomp(Path(options.source), request.dataset, request.root, request.splits)


def _read(ref, feature_dim: int, detections: bool):
    from userpipe.pipeline.importers import read_precomp

    return read_precomp(ref)


register(imported_kind("precomp", "SCAN precomputed features", "DIR", _dataset, _read))
