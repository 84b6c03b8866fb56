"""Throughput of `userpipe extract` with 1 and 2 Dask workers: the demo dataset (its default boxes regions)
and `--regions butd-vg` (the Visual Genome R101-C4 detector at its real input scale, 600 px).

Runs the real command end to end (cluster start, model loading, Zarr writes included) on a fresh
store for each worker count, and in the same run the models alone: the store's region extractor and global
encoder, built as a worker builds them, on the same images already decoded in RAM (their resize and
normalisation included; no decoding, Dask or store). That is the limit for this machine; the end-to-end
rate is reported as a share of it. Writes bench/results/extract_throughput.{json,md}. The butd-vg detector
has random weights written in airsplay's format (no model hub here) with the RPN's box deltas zeroed, so
each image yields the released 300 proposals through res5 as trained weights do (random deltas would
blow every proposal up to the whole image and leave one box after NMS), and its stem scaled down so the
untrained network's features fit float16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--images", type=int, default=3200, help="demo images (default: the demo's default size)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--butd-images", type=int, default=8, help="640x480 images for butd-vg (0: skip)")
    parser.add_argument("--models-alone", type=Path, help=argparse.SUPPRESS)  # child: time the models
    args = parser.parse_args()
    if args.models_alone:
        print(json.dumps(models_alone(args.models_alone)))
        return

    from userpipe.pipeline.demo import ensure_demo

    root = Path("data") / f"demo-bench-{args.images}"
    ensure_demo(root, images=args.images)
    userpipe = shutil.which("userpipe") or str(Path(sys.executable).parent / "userpipe")
    demo = ["--dataset", "demo", "--root", str(root), "--images", str(args.images)]
    runs = [run(userpipe, "boxes (demo)", args.images, demo, workers) for workers in args.workers]
    if args.butd_images:
        butd = ["--dataset", str(butd_dataset(args.butd_images)), "--splits", "test", "--regions", "butd-vg"]
        butd += ["--clip", "none"]
        butd += ["--detector-weights", str(butd_weights()), "--chunk-size", "1"]
        runs += [run(userpipe, "butd-vg R101 (600 px)", args.butd_images, butd, w) for w in args.workers]
    result = {
        "benchmark": "userpipe extract: demo (boxes regions, efficientnet_lite0, imagenet global) and "
        "butd-vg (Visual Genome R101-C4, no global)",
        **report.machine(),
        "runs": runs,
    }
    report.write(
        "extract_throughput",
        result,
        result["benchmark"],
        "Wall time of the whole command (Dask cluster start and model loading included). Models alone: the "
        "store's region extractor and global encoder on the same images, decoded beforehand, in one process "
        "on the machine's threads (the limit here); share: the command's images/s as a part of it.",
        [
            "regions",
            "workers",
            "images",
            "seconds",
            "images/s",
            "models alone (images/s)",
            "share",
            "KB/image",
        ],
        [
            [
                r["regions"],
                r["workers"],
                r["images"],
                r["seconds"],
                r["images_per_s"],
                r["models_alone_per_s"],
                f"{100 * r['images_per_s'] / r['models_alone_per_s']:.0f}%",
                r["store_kb_per_image"],
            ]
            for r in runs
        ],
        [
            (
                f"extract {r['regions']}, {r['images']:,} images, {r['workers']} worker(s)",
                f"{r['images_per_s']} images/s ({100 * r['images_per_s'] / r['models_alone_per_s']:.0f}% of "
                f"the models alone), {r['store_kb_per_image']} KB/image",
            )
            for r in runs
        ],
    )


def run(userpipe: str, regions: str, images: int, dataset_args: list[str], workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "store.zarr"
        start = time.perf_counter()
        subprocess.run(
            [userpipe, "extract", *dataset_args, "--out", str(out), "--workers", str(workers)],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        alone = subprocess.run(
            [sys.executable, "-m", "bench.extract_throughput", "--models-alone", str(out)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        ).stdout
    result = {
        "regions": regions,
        "workers": workers,
        "images": images,
        "seconds": round(seconds, 1),
        "images_per_s": round(images / seconds, 3),
        "store_kb_per_image": round(size / images / 1e3, 1),
        "models_alone_per_s": json.loads(alone.strip().splitlines()[-1])["images_per_s"],
    }
    print(result)
    return result


def models_alone(store: Path) -> dict:
    """The store's extractor models on its images, decoded beforehand: images/s of the models alone."""
    import numpy as np
    import zarr

    from userpipe.pipeline.features import extractor_models, load_image
    from userpipe.schemas import threads

    root = zarr.open_group(str(store), mode="r")
    attrs = root.attrs["userpipe"]
    config_json = json.dumps(attrs["extractor"])
    images, boxes = [], []
    for split in attrs["splits"]:
        group = root[split]
        counts = group["num_regions"][:]
        for i, file in enumerate(group["file"][:]):
            images.append(load_image(str(Path(attrs["image_root"]) / str(file))))
            boxes.append(np.asarray(group["boxes"][i, : counts[i]]))
    with threads.sharing():  # as a worker of `extract --workers 1` runs
        config, extractor, encoder = extractor_models(config_json)
        extractor(images[0], boxes[0])  # warm-up
        start = time.perf_counter()
        for image, image_boxes in zip(images, boxes, strict=True):
            threads.adjust()
            extractor(image, image_boxes)
        if encoder is not None:
            encoder.encode_images(images)
        seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": seconds, "images_per_s": round(len(images) / seconds, 3)}


BUTD_FOLDER = Path("data") / "bench-butd"


def butd_dataset(images: int) -> Path:
    """A Karpathy JSON of `images` 640x480 photos-like images (smooth shapes), all in the test split."""
    import numpy as np
    from PIL import Image

    folder = BUTD_FOLDER / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(images):
        rng = np.random.default_rng(i)
        pixels = np.zeros((480, 640, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        for _ in range(12):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            pixels[y : y + rng.integers(20, 200), x : x + rng.integers(20, 260)] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        records.append(
            {"filepath": "images", "filename": f"{i}.jpg", "imgid": i, "split": "test"}
            | {"sentences": [{"raw": "a picture"}] * 5}
        )
    path = BUTD_FOLDER / "dataset_bench.json"
    path.write_text(json.dumps({"dataset": "coco", "images": records}))
    return path


def butd_weights() -> Path:
    """The packaged R101-C4 config with random weights, as airsplay's .pkl (written once)."""
    path = BUTD_FOLDER / "random_r101_c4.pkl"
    if not path.is_file():
        import torch
        from detectron2.modeling import build_model

        from userpipe.pipeline.butd_checkpoints import write_checkpoint
        from userpipe.pipeline.butd_vg import config_file, load_config

        torch.manual_seed(0)
        state = build_model(load_config(config_file("butd_vg_r101_c4"))).state_dict()
        state["proposal_generator.rpn_head.anchor_deltas.weight"].zero_()
        # untrained residual stages grow activations ~1e6-fold; the network is positively homogeneous, so a
        # smaller stem scales every map down alike and the features fit float16 (else: invalid images)
        state["backbone.stem.conv1.weight"] *= 2.0**-12
        write_checkpoint(state, path, "airsplay")
    return path


if __name__ == "__main__":
    main()
