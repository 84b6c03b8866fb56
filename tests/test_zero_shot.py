"""`eval --zero-shot` and `report --zero-shot`: the store's open_clip image globals against the same model's
text tower, ranked as a run is (a small randomly initialised open_clip model saved in the real format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from kit import EXTRACT_COCO_GRID, run_cli
from test_evaluate import assert_same, reference_metrics
from test_global_encoders import tiny_open_clip

pytestmark = pytest.mark.slow  # a store extracted with an open_clip model


@pytest.fixture
def clip_store(runner, coco_root: Path, tmp_path: Path) -> tuple[Path, str]:
    config, weights = tiny_open_clip(tmp_path)
    spec = f"{config}:{weights}"
    out = tmp_path / "clip.zarr"
    result = run_cli(runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", out, "--clip", spec)
    assert result.exit_code == 0, result.output
    return out, spec


def test_zero_shot_ranks_the_stored_image_globals_against_the_text_tower(runner, clip_store, tmp_path):
    """The metrics equal the reference loops over open_clip's own text embeddings of the split's captions
    against the store's image globals; every protocol's check applies."""
    import open_clip

    store, spec = clip_store
    result = run_cli(runner, "eval", "--zero-shot", spec, "--store", store, "--split", "train", "--json")
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)

    split = zarr.open_group(str(store), mode="r")["train"]
    valid = split["valid"][:]
    images = torch.nn.functional.normalize(torch.from_numpy(split["clip_image"][:][valid].astype(np.float32)))
    keep = np.flatnonzero(valid)
    caption_image = split["caption_image"][:]
    rows = np.flatnonzero(np.isin(caption_image, keep))
    model, _, _ = open_clip.create_model_and_transforms("tiny-clip", pretrained=spec.split(":", 1)[1])
    tokens = open_clip.get_tokenizer("tiny-clip")(list(split["caption_text"][:][rows]))
    with torch.no_grad():
        texts = model.eval().encode_text(tokens)
    texts = torch.nn.functional.normalize(texts)
    position = {row: i for i, row in enumerate(keep)}
    truth = np.array([position[i] for i in caption_image[rows]])
    assert_same(ours, reference_metrics((images @ texts.T).numpy(), truth))
    assert (ours["num_images"], ours["num_captions"]) == (len(keep), len(rows))

    table = run_cli(runner, "eval", "--zero-shot", spec, "--store", store, "--split", "train")
    assert "zero-shot tiny-clip (open_clip): full on" in " ".join(table.stdout.split())
    refused = run_cli(runner, "eval", "--zero-shot", spec, "--store", store, "--protocol", "coco5k")
    assert refused.exit_code == 2 and "5,000" in refused.output


def test_zero_shot_refuses_another_model_than_the_store_s(runner, clip_store, tmp_path):
    """Another model's (or the same model's other weights') text tower embeds in another space: refused,
    naming the store's model; a store with no open_clip globals is refused too."""
    from safetensors.torch import load_file, save_file

    store, spec = clip_store
    config, weights = spec.split(":", 1)
    other = tmp_path / "other.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, other)
    result = run_cli(runner, "eval", "--zero-shot", f"{config}:{other}", "--store", store, "--split", "train")
    assert result.exit_code == 2
    assert f"pass --zero-shot {config}:{weights}" in " ".join(result.output.split())
    both = run_cli(runner, "eval", "--zero-shot", spec, "--run", tmp_path, "--store", store)
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_report_puts_the_zero_shot_row_beside_the_trained_run(runner, trained, tmp_path):
    """report --zero-shot: its row in report.md's table and in report.json, equal to eval --zero-shot's,
    on a store the run fits whose image globals are recorded as the tiny open_clip model's."""
    import shutil

    from userpipe.pipeline.global_encoders import resolve_global_config
    from userpipe.pipeline.synthetic import write_synthetic_store

    config, weights = tiny_open_clip(tmp_path)
    spec = f"{config}:{weights}"
    store = write_synthetic_store(
        tmp_path / "gallery.zarr", 16, seed=4, split="test", global_encoder=resolve_global_config(spec)
    )
    run = tmp_path / "run"
    shutil.copytree(trained.run, run, symlinks=True)
    result = run_cli(runner, "report", "--run", run, "--store", store, "--zero-shot", spec)
    assert result.exit_code == 0, result.output
    evaluated = run_cli(runner, "eval", "--zero-shot", spec, "--store", store, "--json")
    expected = json.loads(evaluated.stdout)
    row = json.loads((run / "report.json").read_text())["zero_shot"]
    assert row["label"] == "zero-shot tiny-clip (open_clip)"
    assert row["rsum"] == pytest.approx(expected["rsum"], abs=1e-9)
    line = next(li for li in (run / "report.md").read_text().splitlines() if li.startswith("| zero-shot"))
    assert line.endswith(f"| {expected['rsum']:.1f} |")
