"""Each importer against files written in its real format: round trip, truncation, inconsistency."""

import base64
import csv
from pathlib import Path

import numpy as np
import pytest
import zarr
from kit import run_cli

from userpipe.schemas.store import validate_store

D = 16  # small feature width; the importers take it from the files


def write_precomp(
    directory: Path, splits: dict[str, tuple[int, bool]], seed: int = 0
) -> dict[str, np.ndarray]:
    """SCAN layout. splits: name -> (images, ids per caption?)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, (n, ids_per_caption) in splits.items():
        ims = rng.normal(size=(n, 36, D)).astype(np.float32)
        np.save(directory / f"{split}_ims.npy", ims)
        (directory / f"{split}_caps.txt").write_text(
            "".join(f"{split} image {i} caption {k} .\n" for i in range(n) for k in range(5))
        )
        ids = [str(1000 + i) for i in range(n) for _ in range(5 if ids_per_caption else 1)]
        (directory / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
        arrays[split] = ims
    return arrays


def precomp_args(directory: Path, out: Path) -> tuple:
    return (
        "extract",
        "--dataset",
        "coco",
        "--root",
        directory.parent / "no-images",
        "--regions",
        f"precomp:{directory}",
        "--clip",
        "none",
        "--out",
        out,
        "--workers",
        "1",
        "--chunk-size",
        "2",
    )


def test_precomp_round_trips_captions_and_ids_from_the_files(runner, tmp_path: Path):
    arrays = write_precomp(
        tmp_path / "precomp", {"train": (3, False), "dev": (2, True), "testall": (5, True), "test": (1, True)}
    )
    out = tmp_path / "p.zarr"
    result = run_cli(runner, *precomp_args(tmp_path / "precomp", out))
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(out), mode="r")
    attrs = validate_store(root)
    assert {s: v.num_images for s, v in attrs.splits.items()} == {
        "train": 3,
        "val": 2,
        "test": 5,
    }  # testall wins
    for split, source in (("train", "train"), ("val", "dev"), ("test", "testall")):
        group = root[split]
        np.testing.assert_allclose(
            group["regions"][:].astype(np.float32), arrays[source], rtol=1e-3, atol=1e-3
        )
        assert list(group["image_id"][:]) == [str(1000 + i) for i in range(len(arrays[source]))]
        assert str(group["caption_text"][6]) == f"{source} image 1 caption 1 ."
        assert np.isnan(group["boxes"][:]).all()  # SCAN files carry no boxes
    assert attrs.extractor.feature_dim == D and attrs.extractor.regions.kind == "precomp"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "train_ims.npy is truncated: header says (3, 36, 16) float32"),
        (
            "caps",
            "train_ims.npy has 3 images, train_ids.txt 3 ids, train_caps.txt 14 captions: the captions must "
            "be 5 per image",
        ),
        ("ten-per-image", "train_ims.npy has 3 images, train_ids.txt 3 ids, train_caps.txt 30 captions"),
        ("empty-caption", "train_caps.txt: caption 4 is empty"),
        ("not-utf8", "train_caps.txt is not UTF-8 text"),
        (
            "ids",
            "train_ims.npy has 3 images, train_ids.txt 2 ids, train_caps.txt 15 captions: "
            "expected one id per image or one per caption",
        ),
        ("id-groups", "dev_ids.txt: the 5 caption ids of image 1 disagree"),
        ("no-caps", "has train_ims.npy but no train_caps.txt"),
        ("not-npy", "train_ims.npy is not a .npy file"),
    ],
)
def test_precomp_files_that_disagree_are_rejected(runner, tmp_path: Path, damage: str, message: str):
    folder = tmp_path / "precomp"
    write_precomp(folder, {"train": (3, False), "dev": (2, True), "test": (2, True)})
    ims = folder / "train_ims.npy"
    if damage == "truncate":
        ims.write_bytes(ims.read_bytes()[:-100])
    elif damage == "caps":
        lines = (folder / "train_caps.txt").read_text().splitlines()[:-1]
        (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    elif damage == "ids":
        (folder / "train_ids.txt").write_text("1\n2\n")
    elif damage == "ten-per-image":  # each image's captions twice: images would get each other's captions
        lines = (folder / "train_caps.txt").read_text().splitlines()
        (folder / "train_caps.txt").write_text("\n".join(lines + lines) + "\n")
    elif damage == "empty-caption":
        lines = (folder / "train_caps.txt").read_text().splitlines()
        lines[4] = "   "
        (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    elif damage == "not-utf8":
        (folder / "train_caps.txt").write_bytes(b"a caption \xff\xfe\n" * 15)
    elif damage == "id-groups":
        ids = (folder / "dev_ids.txt").read_text().splitlines()
        ids[7] = "999"
        (folder / "dev_ids.txt").write_text("\n".join(ids) + "\n")
    elif damage == "no-caps":
        (folder / "train_caps.txt").unlink()
    else:
        ims.write_bytes(b"garbage" * 10)
    out = tmp_path / "p.zarr"
    result = run_cli(runner, *precomp_args(folder, out))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode()


def lxmert_detections(n: int) -> dict[str, np.ndarray]:
    """LXMERT's per-box fields in its dtypes (int64 ids, float32 confidences)."""
    return {
        "objects_id": np.arange(n, dtype=np.int64) * 7,
        "objects_conf": np.linspace(0.9, 0.1, n, dtype=np.float32),
        "attrs_id": np.arange(n, dtype=np.int64) + 1,
        "attrs_conf": np.full(n, 0.5, np.float32),
    }


