import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from kit import (
    EXTRACT_COCO_GRID,
    kill_at_first_done_chunk,
    run_cli,
    tree_bytes,
    wait_for_first_done_chunk,
    write_bomb_png,
)

from userpipe.schemas.store import validate_store

DEMO_ARGS = ("--dataset", "demo", "--images", "24", "--chunk-size", "4", "--workers", "1")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from userpipe.pipeline.demo import ensure_demo

    root = tmp_path_factory.mktemp("demo") / "demo"
    ensure_demo(root, images=24)
    return root


@pytest.mark.slow
def test_demo_store_layout_values_and_info(runner, demo_root: Path, tmp_path: Path):
    out = tmp_path / "demo.zarr"
    result = run_cli(runner, "extract", *DEMO_ARGS, "--root", demo_root, "--out", out)
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(out), mode="r")
    attrs = validate_store(root)
    assert attrs.complete and attrs.failures == ()
    assert {s: v.num_images for s, v in attrs.splits.items()} == {"train": 14, "val": 2, "test": 8}
    train = root["train"]
    assert train["regions"].shape == (14, 36, 1280) and train["regions"].dtype == np.float16
    assert train["regions"].shards == (4, 36, 1280) and train["regions"].chunks == (1, 36, 1280)
    assert np.isfinite(train["regions"][:]).all() and train["valid"][:].all()
    assert (train["num_regions"][:] == 36).all() and train["images_done"][:].all()
    dataset = json.loads((demo_root / "dataset_demo.json").read_text())
    first = dataset["images"][0]
    np.testing.assert_allclose(train["boxes"][0, : len(first["boxes"])], first["boxes"], atol=1e-3)
    assert (train["width"][:] == 320).all() and (train["height"][:] == 256).all()
    np.testing.assert_allclose(
        np.linalg.norm(train["clip_image"][:].astype(np.float32), axis=1), 1, atol=2e-3
    )
    assert list(train["caption_text"][:5]) == [s["raw"] for s in first["sentences"]]
    np.testing.assert_array_equal(train["caption_image"][:], np.repeat(np.arange(14), 5))
    assert "clip_text" not in train  # the ImageNet global has no text tower
    cfg = attrs.extractor
    assert (cfg.regions.kind, cfg.regions.backbone, cfg.global_encoder.kind) == (
        "boxes",
        "efficientnet_lite0",
        "imagenet",
    )
    assert len(cfg.regions.backbone_weights.sha256) == 64 and len(cfg.dataset_sha256) == 64

    info = run_cli(runner, "info", out, "--json")
    summary = json.loads(info.stdout)
    assert summary["schema_version"] == "1.2" and summary["complete"]
    assert summary["splits"]["test"]["arrays"]["regions"] == {
        "shape": [8, 36, 1280],
        "dtype": "float16",
        "chunks": [1, 36, 1280],
        "shards": [4, 36, 1280],
        "dims": ["image", "region", "feature"],
    }
    assert summary["extractor"]["num_regions"] == 36
    table = run_cli(runner, "info", out).stdout
    assert "train" in table
    assert "global image" in table and "(imagenet)" in table and "clip_image" not in table  # not CLIP

    ds = xr.open_zarr(out, group="val", consolidated=False)
    assert ds["regions"].dims == ("image", "region", "feature") and ds.sizes["caption"] == 10


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_after_kill_gives_the_identical_store(runner, demo_root: Path, tmp_path: Path):
    reference = tmp_path / "reference.zarr"
    assert run_cli(runner, "extract", *DEMO_ARGS, "--root", demo_root, "--out", reference).exit_code == 0

    resumed = tmp_path / "resumed.zarr"
    command = [
        sys.executable,
        "-m",
        "userpipe",
        "extract",
        *DEMO_ARGS,
        "--root",
        str(demo_root),
        "--out",
        str(resumed),
    ]
    kill_at_first_done_chunk(command, resumed)
    partial = validate_store(zarr.open_group(str(resumed), mode="r"))
    assert not partial.complete

    result = run_cli(runner, "extract", *DEMO_ARGS, "--root", demo_root, "--out", resumed)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    assert tree_bytes(resumed) == tree_bytes(reference)

    changed = run_cli(
        runner, "extract", *DEMO_ARGS, "--root", demo_root, "--out", resumed, "--num-regions", "10"
    )
    assert changed.exit_code == 2 and "another configuration" in changed.output
    replaced = run_cli(
        runner,
        "extract",
        *DEMO_ARGS,
        "--root",
        demo_root,
        "--out",
        resumed,
        "--num-regions",
        "10",
        "--overwrite",
        "--splits",
        "val",
    )
    assert replaced.exit_code == 0
    assert zarr.open_group(str(resumed), mode="r")["val"]["regions"].shape == (2, 10, 1280)


