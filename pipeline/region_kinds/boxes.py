"""`--regions boxes`: the boxes the dataset's records carry (a `boxes` list per image, as the demo's), topped
up with a grid to R, pooled from a backbone."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import RegionKind, register
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import RegionConfig


def _resolve(options) -> RegionConfig:
    from userpipe.pipeline.regions import backbone_fields

    return RegionConfig(kind="boxes", **backbone_fields(options))


def _facts(config: RegionConfig, imports) -> tuple[int, None]:
    from userpipe.pipeline.regions import backbone_facts

    return backbone_facts(config)


def _dataset(options, request):
    index = request.load()
    if not index.has_boxes:
        raise InputError(f"--regions boxes needs a 'boxes' list on every image record of {request.dataset}")
    return index, None


def _build(config, device: str):
    from userpipe.pipeline.regions import RegionExtractor, pad_with_grid

    def propose(width, height, annotated, pixels):
        return pad_with_grid(annotated, width, height, config.num_regions)

    return RegionExtractor(config, propose, device)


register(
    RegionKind(
        "boxes",
        "the dataset's own boxes, topped up with a grid",
        reads=("backbone", "backbone_weights"),
        resolve=_resolve,
        facts=_facts,
        dataset=_dataset,
        build=_build,
    )
)