def write_tsv(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray]], lxmert: bool = False) -> None:
    """As bottom-up-attention's generate_tsv.py (or LXMERT's variant) writes it."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        for image_id, boxes, feats in rows:
            n = len(boxes)
            if lxmert:
                writer.writerow(
                    [
                        image_id,
                        72,
                        96,
                        *(base64.b64encode(v.tobytes()).decode() for v in lxmert_detections(n).values()),
                        n,
                        b64(boxes),
                        b64(feats),
                    ]
                )
            else:
                writer.writerow([image_id, 96, 72, n, b64(boxes), b64(feats)])


def bua_rows(ids: list[str], seed: int, n: int = 10):
    rng = np.random.default_rng(seed)
    return [
        (
            i,
            np.sort(rng.uniform(0, 70, (n, 4)), axis=1).astype(np.float32),
            rng.normal(size=(n, D)).astype(np.float32),
        )
        for i in ids
    ]


def imported_args(coco_root: Path, spec: str, out: Path) -> tuple:
    return (
        "extract",
        "--dataset",
        "coco",
        "--root",
        coco_root,
        "--regions",
        spec,
        "--clip",
        "none",
        "--out",
        out,
        "--workers",
        "1",
        "--chunk-size",
        "2",
    )


@pytest.mark.parametrize("lxmert", [False, True])
def test_tsv_parts_round_trip_with_padding(runner, coco_root: Path, tmp_path: Path, lxmert: bool):
    rows = bua_rows([str(100 + i) for i in range(9)], seed=1)
    write_tsv(tmp_path / "feats.tsv.0", rows[:5], lxmert)
    write_tsv(tmp_path / "feats.tsv.1", rows[5:], lxmert)
    out = tmp_path / "t.zarr"
    result = run_cli(runner, *imported_args(coco_root, f"tsv:{tmp_path}/feats.tsv.*", out))
    assert result.exit_code == 0, result.output
    train = zarr.open_group(str(out), mode="r")["train"]
    _, boxes, feats = rows[2]
    assert train["num_regions"][2] == 10
    np.testing.assert_allclose(train["regions"][2, :10].astype(np.float32), feats, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(train["boxes"][2, :10], boxes)
    assert (train["regions"][2, 10:] == 0).all()  # padding past num_regions
    assert (train["width"][2], train["height"][2]) == (96, 72)
    assert ("object_id" in train) == lxmert  # LXMERT's detections are kept, padded with -1 and 0
    if lxmert:
        written = lxmert_detections(10)
        np.testing.assert_array_equal(train["object_id"][2], np.r_[written["objects_id"], [-1] * 26])
        np.testing.assert_array_equal(
            train["attribute_conf"][2, :10], written["attrs_conf"].astype(np.float16)
        )
        assert (train["attribute_conf"][2, 10:] == 0).all()


def test_truncated_tsv_names_file_and_line(runner, coco_root: Path, tmp_path: Path):
    write_tsv(tmp_path / "feats.tsv", bua_rows([str(100 + i) for i in range(9)], seed=2))
    text = (tmp_path / "feats.tsv").read_text()
    (tmp_path / "feats.tsv").write_text(text[: len(text) - 500] + "\n")
    result = run_cli(runner, *imported_args(coco_root, f"tsv:{tmp_path}/feats.tsv", tmp_path / "t.zarr"))
    assert result.exit_code == 2 and "feats.tsv line 9 (image 108): features hold" in result.output, (
        result.output
    )
    assert not (tmp_path / "t.zarr").exists()


def write_npz(path: Path, boxes: np.ndarray, feats: np.ndarray, num_bbox: int | None = None) -> None:
    """As bottom-up-attention.pytorch's extract_features.py writes it."""
    n = len(boxes)
    info = {
        "image_id": path.stem,
        "image_h": 72,
        "image_w": 96,
        "num_boxes": n,
        "objects_id": np.zeros(n),
        "objects_conf": np.ones(n),
    }
    np.savez_compressed(
        path,
        x=feats,
        bbox=boxes,
        num_bbox=num_bbox if num_bbox is not None else n,
        image_h=72,
        image_w=96,
        info=info,
    )