@pytest.mark.slow
def test_corrupt_and_missing_images_are_flagged_listed_and_fail_the_run(
    runner, coco_root: Path, tmp_path: Path
):
    images = coco_root / "images"
    (images / "train2014" / "COCO_train2014_000000000101.jpg").write_bytes(b"not a jpeg at all")
    truncated = images / "val2014" / "COCO_val2014_000000000105.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (images / "val2014" / "COCO_val2014_000000000108.jpg").unlink()
    out = tmp_path / "coco.zarr"
    args = (*EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, "--clip", "imagenet:efficientnet_lite0")
    result = run_cli(runner, *args)
    assert result.exit_code == 1
    assert "3 image(s) could not be used" in result.output
    for name in ("000000000101", "000000000105", "000000000108"):
        assert name in result.output
    root = zarr.open_group(str(out), mode="r")
    attrs = validate_store(root)
    assert attrs.complete and [(f.split, f.index) for f in attrs.failures] == [
        ("train", 1),
        ("val", 0),
        ("test", 1),
    ]
    assert {s: v.num_invalid for s, v in attrs.splits.items()} == {"train": 1, "val": 1, "test": 1}
    train = root["train"]
    assert train["valid"][:].tolist() == [True, False, True, True, True]
    assert np.isnan(train["regions"][1]).all() and np.isnan(train["clip_image"][1]).all()
    assert np.isfinite(train["regions"][0]).all() and str(train["error"][1]).startswith(
        "UnidentifiedImageError"
    )
    assert run_cli(runner, *args, "--allow-failures").exit_code == 0


@pytest.mark.slow
def test_a_decompression_bomb_is_an_invalid_image_with_its_size(runner, coco_root: Path, tmp_path: Path):
    """An image over the pixel cap is refused from its header, before it is decoded: one line naming the
    file and its size, whether Pillow lets it open (10,000 x 10,000) or refuses it (100,000 x 100,000)."""
    from userpipe.schemas.store_reader import open_store

    images = coco_root / "images"
    big = write_bomb_png(images / "train2014" / "COCO_train2014_000000000101.jpg", 10_000, 10_000)
    huge = write_bomb_png(images / "val2014" / "COCO_val2014_000000000105.jpg", 100_000, 100_000)
    out = tmp_path / "coco.zarr"
    result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, "--clip", "none")
    assert result.exit_code == 1 and "2 image(s) could not be used" in result.output, result.output
    _, attrs = open_store(out)
    reasons = {f.file.rsplit("/", 1)[-1]: f.error for f in attrs.failures}
    assert reasons.keys() == {big.name, huge.name}
    big_reason, huge_reason = reasons[big.name], reasons[huge.name]
    assert big_reason.startswith("ValueError: ") and f"{big.name} is 10000x10000 pixels" in big_reason
    assert huge.name in huge_reason and "Image size (10000000000 pixels)" in huge_reason
    assert "\n" not in big_reason + huge_reason


