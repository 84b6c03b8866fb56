"""Do `--regions butd-vg` features equal the released ones? For whoever has the real detector weights:
extracts the first N COCO 5K-test images that SCAN's precomp files hold and compares each image's boxes
with SCAN's released rows of the same id (how: docs/architecture.md, "The Visual Genome detector");
writes OUT/equality.{json,md}.

    python -m bench.butd_equality --coco data/coco --precomp data/coco_precomp \\
        --weights faster_rcnn_from_caffe_attr.pkl --images 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

PRECOMP_TEST = "testall"  # SCAN's COCO 5K test


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--coco", type=Path, required=True, help="folder with dataset_coco.json and images/")
    parser.add_argument("--precomp", type=Path, required=True, help="SCAN's coco_precomp folder")
    parser.add_argument("--weights", required=True, help="airsplay .pkl or MILVLG .pth detector weights")
    parser.add_argument("--detector-config", default="butd_vg_r101_c4", help="as userpipe extract takes it")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("data") / "butd-equality")
    args = parser.parse_args()

    ids = list(dict.fromkeys((args.precomp / f"{PRECOMP_TEST}_ids.txt").read_text().split()))
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    records = json.loads((args.coco / "dataset_coco.json").read_text())["images"]
    chosen = [r for r in records if str(r.get("cocoid")) in row_of and r["split"] == "test"][: args.images]
    if not chosen:
        sys.exit(
            f"no test image of {args.coco}/dataset_coco.json is in {args.precomp}/{PRECOMP_TEST}_ids.txt"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    subset = args.out / "subset.json"
    subset.write_text(json.dumps({"dataset": "coco", "images": chosen}))
    store = args.out / "store.zarr"
    command = ["extract", "--dataset", str(subset), "--root", str(args.coco / "images"), "--splits", "test"]
    command += [
        "--regions",
        "butd-vg",
        "--clip",
        "none",
        "--detector-weights",
        args.weights,
        "--out",
        str(store),
    ]
    command += ["--detector-config", args.detector_config]
    subprocess.run([sys.executable, "-m", "userpipe", *command], check=True, env=os.environ)

    released = np.load(args.precomp / f"{PRECOMP_TEST}_ims.npy", mmap_mode="r")
    group = zarr.open_group(str(store), mode="r")["test"]
    cocoid_of = {f"{r['filepath']}/{r['filename']}": str(r["cocoid"]) for r in chosen}
    rows = []
    valid = group["valid"][:]
    for i, file in enumerate(group["file"][:]):
        if not valid[i]:
            print(f"{file}: not extracted ({group['error'][i]})")
            continue
        k = int(group["num_regions"][i])
        ours = normalised(np.asarray(group["regions"][i, :k], np.float32))
        theirs = normalised(np.asarray(released[row_of[cocoid_of[file]]], np.float32))
        best = (ours @ theirs.T).max(axis=1)
        rows.append({"cocoid": cocoid_of[file], "boxes": k, "mean_cosine": float(best.mean())})
    summary = {
        "weights": args.weights,
        "images": rows,
        "mean_cosine": float(np.mean([r["mean_cosine"] for r in rows])),
    }
    (args.out / "equality.json").write_text(json.dumps(summary, indent=2))
    table = "\n".join(f"| {r['cocoid']} | {r['boxes']} | {r['mean_cosine']:.4f} |" for r in rows)
    (args.out / "equality.md").write_text(
        f"# butd-vg vs SCAN precomp ({args.weights})\n\n"
        f"| COCO id | boxes | mean best cosine |\n|---|---|---|\n{table}\n\n"
        f"mean over images: **{summary['mean_cosine']:.4f}**\n"
    )
    print((args.out / "equality.md").read_text())


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


if __name__ == "__main__":
    main()
