"""The region kinds of `userpipe extract --regions`, one module each, registered when this package is
imported (as detectron2's registries fill): see registry.py for what a kind declares."""

from userpipe.pipeline.region_kinds import boxes, butd, butd_vg, grid, npz, precomp, tsv  # noqa: F401
from userpipe.pipeline.region_kinds.registry import (
    KINDS,
    RegionKind,
    RegionOptions,
    read_imported,
    region_kind,
    resolve_region_config,
)

__all__ = ["KINDS", "RegionKind", "RegionOptions", "read_imported", "region_kind", "resolve_region_config"]
