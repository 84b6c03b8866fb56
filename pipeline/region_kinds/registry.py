"""What a region kind is to the rest of userpipe (`RegionKind`), and the registry that holds them.

A kind is one module of this package that calls `register` once; extract, the command line's help and
search read the registry, never a kind's name. What a store of the kind holds is the store contract,
`userpipe.schemas.store.REGION_KINDS` (readers of stores never build extractors, so it lives there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from userpipe.schemas.errors import InputError
from userpipe.schemas.store import ExtractorConfig, RegionConfig


@dataclass(frozen=True)
class RegionOptions:
    """The options of `userpipe extract` a region kind may read (None: not given)."""

    source: str | None = None  # after the colon of --regions KIND:LOCATION
    backbone: str | None = None
    backbone_weights: str | None = None
    detector_weights: str | None = None
    detector_config: str | None = None
    min_regions: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class DatasetRequest:
    """What extract asks for, to read a dataset as a kind needs it."""

    dataset: str
    root: Path | None
    splits: tuple[str, ...]
    load: Callable[[], object]  # the dataset's index (Karpathy JSON or the demo), splits selected


@dataclass(frozen=True)
class RegionKind:
    name: str
    summary: str  # one line for --help
    reads: tuple[str, ...]  # the RegionOptions it reads besides `source`; any other given is refused
    resolve: Callable[[RegionOptions], RegionConfig]  # names and files checked, weights resolved
    # -> (region width, the default shorter image side or None), checked once on the driver (a detector
    # checkpoint that does not fit is refused here, not in every task); `imports` for imported kinds
    facts: Callable[[RegionConfig, object | None], tuple[int, int | None]]
    location: str | None = None  # imported kinds: what follows the colon ("DIR", "GLOB")
    # -> (dataset index, import plan or None); default: the dataset as given, nothing imported
    dataset: Callable[[RegionOptions, DatasetRequest], tuple[object, object | None]] | None = None
    # computed kinds: (config, device) -> an extractor called per image; imported kinds: None
    build: Callable[[ExtractorConfig, str], Callable] | None = None
    # imported kinds: (ref, feature width, detections) -> that image's ImportedRegions
    read: Callable[..., object] | None = None

    def index_and_imports(self, options: RegionOptions, request: DatasetRequest):
        if self.dataset is None:
            return request.load(), None
        return self.dataset(options, request)


def pooled_kind(
    name: str,
    summary: str,
    proposer: Callable[[ExtractorConfig, str], Callable],
    *,
    reads: tuple[str, ...] = (),
    resolve_more: Callable[[RegionOptions], dict] | None = None,
    dataset=None,
) -> RegionKind:
    """A kind that pools a backbone's features (userpipe.pipeline.regions) over the boxes that
    `proposer(config, device)`'s function gives per image; `resolve_more`: its own config fields."""

    def resolve(options: RegionOptions) -> RegionConfig:
        from userpipe.pipeline.regions import backbone_fields

        more = resolve_more(options) if resolve_more else {}
        return RegionConfig(kind=name, **backbone_fields(options), **more)

    def facts(config: RegionConfig, imports) -> tuple[int, None]:
        from userpipe.pipeline.regions import backbone_facts

        return backbone_facts(config)

    def build(config: ExtractorConfig, device: str):
        from userpipe.pipeline.regions import RegionExtractor

        return RegionExtractor(config, proposer(config, device), device)

    reads = ("backbone", "backbone_weights", *reads)
    return RegionKind(name, summary, reads, resolve, facts, dataset=dataset, build=build)


def imported_kind(name: str, summary: str, location: str, dataset, read) -> RegionKind:
    """A kind read from feature files at `location` (`--regions NAME:LOCATION`); its width is the files'."""
    return RegionKind(
        name,
        summary,
        reads=(),
        resolve=lambda options: RegionConfig(kind=name, source=options.source),
        facts=lambda config, imports: (imports.feature_dim, None),
        location=location,
        dataset=dataset,
        read=read,
    )


KINDS: dict[str, RegionKind] = {}


def register(kind: RegionKind) -> RegionKind:
    KINDS[kind.name] = kind
    return kind


def region_kind(name: str) -> RegionKind:
    if name not in KINDS:
        choices = ", ".join(f"{k.name}:{k.location}" if k.location else k.name for k in KINDS.values())
        raise InputError(f"unknown region kind '{name}': use {choices}")
    return KINDS[name]


def resolve_region_config(
    kind: str,
    source: str | None,
    backbone: str | None,
    backbone_weights: str | None,
    detector_weights: str | None,
    detector_config: str | None = None,
    min_regions: int | None = None,
) -> RegionConfig:
    """A kind's configuration from the options as extract gives them (defaults applied by the kind)."""
    options = RegionOptions(
        source, backbone, backbone_weights, detector_weights, detector_config, min_regions
    )
    return region_kind(kind).resolve(options)


def read_imported(kind: str, ref, feature_dim: int, detections: bool = False):
    """One image's regions from an imported kind's source (ValueError: the image is invalid)."""
    return region_kind(kind).read(ref, feature_dim, detections)
