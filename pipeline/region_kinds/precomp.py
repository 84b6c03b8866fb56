"""`--regions precomp:DIR`: SCAN's precomputed features ({split}_ims.npy, {split}_caps.txt, {split}_ids.txt),
the dataset read from those files, the images only for a global encoder."""

from __future__ import annotations

from pathlib import Path

from userpipe.pipeline.region_kinds.registry import RegionKind, register
from userpipe.schemas.store import RegionConfig


def _dataset(options, request):
    from userpipe.pipeline.importers import load_precomp

    return load_precomp(Path(options.source), request.dataset, request.root, request.splits)


def _read(ref, feature_dim: int, detections: bool):
    from userpipe.pipeline.importers import read_precomp

    return read_precomp(ref)


register(
    RegionKind(
        "precomp",
        "SCAN precomputed features",
        reads=(),
        location="DIR",
        resolve=lambda options: RegionConfig(kind="precomp", source=options.source),
        facts=lambda config, imports: (imports.feature_dim, None),
        dataset=_dataset,
        read=_read,
    )
)
