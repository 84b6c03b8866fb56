from pathlib import Path

import numpy as np
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
    assert not attrs.complete and attrs.schema_version == "1.2"
    test = root["test"]
    assert test["caption_image"][:].tolist() == [0, 1, 1, 2, 2, 2]
    # per-image arrays of several values: shards of `chunk_size` images, one chunk per image (1.2)
    assert test["regions"].shape == (3, 4, 8) and test["regions"].shards == (2, 4, 8)
    assert test["regions"].chunks == (1, 4, 8) and test["clip_image"].chunks == (1, 6)
    assert test["num_regions"].chunks == (2,) and test["num_regions"].shards is None
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


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_one_image_of_a_shard_reads_alone_and_a_damaged_one_is_named(tmp_path: Path):
    """A shard holds its images' chunks one by one: an image reads without the others being decoded (one
    damaged beside it does not stop it), `verify` finds the damaged one from the crc32c of each chunk and of
    the shard's index without decoding, and a read of it is one line naming the shard's rows."""
    from userpipe.pipeline.synthetic import write_synthetic_store
    from userpipe.schemas.errors import InputError
    from userpipe.schemas.store import stored_objects
    from userpipe.schemas.store_reader import chunk_key, open_store, verify_store

    store = write_synthetic_store(tmp_path / "s.zarr", 10, chunk_size=4)
    root, attrs = open_store(store)
    assert len([p for p in store.rglob("*") if p.is_file()]) == stored_objects(attrs)  # info's count
    regions = root["train"]["regions"]
    before = regions[0]
    shard = store / chunk_key(regions.array, 0)
    # image 2's chunk: its offset and length from the shard index at the end (4 images x 16 bytes + crc32c)
    index = np.frombuffer(shard.read_bytes()[-(16 * 4 + 4) : -4], "<u8").reshape(4, 2)
    _flip_byte(shard, int(index[2, 0]) + int(index[2, 1]) // 2)
    assert np.array_equal(open_store(store)[0]["train"]["regions"][0], before, equal_nan=True)
    _, problems = verify_store(store)
    assert [(p.array, p.chunk, p.problem) for p in problems] == [
        ("train/regions", 0, "damaged (its image 2: crc32c differs)")
    ]
    with pytest.raises(
        InputError, match=r"chunk 0 \(rows 0-3\) of array 'train/regions' is damaged \(its image 2"
    ):
        open_store(store)[0]["train"]["regions"][2]
    _flip_byte(shard, len(shard.read_bytes()) - 10)  # the index itself
    assert verify_store(store)[1][0].problem == "damaged (the shard's index: crc32c differs)"


def test_a_store_written_before_shards_still_reads_and_verifies(tmp_path: Path, monkeypatch):
    """A 1.1 store's region arrays are plain chunks of `chunk_size` images: read, verified and sharded as
    before."""
    import userpipe.pipeline.store as writer
    from userpipe.pipeline.synthetic import write_synthetic_store
    from userpipe.schemas.store_reader import open_store, stored_rows, verify_store

    unsharded = writer.split_array_specs

    def as_in_1_1(*args):
        return {name: spec.model_copy(update={"inner": None}) for name, spec in unsharded(*args).items()}

    monkeypatch.setattr(writer, "split_array_specs", as_in_1_1)
    store = write_synthetic_store(tmp_path / "old.zarr", 10, chunk_size=4)
    root, attrs = open_store(store)
    regions = root["train"]["regions"]
    assert regions.shards is None and stored_rows(regions) == 4 and regions.chunks == (4, 6, 8)
    assert verify_store(store)[1] == [] and regions[:].shape == (10, 6, 8)
