"""`--regions boxes`: the boxes the dataset's records carry (a `boxes` list per image, as the demo's), topped
up with a grid to R, pooled from a backbone."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import pooled_kind, register
from userpipe.schemas.errors import InputError


def _dataset(options, request):
    index = request.load()
    if not index.has_boxes:
        raise InputError(f"--regions boxes needs a 'boxes' list on every image record of {request.dataset}")
    return index, None


def _annotated(config, device: str):
    from userpipe.pipeline.regions import pad_with_grid

    return lambda width, height, annotated, pixels: pad_with_grid(
        annotated, width, height, config.num_regions
    )


register(pooled_kind("boxes", "the dataset's own boxes, topped up with a grid", _annotated, dataset=_dataset))