def test_npz_by_file_stem_round_trips_and_an_inconsistent_file_invalidates_its_image(
    runner, coco_root, tmp_path
):
    from userpipe.pipeline.datasets import load_dataset

    folder = tmp_path / "npz"
    folder.mkdir()
    records = [r for s in ("train", "val", "test") for r in load_dataset("coco", coco_root).splits[s]]
    rows = bua_rows([Path(r.file).stem for r in records], seed=3, n=40)
    for stem, boxes, feats in rows:
        write_npz(folder / f"{stem}.npz", boxes, feats)
    write_npz(folder / f"{rows[1][0]}.npz", rows[1][1], rows[1][2], num_bbox=12)
    out = tmp_path / "n.zarr"
    result = run_cli(runner, *imported_args(coco_root, f"npz:{folder}", out), "--num-regions", "36")
    assert result.exit_code == 1 and "disagree with num_bbox=12" in result.output, result.output
    train = zarr.open_group(str(out), mode="r")["train"]
    assert train["valid"][:].tolist() == [True, False, True, True, True]
    np.testing.assert_allclose(train["regions"][0].astype(np.float32), rows[0][2][:36], rtol=1e-3, atol=1e-3)
    assert train["num_regions"][0] == 36  # 40 boxes, the first 36 kept


@pytest.mark.slow
def test_existing_dask_scheduler_does_the_work(runner, tmp_path: Path):
    from distributed import LocalCluster

    arrays = write_precomp(tmp_path / "precomp", {"train": (3, False), "dev": (2, True), "test": (2, True)})
    out = tmp_path / "p.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        args = [a for a in precomp_args(tmp_path / "precomp", out) if a not in ("--workers", "1")]
        result = run_cli(runner, *args, "--scheduler", cluster.scheduler_address)
        assert result.exit_code == 0, result.output
        assert len(cluster.scheduler.task_prefixes) > 0  # tasks went through that scheduler
    np.testing.assert_allclose(
        zarr.open_group(str(out), mode="r")["test"]["regions"][:].astype(np.float32),
        arrays["test"],
        rtol=1e-3,
        atol=1e-3,
    )
