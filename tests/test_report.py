import itertools
import json

import pytest
import torch
from conftest import run_cli

from userpipe.trainer.config import load_run_config
from userpipe.trainer.evaluate import retrieval_metrics
from userpipe.trainer.run_report import chance_metrics, run_label


def test_chance_is_the_mean_over_every_ranking():
    """Exact: average the metrics over all orderings of the images (t2i) and of the captions (i2t)."""
    caption_image = torch.tensor([0, 0, 0, 1, 2, 2])  # 3 images with 3, 1 and 2 captions
    n, c = 3, len(caption_image)
    t2i = [
        retrieval_metrics(torch.tensor(p, dtype=torch.float64)[:, None].expand(n, c), caption_image)["t2i"]
        for p in itertools.permutations(range(n))
    ]
    i2t = [
        retrieval_metrics(torch.tensor(p, dtype=torch.float64)[None, :].expand(n, c), caption_image)["i2t"]
        for p in itertools.permutations(range(c))
    ]
    chance = chance_metrics(caption_image, n)
    for k in (1, 5, 10):
        assert chance["t2i"][f"r{k}"] == pytest.approx(sum(m[f"r{k}"] for m in t2i) / len(t2i), abs=1e-9)
        assert chance["i2t"][f"r{k}"] == pytest.approx(sum(m[f"r{k}"] for m in i2t) / len(i2t), abs=1e-9)
    assert chance_metrics(torch.arange(1000).repeat_interleave(5), 1000)["t2i"]["r1"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ({}, "USER-SGE"),
        ({"model.enhancement": "cge", "model.clip_dim": 1280}, "USER-CGE"),
        ({"model.use_queue": False}, "USER-SGE without queue"),
        (
            {"model.enhancement": "none", "model.use_queue": False},
            "VSE∞-style baseline (no enhancement, no queue)",
        ),
        ({"model.mask_false_negatives": True}, "USER-SGE, same-image negatives masked"),
        (
            {"model.enhancement": "cge", "model.clip_dim": 1280, "model.keys_in_train_mode": False},
            "USER-CGE, key encoders in eval mode",
        ),
    ],
)
def test_a_runs_label_names_every_departure_from_user_sge(overrides, label):
    assert run_label(load_run_config("demo", overrides).model) == label


def test_report_compares_trained_untrained_and_chance(runner, trained):
    run = trained["run"]
    result = run_cli(
        runner, "report", "--run", run, "--store", trained["val"], "--split", "val", "--compare", run
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    validations = {r["step"]: r["val"] for r in log if "val" in r}
    # the untrained row is the run's seeded start, which training validated at step 0 on this split
    assert report["untrained"]["rsum"] == pytest.approx(validations[0]["rsum"], abs=1e-6)
    best = max(v["rsum"] for step, v in validations.items() if step > 0)  # best of the epochs' checkpoints
    assert report["trained"]["rsum"] == pytest.approx(best, abs=1e-6)
    assert report["chance"]["t2i"]["r1"] == pytest.approx(100 / 8)
    assert [a["label"] for a in report["ablation"]] == ["USER-SGE"] * 2
    assert len(report["queries"]) == 4 and all(len(q["top"]) == 5 for q in report["queries"])
    for q in report["queries"]:
        assert [h["correct"] for h in q["top"]] == [h["image_id"] == q["image_id"] for h in q["top"]]
    text = (run / "report.md").read_text()
    assert "| chance |" in text and "## Ablation" in text and "![queries](queries.png)" in text
    assert (run / "queries.png").stat().st_size > 10_000
    missing = run_cli(runner, "report", "--run", trained["tmp"], "--store", trained["val"], "--split", "val")
    assert missing.exit_code == 2 and f"--run {trained['tmp']} is not a userpipe run" in missing.output


def test_the_runs_tables_state_what_they_evaluated(runner, trained):
    """summary.md's validation tables, and eval's table and JSON, say how many images and captions their
    numbers are over: the run validates on all 8 images of `val` (21 captions); the gallery has 15 valid
    images (42 captions)."""
    summary = (trained["run"] / "summary.md").read_text()
    assert "## Best validation: 8 images, 21 captions\n" in summary
    assert "## Untrained model (step 0): 8 images, 21 captions\n" in summary
    base = ("eval", "--run", trained["run"], "--store", trained["gallery"])
    table = run_cli(runner, *base)
    assert table.exit_code == 0, table.output
    assert f"full on {trained['gallery']} [test]: 15 images, 42 captions\n" in table.stdout
    as_json = run_cli(runner, *base, "--json")
    assert as_json.exit_code == 0, as_json.output
    metrics = json.loads(as_json.stdout)
    assert (metrics["num_images"], metrics["num_captions"]) == (15, 42)
