"""`--regions butd-vg`: the Visual Genome bottom-up-attention detector (userpipe.pipeline.butd_vg, on
detectron2, imported only here and only when used), its kept boxes' res5 features and their detections."""

from __future__ import annotations

import hashlib

from userpipe.pipeline.region_kinds.registry import RegionKind, register
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import RegionConfig, WeightsRef

DETECTRON2_INSTALL = (
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2' "
    "then, in the userpipe checkout, pip install -e '.[butd]' (README: The Visual Genome detector)"
)
DEFAULT_CONFIG = "butd_vg_r101_c4"


def _model():
    try:
        from userpipe.pipeline import butd_vg
    except ImportError as exc:
        raise InputError(f"--regions butd-vg needs detectron2 ({exc}): {DETECTRON2_INSTALL}") from None
    return butd_vg


def _resolve(options) -> RegionConfig:
    from userpipe.pipeline.weights import local_weights

    model = _model()
    path = model.config_file(options.detector_config or DEFAULT_CONFIG)
    if not path.is_file():
        raise InputError(
            f"detector config not found: {options.detector_config} (a packaged name or a .yaml file)"
        )
    try:
        merged = model.load_config(path).dump()
    except Exception as exc:  # yacs and detectron2 raise many kinds for a malformed file
        raise InputError(f"detector config {path} is not a valid detectron2 config: {exc}") from None
    if not options.detector_weights:
        raise InputError(
            "--regions butd-vg needs --detector-weights FILE: airsplay's faster_rcnn_from_caffe_attr.pkl "
            "or MILVLG's bua-caffe-frcn-r101_with_attributes.pth (README: The Visual Genome detector)"
        )
    config_ref = WeightsRef(  # the hash of the merged config covers the _BASE_ files it names
        source=f"package:{path.stem}" if path.parent == model.CONFIG_DIR else str(path),
        path=str(path.resolve()),
        sha256=hashlib.sha256(merged.encode()).hexdigest(),
    )
    return RegionConfig(
        kind="butd-vg",
        detector=path.stem,
        detector_config=config_ref,
        detector_weights=local_weights(options.detector_weights, "detector"),
        min_regions=options.min_regions,
    )


def _facts(config: RegionConfig, imports) -> tuple[int, int]:
    facts = _model().checked_detector(config)  # a checkpoint that does not fit is refused here
    return facts.feature_dim, facts.short_side


def _build(config, device: str):
    try:
        from userpipe.pipeline.butd_vg import ButdVgExtractor
    except ImportError as exc:
        raise InputError(
            f"this store's butd-vg regions need detectron2 ({exc}): {DETECTRON2_INSTALL}"
        ) from None
    return ButdVgExtractor(config, device)


register(
    RegionKind(
        "butd-vg",
        "the Visual Genome BUTD detector, needs detectron2",
        reads=("detector_weights", "detector_config", "min_regions", "device"),
        resolve=_resolve,
        facts=_facts,
        build=_build,
    )
)
