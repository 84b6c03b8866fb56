import itertools
import json
import re

import pytest
import torch
from kit import run_cli

from userpipe.retrieval.report import chance_metrics, run_label
from userpipe.trainer.config import load_run_config
from userpipe.trainer.evaluate import ranks, retrieval_metrics


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
        (
            {"train.mu_start": 20, "train.mu_warmup_steps": 157},
            "USER-SGE, μ warm-up from 20 over 157 steps",
        ),
        ({"train.init_seed": 3}, "USER-SGE, initialised from seed 3"),
        ({"model.gpo_init": "uniform"}, "USER-SGE, GPO from a uniform start"),
        (
            {"model.gpo_init": "uniform", "train.align_start": True},
            "USER-SGE, GPO from a uniform start, sign-aligned start",
        ),
    ],
)
def test_a_runs_label_names_every_departure_from_user_sge(overrides, label):
    assert run_label(load_run_config("coco", overrides)) == label  # the released recipe: no μ warm-up


def test_report_compares_trained_untrained_and_chance(runner, trained):
    run = trained.run
    result = run_cli(
        runner, "report", "--run", run, "--store", trained.val, "--split", "val", "--compare", run
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
    assert [a["label"] for a in report["ablation"]] == ["USER-SGE"]  # the run itself, given again: once
    assert len(report["queries"]) == 4 and all(len(q["top"]) == 5 for q in report["queries"])
    for q in report["queries"]:
        assert [h["correct"] for h in q["top"]] == [h["image_id"] == q["image_id"] for h in q["top"]]
        shown = [h["correct"] for h in q["top"]]  # the true image's rank: where it is shown, or below
        if any(shown):
            assert q["rank"] == shown.index(True) + 1
        else:
            assert 5 < q["rank"] <= 8  # the split has 8 images
    text = (run / "report.md").read_text()
    best = max((r for r in log if "val" in r and r["step"] > 0), key=lambda r: r["val"]["rsum"])
    assert f"| trained (best validation: after epoch {best['epoch']}) |" in text  # epoch-end: its number
    assert "| chance |" in text and "## Ablation" in text and "![queries](queries.png)" in text
    assert (run / "queries.png").stat().st_size > 10_000
    missing = run_cli(runner, "report", "--run", trained.tmp, "--store", trained.val, "--split", "val")
    assert missing.exit_code == 2 and f"--run {trained.tmp} is not a userpipe run" in missing.output


def test_the_runs_tables_state_what_they_evaluated(runner, trained):
    """training.md's validation tables, and eval's table and JSON, say how many images and captions their
    numbers are over: the run validates on all 8 images of `val` (21 captions); the gallery has 15 valid
    images (42 captions)."""
    assert not (trained.run / "summary.md").exists()  # one "report" per run: report.md
    summary = (trained.run / "training.md").read_text()
    assert summary.startswith(f"# Training of {trained.run.name}\n")
    assert re.search(r"best validation at step \d+ \(after epoch [12]\)", summary), summary
    assert "## Best validation: 8 images, 21 captions\n" in summary
    assert "## Untrained model (step 0): 8 images, 21 captions\n" in summary
    base = ("eval", "--run", trained.run, "--store", trained.gallery)
    table = run_cli(runner, *base)
    assert table.exit_code == 0, table.output
    assert f"full on {trained.gallery} [test]: 15 images, 42 captions\n" in table.stdout
    as_json = run_cli(runner, *base, "--json")
    assert as_json.exit_code == 0, as_json.output
    metrics = json.loads(as_json.stdout)
    assert (metrics["num_images"], metrics["num_captions"]) == (15, 42)


def test_the_true_images_rank_is_evals_rank_ties_included():
    from userpipe.retrieval.report import true_rank

    generator = torch.Generator().manual_seed(0)
    sims = torch.randint(0, 4, (12, 30), generator=generator).double()  # images x captions, many ties
    caption_image = torch.randint(0, 12, (30,), generator=generator)
    _, t2i = ranks(sims, caption_image)
    got = [true_rank(sims[:, c], int(caption_image[c])) for c in range(30)]
    assert got == (t2i + 1).tolist()


def _log(epochs: int, per_epoch: int, val_every: int = 0) -> list[dict]:
    """A log as training writes it: the baseline, steps, validations within and at the end of epochs."""
    records, step = [{"step": 0, "epoch": 0, "val": {"rsum": 1.0}}], 0
    for epoch in range(epochs):
        for _ in range(per_epoch):
            step += 1
            records.append({"step": step, "epoch": epoch, "loss": 3.0, "batch": 1.0, "queue": 2.0})
            if val_every and step % val_every == 0 and step % per_epoch:
                records.append({"step": step, "epoch": epoch, "val": {"rsum": float(step)}})
        records.append({"step": step, "epoch": epoch + 1, "val": {"rsum": float(step)}})
    return records


def test_validations_are_placed_in_epochs_counted_from_1():
    from userpipe.trainer.training_page import when_validated

    log = _log(epochs=2, per_epoch=4, val_every=3)
    places = [(r["step"], when_validated(log, r)) for r in log if "val" in r]
    assert places == [
        (0, "before training"),
        (3, "in epoch 1"),
        (4, "after epoch 1"),
        (6, "in epoch 2"),
        (8, "after epoch 2"),
    ]


def test_the_loss_plot_marks_epochs_and_names_what_it_draws():
    from userpipe.trainer.training_page import loss_figure, rsum_figure

    for figure in (loss_figure(_log(epochs=3, per_epoch=5)), rsum_figure(_log(epochs=3, per_epoch=5))):
        ax = figure.axes[0]
        boundaries = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert boundaries == [5, 10]  # between epochs 1|2 and 2|3
        (top,) = ax.child_axes
        assert [t.get_text() for t in top.get_xticklabels()] == ["epoch 1", "epoch 2", "epoch 3"]
    ax = loss_figure(_log(epochs=3, per_epoch=5)).axes[0]
    assert ax.get_ylabel() == "UTO loss (in-batch + queue)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "total (λ · in-batch + queue)",
        "in-batch part",
        "queue part",
    ]


