"""`--regions grid`: R boxes tiling each image in near-square cells, pooled from a backbone (no detector)."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import RegionKind, register
from userpipe.schemas.store import RegionConfig


def _resolve(options) -> RegionConfig:
    from userpipe.pipeline.regions import backbone_fields

    return RegionConfig(kind="grid", **backbone_fields(options))


def _facts(config: RegionConfig, imports) -> tuple[int, None]:
    from userpipe.pipeline.regions import backbone_facts

    return backbone_facts(config)


def _build(config, device: str):
    from userpipe.pipeline.regions import RegionExtractor, grid_boxes

    def propose(width, height, annotated, pixels):
        return grid_boxes(width, height, config.num_regions)

    return RegionExtractor(config, propose, device)


register(
    RegionKind(
        "grid",
        "R boxes tiling the image, no detector",
        reads=("backbone", "backbone_weights"),
        resolve=_resolve,
        facts=_facts,
        build=_build,
    )
)
