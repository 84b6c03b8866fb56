import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from kit import Chain, log_scalars, run_cli, wandb_history

from userpipe.pipeline.synthetic import write_synthetic_store

pytestmark = pytest.mark.slow  # end-to-end: training runs


@pytest.fixture(scope="module")
def data(chain) -> Chain:
    """40 images of 1 to 5 captions in shards of 10, 12 validation images, the tiny recipe's 3 epochs."""
    return chain("train", captions_per_image=None, val_images=12, val_seed=2)


def train_args(data, out, *extra):
    return (
        "train",
        "--shards",
        data.shards,
        "--val-store",
        data.val,
        "--config",
        data.config,
        "--out",
        out,
        *extra,
    )


def test_training_runs_logs_checkpoints_and_eval_reproduces_best(runner, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("USERPIPE_PROGRESS_SECONDS", "0")  # a plain progress line after every step
    result = run_cli(runner, *train_args(data, out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    per_epoch = len(steps) // 3
    # CliRunner's stderr is not a terminal: plain lines (rich's bar would print nothing until the end),
    # epochs counted from 1, each step's line with its loss as logged, one line per epoch end
    number = r"[0-9.e+-]+"
    progress = re.findall(
        rf"^epoch (\d)/3  step (\d+)/{len(steps)}  loss ({number})  lr {number}  \d+ pairs/s  ETA \S+$",
        result.output,
        re.MULTILINE,
    )
    assert [(int(e), int(s)) for e, s, _ in progress] == [(r["epoch"] + 1, r["step"]) for r in steps]
    assert [float(loss) for *_, loss in progress] == pytest.approx([r["loss"] for r in steps], abs=1e-4)
    ends = re.findall(
        r"^epoch (\d)/3 done  step (\d+)/\d+ .* validation RSUM ([0-9.]+)$", result.output, re.MULTILINE
    )
    validations = [r for r in records if "val" in r][1:]
    assert [(int(e), int(s)) for e, s, _ in ends] == [(r["epoch"], r["step"]) for r in validations]
    assert [float(rsum) for *_, rsum in ends] == pytest.approx(
        [r["val"]["rsum"] for r in validations], abs=0.05
    )
    assert "━" not in result.output  # no bar
    assert f"training curves and tables: {out / 'training.md'}" in result.output
    assert [r["step"] for r in records if "val" in r] == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])
    assert {"lr", "batch", "queue", "samples_per_s", "same_image_batch", "same_image_queue"} <= set(steps[0])
    assert steps[0]["same_image_queue"] == 0  # the first batch meets only the queue's random start
    # 40 images, 3 passes of 5 batches of 8 per epoch: no batch holds an image twice; the queue (20) holds
    # an image's earlier caption only across a pass boundary
    assert [r["same_image_batch"] for r in steps] == [0] * len(steps)
    assert 0 < np.mean([r["same_image_queue"] for r in steps]) < 0.5
    for name in (
        "training.md",
        "loss.png",
        "val_rsum.png",
        "config.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/last/state.pt",
    ):
        assert (out / name).is_file(), name
    best = json.loads((out / "checkpoints/best/metrics.json").read_text())
    evaluated = run_cli(runner, "eval", "--run", out, "--store", data.val, "--split", "val", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["rsum"] == pytest.approx(best["rsum"], abs=1e-6)
    again = run_cli(runner, *train_args(data, out))
    assert again.exit_code == 2 and "already holds a run" in again.output


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.feature_dim=12", "model.feature_dim=12 but the shards hold 8-d"),
        ("model.enhancement=cge", "clip_dim is set exactly when"),
        ("train.batch_size=1000", "fewer pairs than one batch"),
    ],
)
def test_config_that_does_not_fit_the_data_fails_before_work(runner, data, tmp_path, override, message):
    result = run_cli(runner, *train_args(data, tmp_path / "bad", "--set", override))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_resume_refuses_another_architecture_and_restarts_selection_on_another_validation_set(
    runner, data, tmp_path
):
    out = tmp_path / "run"
    assert run_cli(runner, *train_args(data, out, "--set", "train.epochs=1")).exit_code == 0
    result = run_cli(runner, *train_args(data, out, "--resume", "--set", "model.embed_dim=32"))
    assert result.exit_code == 2 and "another model configuration" in result.output
    first_best = json.loads((out / "checkpoints/best/metrics.json").read_text())["rsum"]
    other = write_synthetic_store(tmp_path / "other-val.zarr", 10, seed=7, split="val")
    on_other = ("train", "--shards", data.shards, "--val-store", other, "--out", out, "--resume")
    refused = run_cli(runner, *on_other, "--set", "train.epochs=2")
    assert refused.exit_code == 2 and "--allow-change" in refused.output, refused.output
    resumed = run_cli(runner, *on_other, "--allow-change", "--set", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at the start of epoch 2 of 2" in resumed.output  # the first one is done
    assert "best-model selection starts again on the new validation set" in resumed.output
    change = json.loads((out / "run.json").read_text())["changes"][-1]["fields"]
    assert change["val_store"][1] == str(other.resolve()) and change["best_rsum"] == [first_best, None]
    # RSUMs of two sets do not compare: the best is the new set's one validation, whatever the old best was
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    best = json.loads((out / "checkpoints/best/metrics.json").read_text())
    assert best["rsum"] == pytest.approx([r for r in log if "val" in r][-1]["val"]["rsum"])


@pytest.mark.parametrize(
    "switches",
    [
        ("model.enhancement=none", "model.use_queue=false"),  # the VSE∞-style baseline
        ("model.enhancement=cge", "model.clip_dim=5"),
        ("model.mask_false_negatives=true", "train.backend=chunked", "model.keys_in_train_mode=false"),
    ],
)
def test_ablation_switches_train_from_the_config(runner, data, tmp_path, switches):
    sets = [arg for switch in switches for arg in ("--set", switch)]
    result = run_cli(runner, *train_args(data, tmp_path / "run", "--set", "train.epochs=1", *sets))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for switch in switches:
        section, rest = switch.split(".", 1)
        key, value = rest.split("=")
        assert str(saved[section][key]).lower() == value


def test_a_bad_progress_interval_is_refused_before_work(runner, data, tmp_path, monkeypatch):
    monkeypatch.setenv("USERPIPE_PROGRESS_SECONDS", "soon")
    result = run_cli(runner, *train_args(data, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        == "error: USERPIPE_PROGRESS_SECONDS='soon' is not a number of seconds (0 or more)"
    )
    assert not (tmp_path / "run").exists()


def _progress(console, every: float):
    from userpipe.trainer.progress import TrainingProgress
    from userpipe.trainer.step import Position

    with TrainingProgress(console, total=4, epochs=2, done=0, every=every) as progress:
        for step in range(1, 5):
            position = Position(epoch=(step - 1) // 2, step=(step - 1) % 2 + 1, global_step=step)
            progress.step(position, loss=float(step), lr=1e-3, rate=100.0)
            if step % 2 == 0:
                progress.epoch_end(Position(epoch=step // 2, global_step=step), {"rsum": 10.0 * step})
    return progress


def test_progress_is_rich_s_bar_on_a_terminal_and_plain_lines_elsewhere():
    from rich.console import Console

    terminal = io.StringIO()
    progress = _progress(Console(file=terminal, force_terminal=True, width=120), every=0)
    assert progress.bar is not None and "━" in terminal.getvalue()
    assert "step 1/4" not in terminal.getvalue()  # the bar shows the steps
    assert "epoch 1/2 done  step 2/4  loss 1.5000" in terminal.getvalue()  # above the bar
    log = io.StringIO()
    progress = _progress(Console(file=log, force_terminal=False, width=120), every=0)
    lines = log.getvalue().splitlines()
    assert progress.bar is None and len(lines) == 6
    assert lines[0].startswith("epoch 1/2  step 1/4  loss 1.0000  lr 1.00e-03  100 pairs/s  ETA 0:00:00")
    assert lines[2].startswith("epoch 1/2 done  step 2/4  loss 1.5000") and lines[2].endswith("RSUM 20.0")
    assert lines[5].startswith("epoch 2/2 done  step 4/4  loss 3.5000")
    quiet = io.StringIO()
    _progress(Console(file=quiet, force_terminal=False, width=120), every=3600)
    assert [line.split("  ")[0] for line in quiet.getvalue().splitlines()] == [
        "epoch 1/2 done",
        "epoch 2/2 done",
    ]


def test_the_resume_message_counts_epochs_from_1():
    from userpipe.trainer.step import Position
    from userpipe.trainer.train import resume_message

    run = Path("runs/r")
    assert resume_message(run, Position(epoch=0, step=5, global_step=5), 3, [15] * 3) == (
        "resuming runs/r in epoch 1 of 3, after its step 5 of 15"
    )
    assert resume_message(run, Position(epoch=1, step=0, global_step=15), 3, [15] * 3) == (
        "resuming runs/r at the start of epoch 2 of 3"
    )
    assert resume_message(run, Position(epoch=3, step=0, global_step=45), 3, [15] * 3) == (
        "resuming runs/r: its 3 epoch(s) are done (45 steps)"
    )


def test_max_steps_ends_the_run_mid_epoch_validated_and_saved_and_a_resume_can_extend_it(
    runner, data, tmp_path
):
    out = tmp_path / "run"
    first = run_cli(runner, *train_args(data, out, "--set", "train.max_steps=3"))
    assert first.exit_code == 0, first.output
    assert "stopped in epoch 1/3 (train.max_steps)  step 3/3" in first.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert [(r["step"], r["epoch"]) for r in log if "val" in r] == [(0, 0), (3, 0)]
    assert (out / "checkpoints" / "last").resolve().name == "e000-s000003"  # epoch 0, its step 3
    again = run_cli(runner, *train_args(data, out, "--resume", "--set", "train.max_steps=3"))
    assert again.exit_code == 0, again.output
    assert "its 3 steps (train.max_steps) are done" in again.output
    assert len((out / "log.jsonl").read_text().splitlines()) == len(log)
    longer = run_cli(
        runner, *train_args(data, out, "--resume", "--allow-change", "--set", "train.max_steps=5")
    )
    assert longer.exit_code == 0, longer.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in log if "val" in r] == [0, 3, 5]


@pytest.mark.parametrize("seed", [1, 5])  # the tiny model's start: seed 1 below zero, seed 5 above
def test_align_start_negates_the_text_projection_when_the_first_batch_scores_below_zero(
    runner, data, tmp_path, seed
):
    """The start score is measured on the first batch the run trains on, leaving the model's buffers and
    the dropout RNG alone: the first step then scores that batch's matching pairs at |start score|."""
    out = tmp_path / "run"
    aligned = ("model.gpo_init=uniform", "train.align_start=true", f"train.seed={seed}", "train.max_steps=1")
    result = run_cli(runner, *train_args(data, out, *(a for o in aligned for a in ("--set", o))))
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if "start_score" in r)
    first_step = next(r for r in log if "loss" in r)
    assert start["text_negated"] == (start["start_score"] < 0) == (seed == 1)
    assert first_step["positive_score"] == pytest.approx(abs(start["start_score"]), abs=1e-5)
    # the baseline is the start as trained from, and `report` rebuilds the same from the seed and the log
    assert log[0] == start and log[1]["step"] == 0 and "val" in log[1]
    reported = run_cli(runner, "report", "--run", out, "--store", data.val, "--split", "val")
    assert reported.exit_code == 0, reported.output
    untrained = json.loads((out / "report.json").read_text())["untrained"]["rsum"]
    assert untrained == pytest.approx(log[1]["val"]["rsum"], abs=1e-6)


def test_a_run_that_is_not_learning_is_told_and_stopped_when_asked(runner, data, tmp_path):
    """A learning rate of 1e-9 leaves the model where it started: its first validation is within noise of
    step 0's, which is a warning in the console and the log, and with train.stop_if_not_learning the end of
    the run (one line, exit 2), its checkpoint kept."""
    still = ("--set", "train.lr=1e-9", "--set", "train.epochs=1")
    warned = run_cli(runner, *train_args(data, tmp_path / "warned", *still))
    assert warned.exit_code == 0, warned.output
    assert "warning: the run is not learning" in " ".join(warned.output.split())
    log = [json.loads(line) for line in (tmp_path / "warned" / "log.jsonl").read_text().splitlines()]
    warnings = [r["warning"] for r in log if "warning" in r]
    assert len(warnings) == 1 and warnings[0].startswith("the run is not learning: validation RSUM")
    stopped = run_cli(
        runner, *train_args(data, tmp_path / "stopped", *still, "--set", "train.stop_if_not_learning=true")
    )
    assert stopped.exit_code == 2
    errors = [line for line in stopped.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not learning" in errors[0] and "stop_if_not_learning" in errors[0]
    assert (tmp_path / "stopped" / "checkpoints" / "last").exists()


def test_rsum_noise_is_the_sum_of_the_recalls_binomial_errors_at_chance_or_above():
    from userpipe.trainer.evaluate import rsum_noise
    from userpipe.trainer.train import NOT_LEARNING_ERRORS, not_learning

    side = {"r1": 0.0, "r5": 0.5, "r10": 50.0}
    baseline = {"i2t": side, "t2i": side, "rsum": 101.0, "num_images": 100, "num_captions": 500}
    expected = 0.0
    for queries, items in ((100, 500), (500, 100)):
        for k, recall in ((1, 0.0), (5, 0.5), (10, 50.0)):
            p = max(recall / 100, k / items)
            expected += 100 * np.sqrt(p * (1 - p) / queries)
    assert rsum_noise(baseline) == pytest.approx(expected)
    limit = baseline["rsum"] + NOT_LEARNING_ERRORS * expected
    assert not_learning(baseline, {"rsum": limit - 0.01}) is not None
    assert not_learning(baseline, {"rsum": limit + 0.01}) is None


def test_wandb_offline_records_the_log_s_numbers_in_the_run_s_id(runner, data, tmp_path, monkeypatch):
    """`--report-to wandb` in W&B's offline mode: one W&B run with run.json's id, in RUN/wandb, whose history
    holds log.jsonl's numbers at the same steps (read back from W&B's own run file)."""
    pytest.importorskip("wandb", reason="the wandb package is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    result = run_cli(runner, *train_args(data, out, "--set", "train.epochs=1", "--report-to", "wandb"))
    assert result.exit_code == 0, result.output
    run_id = json.loads((out / "run.json").read_text())["id"]
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list((out / "wandb").iterdir())
    recorded: dict[str, list] = {}
    for row in wandb_history(files[0]):
        for key, value in row.items():
            if not key.startswith("_"):
                recorded.setdefault(key, []).append((row["_step"], value))
    logged = log_scalars(out)
    assert set(logged) <= set(recorded)
    for tag, values in logged.items():
        assert recorded[tag] == values, tag  # as JSON, exactly


def test_report_to_names_a_known_tracker_whose_package_is_installed(monkeypatch):
    import importlib.util

    from userpipe.schemas.errors import InputError
    from userpipe.trainer.tracking import parse_report_to

    assert parse_report_to(None) == ()
    with pytest.raises(InputError, match="unknown tracker 'mlflow' \\(choose from tensorboard, wandb\\)"):
        parse_report_to("tensorboard,mlflow")
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else found(n, *a))
    with pytest.raises(InputError, match="^--report-to wandb needs the wandb package: pip install wandb$"):
        parse_report_to("tensorboard, wandb")


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_restarts_clean(
    runner, data, tmp_path, monkeypatch
):
    """W&B refusing to start (no login, say) ends the command in one line, exit 2, before any step; the
    TensorBoard writer opened before it is closed, and the rerun without W&B starts the run again from
    nothing, its tracker folders included."""
    wandb = pytest.importorskip("wandb", reason="the wandb package is not installed")
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")

    def refuse(**_):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    failed = run_cli(
        runner, *train_args(data, out, "--set", "train.epochs=1", "--report-to", "tensorboard,wandb")
    )
    assert failed.exit_code == 2
    errors = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --report-to wandb: api_key not configured")
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()  # before any step
    again = run_cli(runner, *train_args(data, out, "--set", "train.epochs=1", "--report-to", "tensorboard"))
    assert again.exit_code == 0, again.output
    assert len(list((out / "tensorboard").iterdir())) == 1  # the failed start's event file went with it


def test_seeds_train_a_run_each_resume_the_unfinished_and_report_their_mean_std_and_spread(
    runner, data, tmp_path
):
    out, short = tmp_path / "seeds", ("--set", "train.max_steps=3")
    first = run_cli(runner, *train_args(data, out, "--seeds", "1,2", *short))
    assert first.exit_code == 0, first.output
    logs = {seed: (out / f"seed-{seed}" / "log.jsonl").read_text() for seed in (1, 2)}
    for seed in (1, 2):  # each an ordinary run at its seed
        assert json.loads((out / f"seed-{seed}" / "config.json").read_text())["train"]["seed"] == seed
        assert f"best validation ({out / f'seed-{seed}'})" in first.output
    assert log_scalars(out / "seed-1")["train/loss"] != log_scalars(out / "seed-2")["train/loss"]
    for extra, message in (
        ((), f"holds the run {out / 'seed-1'}: pass --resume"),  # refused before any seed trains again
        (("--set", "train.seed=4"), "--seeds sets train.seed of each run: leave out --set train.seed"),
        (("--seeds", "1,1"), "--seeds '1,1': give distinct seeds"),
        (("--seeds", "1,-2"), "--seeds '1,-2': 1: Input should be greater than or equal to 0"),
    ):
        refused = run_cli(runner, *train_args(data, out, "--seeds", "1,2", *short, *extra))
        assert refused.exit_code == 2 and message in refused.output, refused.output
    # a command killed before its second seed started: --resume leaves the first and trains the second
    shutil.rmtree(out / "seed-2")
    resumed = run_cli(runner, *train_args(data, out, "--seeds", "1,2", *short, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "its 3 steps (train.max_steps) are done" in resumed.output
    assert (out / "seed-1" / "log.jsonl").read_text() == logs[1]
    again = [json.loads(line) for line in (out / "seed-2" / "log.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in logs[2].splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == pytest.approx(
        [r["loss"] for r in before if "loss" in r], abs=1e-5
    )
    # the report: runs that differ in the seed alone together, another recipe apart
    other = tmp_path / "other"
    trained_other = run_cli(runner, *train_args(data, other, *short, "--set", "train.lr=1e-3"))
    assert trained_other.exit_code == 0, trained_other.output
    run = out / "seed-1"
    report = run_cli(
        runner, "report", "--run", run, "--store", data.val, "--split", "val", "--compare", out,
        "--compare", other,
    )  # fmt: skip
    assert report.exit_code == 0, report.output
    result = json.loads((run / "report.json").read_text())
    rsums = [a["rsum"] for a in result["ablation"]]  # seed-1 (the run), seed-2 (from the folder), other
    assert [a["run"] for a in result["ablation"]] == [str(run), str(out / "seed-2"), str(other)]
    seeds, alone = result["seeds"]
    other_seed = json.loads((other / "config.json").read_text())["train"]["seed"]  # the recipe's own
    assert (seeds["seeds"], alone["seeds"]) == ([1, 2], [other_seed])
    assert seeds["mean"]["rsum"] == pytest.approx(np.mean(rsums[:2]))
    assert seeds["std"]["rsum"] == pytest.approx(np.std(rsums[:2], ddof=1))
    assert seeds["rsum_spread"] == pytest.approx(abs(rsums[0] - rsums[1]))
    i2t = [a["i2t"]["r1"] for a in result["ablation"][:2]]
    assert seeds["mean"]["i2t"]["r1"] == pytest.approx(np.mean(i2t))
    # the same name for two recipes: the setting that tells them apart is appended
    assert (seeds["label"], alone["label"]) == ("USER-SGE, train.lr=0.002", "USER-SGE, train.lr=0.001")
    row = f"| USER-SGE, train.lr=0.002 | 1, 2 | {np.mean(i2t):.1f} ± {np.std(i2t, ddof=1):.1f} |"
    assert row in (run / "report.md").read_text() and row in report.output
    assert f"| {alone['mean']['rsum']:.1f} | — |" in (run / "report.md").read_text()
