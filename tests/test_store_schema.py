from pathlib import Path

import pytest
import zarr
from pydantic import ValidationError

from userpipe.pipeline.datasets import DatasetIndex, ImageRecord
from userpipe.pipeline.store import create_store
from userpipe.schemas.store import (
    ATTRS_KEY,
    DETECTION_ARRAYS,
    ExtractorConfig,
    GlobalConfig,
    RegionConfig,
    SplitSummary,
    StoreAttrs,
    StoreValidationError,
    WeightsRef,
    split_array_specs,
    validate_store,
)


def tiny_config(**changes) -> ExtractorConfig:
    fields = dict(
        dataset="t",
        splits=("test",),
        max_captions=None,
        num_regions=4,
        feature_dim=8,
        image_size=64,
        chunk_size=2,
        regions=RegionConfig(kind="grid", backbone="efficientnet_lite0"),
        global_encoder=GlobalConfig(kind="open_clip", model="m", image_dim=6, text_dim=6),
    )
    return ExtractorConfig(**{**fields, **changes})


def tiny_store(path: Path) -> zarr.Group:
    records = [
        ImageRecord(f"id{i}", f"{i}.jpg", tuple(f"cap {i}.{k}" for k in range(i + 1))) for i in range(3)
    ]
    index = DatasetIndex(name="t", image_root=path.parent, splits={"test": records}, max_captions=None)
    attrs = StoreAttrs(extractor=tiny_config(), splits={"test": SplitSummary(num_images=3, num_captions=6)})
    return create_store(path, attrs, index)


def test_created_store_validates_and_keeps_variable_caption_counts(tmp_path: Path):
    root = tiny_store(tmp_path / "s.zarr")
    attrs = validate_store(root)
    assert not attrs.complete and attrs.schema_version == "1.1"
    test = root["test"]
    assert test["caption_image"][:].tolist() == [0, 1, 1, 2, 2, 2]
    assert test["regions"].shape == (3, 4, 8) and test["regions"].chunks == (2, 4, 8)
    assert test["clip_text"].shape == (6, 6) and test["captions_done"].shape == (1,)
    assert test["images_done"].shape == (2,)


def test_a_schema_1_0_store_reads_as_before_and_butd_vg_stores_have_the_detection_arrays(tmp_path: Path):
    root = tiny_store(tmp_path / "old.zarr")
    root.attrs.put({ATTRS_KEY: {**root.attrs[ATTRS_KEY], "schema_version": "1.0"}})
    assert validate_store(zarr.open_group(str(tmp_path / "old.zarr"), mode="r")).schema_version == "1.0"
    assert "object_id" not in root["test"]

    weights = WeightsRef(source="w.pkl", sha256="0" * 64)
    butd_vg = RegionConfig(kind="butd-vg", detector="d", detector_weights=weights, detector_config=weights)
    specs = split_array_specs(tiny_config(regions=butd_vg), 3, 6)
    assert {name: (specs[name].shape, specs[name].dtype) for name in DETECTION_ARRAYS} == {
        "object_id": ((3, 4), "int16"),
        "object_conf": ((3, 4), "float16"),
        "attribute_id": ((3, 4), "int16"),
        "attribute_conf": ((3, 4), "float16"),
    }
    with pytest.raises(ValueError, match="regions need detector_config"):
        RegionConfig(kind="butd-vg", detector="d", detector_weights=weights)
    with pytest.raises(ValueError, match="min_regions does not apply to .grid. regions"):
        RegionConfig(kind="grid", backbone="efficientnet_lite0", min_regions=3)
    with pytest.raises(ValueError, match="exceeds num_regions"):
        tiny_config(regions=butd_vg.model_copy(update={"min_regions": 9}))
    # imported files with per-box objects and attributes keep them; other kinds cannot claim to
    imported = RegionConfig(kind="tsv", source="x.tsv", imported_detections=True)
    assert imported.has_detections and not RegionConfig(kind="tsv", source="x.tsv").has_detections
    assert set(DETECTION_ARRAYS) <= set(split_array_specs(tiny_config(regions=imported), 3, 6))
    with pytest.raises(ValueError, match="imported_detections does not apply to .precomp. regions"):
        RegionConfig(kind="precomp", source="d", imported_detections=True)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda root: root.attrs.put({}), "not a userpipe store"),
        (
            lambda root: root.attrs.put({ATTRS_KEY: {**root.attrs[ATTRS_KEY], "schema_version": "0.9"}}),
            "schema version '0.9' is not supported",
        ),
        (lambda root: root["test"].__delitem__("boxes"), "array 'test/boxes' is missing"),
        (lambda root: root["test"]["regions"].resize((2, 4, 8)), "has shape (2, 4, 8), expected (3, 4, 8)"),
    ],
)
def test_validation_names_what_is_wrong(tmp_path: Path, tamper, message: str):
    root = tiny_store(tmp_path / "s.zarr")
    tamper(root)
    with pytest.raises(StoreValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_store(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"))


def test_config_models_reject_inconsistent_settings():
    with pytest.raises(ValidationError, match="splits must be"):
        tiny_config(splits=("dev",))
    with pytest.raises(ValidationError, match="butd. regions need detector"):
        RegionConfig(kind="butd", backbone="resnet50")
    with pytest.raises(ValidationError, match="needs a source location"):
        RegionConfig(kind="tsv")
    with pytest.raises(ValidationError, match="needs image_dim"):
        GlobalConfig(kind="open_clip", model="m")