@pytest.mark.slow
def test_an_image_file_embeds_exactly_like_its_store_row(runner, coco_root: Path, tmp_path: Path):
    """`userpipe search --captions FILE` embeds a new image with the store's own extractor configuration."""
    from userpipe.pipeline.features import image_file_features
    from userpipe.schemas.store_reader import open_store

    out = tmp_path / "coco.zarr"
    clip = ("--clip", "imagenet:efficientnet_lite0")
    result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, *clip, "--splits", "test")
    assert result.exit_code == 0, result.output
    root, attrs = open_store(out)
    assert attrs.image_root == str((coco_root / "images").resolve())
    test = root["test"]
    path = Path(attrs.image_root) / str(test["file"][1])
    regions, count, global_embedding = image_file_features(attrs.extractor, path)
    assert count == test["num_regions"][1] == 4
    np.testing.assert_array_equal(regions, test["regions"][1])
    np.testing.assert_allclose(global_embedding, test["clip_image"][1], rtol=2e-3, atol=1e-4)
    with pytest.raises(Exception, match="cannot read image"):
        image_file_features(attrs.extractor, tmp_path / "missing.jpg")


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--dataset", "imagenet"), "unknown dataset 'imagenet'"),
        (("--dataset", "f30k"), "dataset file not found"),
        (("--splits", "train,dev"), "unknown split name(s) dev"),
        (("--backbone", "vgg16"), "unknown backbone 'vgg16'"),
        (("--clip", "ViT-Q-99:openai"), "unknown open_clip model"),
        (("--clip", "ViT-B-32:openai"), "no model hub is reachable"),
        (("--regions", "butd"), "could not download FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
        (("--regions", "tsv"), "needs a location"),
        (("--regions", "butd-vg"), "needs --detector-weights"),
        (("--regions", "precomp:/nowhere"), "precomp folder not found"),
        (("--images", "10"), "--images only applies to --dataset demo"),
        (("--min-regions", "2"), "--min-regions does not apply to --regions grid (only to butd-vg)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    runner, coco_root: Path, tmp_path: Path, extra, message
):
    out = tmp_path / "never.zarr"
    args = [
        "extract",
        "--dataset",
        "coco",
        "--root",
        coco_root,
        "--out",
        out,
        "--regions",
        "grid",
        "--clip",
        "none",
    ]
    for i in range(0, len(extra), 2):
        flag = args.index(extra[i]) if extra[i] in args else None
        if flag is None:
            args += list(extra[i : i + 2])
        else:
            args[flag + 1] = extra[i + 1]
    if extra[:2] == ("--dataset", "f30k"):
        args[args.index("--root") + 1] = tmp_path / "empty"
    result = run_cli(runner, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_an_option_that_the_region_kind_does_not_read_is_refused_not_ignored(
    runner, coco_root: Path, tmp_path: Path
):
    from dataclasses import fields

    from userpipe.pipeline.region_kinds import KINDS, RegionOptions

    values = {
        "backbone": "efficientnet_lite0",
        "backbone_weights": str(tmp_path / "backbone.pth"),
        "detector_weights": str(tmp_path / "detector.pth"),
        "detector_config": "butd_vg_r101_c4",
        "min_regions": "10",
        "device": "cpu",
    }
    assert set(values) == {f.name for f in fields(RegionOptions)} - {"source"}  # every option a kind may read
    out = tmp_path / "never.zarr"
    refused = 0
    for name, value in values.items():
        readers = [kind.name for kind in KINDS.values() if name in kind.reads]
        for kind in (kind for kind in KINDS.values() if name not in kind.reads):
            flag = "--" + name.replace("_", "-")
            spec = f"{kind.name}:{tmp_path / 'features'}" if kind.location else kind.name
            result = run_cli(
                runner, "extract", "--dataset", "coco", "--root", coco_root, "--out", out,
                "--regions", spec, "--clip", "none", flag, value,
            )  # fmt: skip
            assert result.exit_code == 2, (flag, kind.name, result.output)
            assert (
                f"{flag} does not apply to --regions {kind.name} (only to {', '.join(readers)})"
                in result.output
            )
            assert len(result.output.strip().splitlines()) == 1 and not out.exists()
            refused += 1
    assert refused == 31  # every option with every kind that does not read it

    # and, named by hand, options the kind does read get past that check to their own (butd-vg: it needs
    # weights, or detectron2 where it is missing)
    missing = str(tmp_path / "missing.pth")
    for kind, options, message in [
        ("butd", ("--detector-weights", missing), "missing.pth"),
        ("grid", ("--backbone", "resnet50", "--backbone-weights", missing), "missing.pth"),
        ("butd-vg", ("--device", "cpu", "--min-regions", "10"), "--regions butd-vg needs"),
    ]:
        result = run_cli(
            runner, "extract", "--dataset", "coco", "--root", coco_root, "--out", out,
            "--regions", kind, "--clip", "none", *options,
        )  # fmt: skip
        assert result.exit_code == 2 and message in result.output and "does not apply" not in result.output


def test_missing_image_folder_and_info_on_non_store(runner, coco_root: Path, tmp_path: Path):
    (coco_root / "images" / "val2014").rename(coco_root / "images" / "elsewhere")
    result = run_cli(
        runner,
        "extract",
        "--dataset",
        "coco",
        "--root",
        coco_root,
        "--out",
        tmp_path / "x.zarr",
        "--regions",
        "grid",
        "--clip",
        "none",
    )
    assert result.exit_code == 2 and "image folder not found" in result.output
    assert not (tmp_path / "x.zarr").exists()
    info = run_cli(runner, "info", tmp_path)
    assert info.exit_code == 2 and "no Zarr store" in info.output


@pytest.mark.slow
def test_local_cluster_leaves_the_callers_environment_as_it_was():
    """The Dask nanny writes OMP_NUM_THREADS=1 & co. into the calling process to spawn its workers;
    a training run started after an extract (same process tree) would otherwise run on one thread."""
    from userpipe.pipeline.cluster import dask_client

    before = dict(os.environ)
    with dask_client(2, None) as (client, threads):  # worker processes (one worker runs in this process)
        assert client.submit(os.getenv, "OMP_NUM_THREADS").result() == "1"  # the workers still get it
    assert dict(os.environ) == before


@pytest.mark.slow
def test_ctrl_c_stops_extract_with_the_resume_hint_and_no_worker_traceback(demo_root: Path, tmp_path: Path):
    """Ctrl-C reaches the whole foreground process group, Dask's worker processes included."""
    out = tmp_path / "s.zarr"
    command = [
        sys.executable,
        "-m",
        "userpipe",
        "extract",
        *DEMO_ARGS,
        "--root",
        str(demo_root),
        "--out",
        str(out),
    ]
    job = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_first_done_chunk(job, out)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr, stderr


def test_export_bad_input_is_one_line_exit_2_and_nothing_written(runner, coco_root: Path, tmp_path: Path):
    store = tmp_path / "grid.zarr"
    args = (*EXTRACT_COCO_GRID, "--root", coco_root, "--out", store, "--clip", "none", "--splits", "test")
    assert run_cli(runner, *args).exit_code == 0
    out = tmp_path / "never"
    cases = [
        (("--store", tmp_path / "nowhere", "--split", "test", "--format", "npz"), "no Zarr store"),
        (("--store", store, "--split", "train", "--format", "npz"), "has no split 'train'"),
        (("--store", store, "--split", "test", "--format", "csv"), "unknown export format 'csv'"),
    ]
    for options, message in cases:
        result = run_cli(runner, "export", *options, "--out", out)
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()
    # a store without detections exports generate_tsv.py's 6 fields (no made-up detections) and reads back
    result = run_cli(runner, "export", "--store", store, "--split", "test", "--format", "tsv", "--out", out)
    lines = out.read_text().splitlines()
    assert result.exit_code == 0 and len(lines) == 2 and len(lines[0].split("\t")) == 6, result.output
    back = tmp_path / "back.zarr"
    imported = run_cli(
        runner, "extract", "--dataset", "coco", "--root", coco_root, "--regions", f"tsv:{out}",
        "--num-regions", "4", "--chunk-size", "2", "--workers", "1", "--clip", "none", "--splits", "test",
        "--out", back,
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output
    original, again = (
        zarr.open_group(str(store), mode="r")["test"],
        zarr.open_group(str(back), mode="r")["test"],
    )
    for name in ("regions", "boxes", "num_regions", "width", "height", "valid"):
        np.testing.assert_array_equal(again[name][:], original[name][:])
    assert "object_id" not in again
