"""The page training writes beside its log: training.md, loss.png, val_rsum.png (`write_training_summary`,
at the end of a run; `userpipe report` links it)."""

from __future__ import annotations

from pathlib import Path

from userpipe.schemas.base import read_model
from userpipe.schemas.outputs import write_text_atomic, written_whole
from userpipe.schemas.run import RUN_RECORD_NAME, RunRecord
from userpipe.trainer.checkpoint import run_config_of
from userpipe.trainer.encode import split_sizes
from userpipe.trainer.evaluate import format_table, with_sizes


def save_png(fig, path: Path, dpi: int) -> None:
    with written_whole(path) as temporary:
        fig.savefig(temporary, format="png", dpi=dpi)


def validation_sizes(run: Path) -> tuple[int, int]:
    """The images and captions a run validates on (its validation store's `val` split, the first
    train.val_images images), which its log's metrics do not record."""
    store = read_model(RunRecord, run / RUN_RECORD_NAME, "run record").data.val_store
    _, images, captions, _ = split_sizes(Path(store), "val", run_config_of(run).train.val_images)
    return images, captions


def when_validated(records: list[dict], record: dict) -> str:
    """Where in the run a validation of the log was, its epochs counted from 1 as messages count them. The
    log's "epoch" is the epochs completed when a line was written, so an epoch-end validation carries the
    epoch's number and one within an epoch (train.val_every) the same number as that epoch's steps."""
    if record["step"] == 0:
        return "before training"
    step = next((r for r in records if "loss" in r and r["step"] == record["step"]), None)
    if step is not None and step["epoch"] == record["epoch"]:
        return f"in epoch {record['epoch'] + 1}"
    return f"after epoch {record['epoch']}"


def epoch_ends(steps: list[dict]) -> list[int]:
    """The step at which each epoch of the log ended (the last step logged with its epoch number)."""
    ends: dict[int, int] = {}
    for r in steps:
        ends[r["epoch"]] = max(ends.get(r["epoch"], 0), r["step"])
    return [ends[e] for e in sorted(ends)]


def _mark_epochs(ax, ends: list[int]) -> None:
    """Dotted lines where each epoch ended (the last: the plot's end), and each epoch's number on the top
    axis over its span, clear of the curves."""
    if not ends:
        return
    for end in ends[:-1]:
        ax.axvline(end, color="#999999", linestyle=":", linewidth=0.8)
    starts = [0, *ends[:-1]]
    top = ax.secondary_xaxis("top")
    middles = [(a + b) / 2 for a, b in zip(starts, ends, strict=True)]
    top.set_xticks(middles, [f"epoch {n}" for n in range(1, len(ends) + 1)])
    top.tick_params(length=0, labelsize=8)


def loss_figure(records: list[dict]):
    """loss.png: UTO's total (λ · in-batch part + queue part) and its two parts per step, epochs marked."""
    from matplotlib.figure import Figure

    steps = [r for r in records if "loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    x = [r["step"] for r in steps]
    curves = {"loss": "total (λ · in-batch + queue)", "batch": "in-batch part", "queue": "queue part"}
    for key, label in curves.items():
        values = [r[key] for r in steps]
        if key != "queue" or any(values):  # a run without the queue logs a zero queue part
            ax.plot(x, values, label=label, linewidth=0.8)
    _mark_epochs(ax, epoch_ends(steps))
    ax.set(xlabel="step", ylabel="UTO loss (in-batch + queue)", title="training loss")
    ax.legend()
    fig.tight_layout()
    return fig


def rsum_figure(records: list[dict]):
    """val_rsum.png: validation RSUM per step (step 0: the untrained model), epochs marked."""
    from matplotlib.figure import Figure

    vals = [r for r in records if "val" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in vals], [r["val"]["rsum"] for r in vals], marker="o")
    _mark_epochs(ax, epoch_ends([r for r in records if "loss" in r]))
    ax.set(xlabel="step", ylabel="RSUM (R@1,5,10 both ways)", title="validation RSUM")
    fig.tight_layout()
    return fig


TRAINING_PAGE = "training.md"  # not "report": `userpipe report` writes report.md


def write_training_summary(run: Path, records: list[dict]) -> None:
    """loss.png, val_rsum.png and training.md beside the log, at the end of training.
    (matplotlib's Figure draws without pyplot, so no process-wide backend is chosen.)"""
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    save_png(loss_figure(records), run / "loss.png", dpi=120)
    save_png(rsum_figure(records), run / "val_rsum.png", dpi=120)
    trained = [r for r in vals if r["step"] > 0]  # the validations a best checkpoint is of
    best = max(trained or vals, key=lambda r: r["val"]["rsum"])
    untrained = [r for r in vals if r["step"] == 0]
    sizes = validation_sizes(run)
    write_text_atomic(
        run / TRAINING_PAGE,
        f"# Training of {run.name}\n\n{len(steps)} steps; best validation at step {best['step']} "
        f"({when_validated(records, best)}).\n\n"
        + format_table(with_sizes(best["val"], *sizes), "## Best validation")
        + (
            format_table(with_sizes(untrained[0]["val"], *sizes), "\n## Untrained model (step 0)")
            if untrained
            else ""
        )
        + "\n![loss](loss.png)\n\n![validation RSUM](val_rsum.png)\n",
    )
