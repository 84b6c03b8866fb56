"""Crisscrossed Captions: the annotation files in their published formats, written small."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kit import run_cli

from userpipe.schemas.errors import InputError
from userpipe.trainer.cxc import SITS_COLUMNS, cxc_positives, read_cxc
from userpipe.trainer.evaluate import positive_ranks, protocol_metrics

IMAGES = ["391895", "522418", "184613"]
CAPTIONS = [  # two per image, in the split's order
    "A man with a red helmet on a small moped on a dirt road.",
    "Man riding a motor bike on a dirt road on the countryside.",
    "A woman wearing a net on her head cutting a cake.",
    "A woman cutting a large white sheet cake.",
    "A child holding a flowered umbrella and petting a yak.",
    "A young man holding an umbrella next to a herd of cattle.",
]
CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


def coco_captions(tmp_path: Path) -> Path:
    """captions_val2014.json: caption ids 1000 + c, texts as COCO spells them (case, spaces, periods)."""
    annotations = [
        {"id": 1000 + c, "image_id": int(IMAGES[int(CAPTION_IMAGE[c])]), "caption": text.upper() + "  "}
        for c, text in enumerate(CAPTIONS)
    ]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


def sits(tmp_path: Path, rows: list[tuple[int, str, float]], header=SITS_COLUMNS) -> Path:
    folder = tmp_path / "cxc"
    folder.mkdir(exist_ok=True)
    with open(folder / "sits_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for caption, image, score in rows:
            writer.writerow(
                [f"COCO_val2014:sentid:{caption}", f"COCO_val2014_{int(image):012d}.jpg", score, "c2i"]
            )
    return folder


def positives(tmp_path, rows):
    return cxc_positives(
        IMAGES, CAPTIONS, CAPTION_IMAGE, read_cxc(sits(tmp_path, rows), coco_captions(tmp_path))
    )


def test_rated_pairs_at_3_or_more_join_the_original_pairs(tmp_path):
    rows = [(1000, IMAGES[0], 4.9), (1002, IMAGES[0], 3.0), (1004, IMAGES[1], 2.99), (1001, IMAGES[2], 3.4)]
    pair_image, pair_caption = positives(tmp_path, rows)
    pairs = set(zip(pair_image.tolist(), pair_caption.tolist(), strict=True))
    original = {(int(i), c) for c, i in enumerate(CAPTION_IMAGE)}
    assert pairs == original | {(0, 2), (2, 1)}  # 2.99 is not a positive; (0, 0) was one already


def test_cxc_ranks_are_the_best_positives_and_differ_from_the_plain_protocol(tmp_path):
    pair_image, pair_caption = positives(tmp_path, [(1002, IMAGES[0], 4.0)])
    sims = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32))
    sims[0, 2], sims[0, :2] = 5.0, -5.0  # image 0 ranks its CxC caption first, its own last
    metrics = protocol_metrics(sims, CAPTION_IMAGE, "cxc", (pair_image, pair_caption))
    i2t, t2i = positive_ranks(sims, pair_image, pair_caption)
    assert i2t[0] == 0 and metrics["i2t"]["r1"] == pytest.approx(100 * float((i2t < 1).double().mean()))
    assert metrics["t2i"]["r1"] == pytest.approx(100 * float((t2i < 1).double().mean()))
    assert protocol_metrics(sims, CAPTION_IMAGE, "full")["i2t"]["r1"] < metrics["i2t"]["r1"]
    with pytest.raises(ValueError, match="needs the CxC positives"):
        protocol_metrics(sims, CAPTION_IMAGE, "cxc")


@pytest.mark.parametrize(
    "case,message",
    [
        ("no file", "no sits_test.csv in"),
        ("header", "the columns are caption,image,score"),
        ("caption id", "line 2: expected COCO_val2014:sentid:ID"),
        ("image name", "line 2: expected"),
        ("score", "line 2: expected"),
        ("score range", "line 2: expected"),
        ("short row", "line 2: expected"),
        ("empty", "holds no rated pairs"),
        ("unknown caption", "CxC caption 77 is not in"),
        ("image not in split", "CxC image 999 is not in the split"),
        ("other text", "is not among the split's captions of that image"),
        ("json", "is not a COCO captions annotation file"),
        ("json fields", "no 'annotations' field"),
    ],
)
def test_bad_cxc_input_is_one_line_naming_it(tmp_path, case, message):
    folder = sits(tmp_path, [] if case == "empty" else [(1000, IMAGES[0], 4.0)])
    captions = coco_captions(tmp_path)
    table = folder / "sits_test.csv"
    lines = table.read_text().splitlines()
    edits = {
        "header": lambda: table.write_text("caption,image,score,method\n" + lines[1]),
        "caption id": lambda: table.write_text(
            lines[0] + "\nCOCO_val2014:1000,COCO_val2014_000000391895.jpg,4,x"
        ),
        "image name": lambda: table.write_text(lines[0] + "\nCOCO_val2014:sentid:1000,391895.jpg,4,x"),
        "score": lambda: table.write_text(
            lines[0] + "\nCOCO_val2014:sentid:1000,COCO_val2014_000000391895.jpg,hi,x"
        ),
        "score range": lambda: table.write_text(
            lines[0] + "\nCOCO_val2014:sentid:1000,COCO_val2014_000000391895.jpg,7,x"
        ),
        "short row": lambda: table.write_text(lines[0] + "\nCOCO_val2014:sentid:1000"),
        "unknown caption": lambda: sits(tmp_path, [(77, IMAGES[0], 4.0)]),
        "image not in split": lambda: sits(tmp_path, [(1000, "999", 4.0)]),
        "other text": lambda: captions.write_text(
            json.dumps({"annotations": [{"id": 1000, "image_id": 391895, "caption": "a different caption"}]})
        ),
        "json": lambda: captions.write_text("{not json"),
        "json fields": lambda: captions.write_text("{}"),
        "no file": lambda: table.unlink(),
    }
    if case in edits:
        edits[case]()
    with pytest.raises(InputError) as caught:
        cxc_positives(IMAGES, CAPTIONS, CAPTION_IMAGE, read_cxc(folder, captions))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_eval_cxc_needs_both_files_and_checks_them_before_loading_a_model(runner, tmp_path):
    folder, captions = sits(tmp_path, [(1000, IMAGES[0], 4.0)]), coco_captions(tmp_path)
    base = ["eval", "--store", tmp_path / "none.zarr", "--checkpoint", tmp_path / "none"]
    result = run_cli(runner, *base, "--protocol", "cxc", "--cxc", folder)
    assert result.exit_code == 2 and "--cxc applies only with --coco-captions" in result.output
    result = run_cli(runner, *base, "--cxc", folder, "--coco-captions", captions)  # the protocol is full
    assert (
        result.exit_code == 2
        and "--protocol cxc goes with --cxc DIR and --coco-captions FILE" in result.output
    )
    (folder / "sits_test.csv").write_text("nonsense\n")
    result = run_cli(runner, *base, "--protocol", "cxc", "--cxc", folder, "--coco-captions", captions)
    assert result.exit_code == 2 and "the columns are nonsense" in result.output