def test_each_query_row_says_where_its_true_image_ranked(tmp_path, monkeypatch):
    from userpipe.retrieval import report as run_report
    from userpipe.trainer.encode import SplitEmbeddings

    images = torch.eye(10)
    # caption c prefers images in index order, so its own image c ranks c + 1
    captions = torch.linspace(1, 0.1, 10).expand(10, 10).clone()
    emb = SplitEmbeddings(
        images=images,
        captions=captions,
        caption_image=torch.arange(10),
        image_ids=[f"img{i}" for i in range(10)],
        image_rows=torch.arange(10).numpy(),
        caption_texts=[f"caption {c}" for c in range(10)],
    )
    drawn = []
    monkeypatch.setattr(run_report, "save_png", lambda fig, path, dpi: drawn.append(fig))
    queries = run_report.query_grid(emb, [None] * 10, tmp_path / "queries.png")
    assert [q["rank"] for q in queries] == [1, 4, 7, 10]  # the captions picked: 0, 3, 6, 9
    titles = [t.get_text() for t in drawn[0].texts]
    assert titles == [f"“caption {c}”  (true image at rank {c + 1} of 10)" for c in (0, 3, 6, 9)]


def test_groups_of_the_same_name_are_told_apart_by_their_settings_or_their_shards():
    from userpipe.retrieval.report import _tell_apart

    six, three, other_shards = ({"label": "USER-SGE"} for _ in range(3))
    alone = {"label": "USER-CGE"}
    _tell_apart(
        [
            (six, {"train.epochs": "6", "train.lr": "0.0005"}, "a" * 64),
            (three, {"train.epochs": "3", "train.lr": "0.0005"}, "a" * 64),
            (other_shards, {"train.epochs": "3", "train.lr": "0.0005"}, "b" * 64),
            (alone, {"train.epochs": "3", "train.lr": "0.0005"}, "a" * 64),
        ]
    )
    assert [g["label"] for g in (six, three, other_shards, alone)] == [
        "USER-SGE, train.epochs=6, shards aaaaaaaa",
        "USER-SGE, train.epochs=3, shards aaaaaaaa",
        "USER-SGE, train.epochs=3, shards bbbbbbbb",
        "USER-CGE",
    ]
