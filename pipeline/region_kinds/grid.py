"""`--regions grid`: R boxes tiling each image in near-square cells, pooled from a backbone (no detector)."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import pooled_kind, register


def _tiles(config, device: str):
    from userpipe.pipeline.regions import grid_boxes

    return lambda width, height, annotated, pixels: grid_boxes(width, height, config.num_regions)


register(pooled_kind("grid", "R boxes tiling the image, no detector", _tiles))
