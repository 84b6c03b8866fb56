"""The bad-input contract of every command, generated from its Typer signature so that an option is covered
the day it is added (docs/reference.md, "Adding a command or an option"):

- every option (and argument) given a value of the wrong type, out of range, empty, or naming a missing
  path, a folder or a file that is not what it expects: the command either refuses in one line (exit 2) and
  writes nothing, or runs (exit 0); never a traceback, never a write outside the outputs it claims
  (conftest.py checks every write);
- every pair of options that exclude each other, and every option given without the one it needs: one
  line naming both, exit 2, nothing written.

Each command runs from a working base invocation on the artefacts of the session's tiny run, with the bad
value given last (click keeps the last value of an option).
"""

from __future__ import annotations

import itertools
import shutil
import typing
from pathlib import Path

import pytest
import typer.main
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kit import Chain, run_cli, tiny_recipe

from userpipe.cli import app

COMMANDS = typer.main.get_command(app).commands


def signature(name: str) -> list[tuple[str, str, type]]:
    """(parameter name, how it is given: '--flag' or '' for an argument, its Python type) of a command, flags
    (on/off switches) left out: they have no bad value."""
    callback = COMMANDS[name].callback
    hints = typing.get_type_hints(callback)
    found = []
    for param in COMMANDS[name].params:
        if getattr(param, "is_flag", False):
            continue
        flag = param.opts[0] if param.param_type_name == "option" else ""
        kind = hints[param.name]
        found.append(
            (param.name, flag, typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind)
        )
    return found


def bad_values(kind: type, area: Path) -> list[str]:
    if kind is bool:
        return []
    if kind is int:
        return ["x", "-1", "0", "", "1.5", str(2**70)]
    if kind is float:
        return ["x", "nan", "inf", "-1", "0", ""]
    missing, notes, folder, empty = (str(area / name) for name in ("missing", "notes.txt", "folder", "empty"))
    return ["", missing, notes, folder, empty, "nosuch://bucket/x"]  # a URL no filesystem serves


@pytest.fixture(scope="module")
def bases(trained, tmp_path_factory) -> dict:
    """A working invocation of every command (outputs under `area`, inputs the session's run)."""
    area = tmp_path_factory.mktemp("contract")
    (area / "notes.txt").write_text("three years of field notes\n")
    (area / "folder").mkdir()
    (area / "folder" / "a.txt").write_text("not userpipe's")
    (area / "empty").write_bytes(b"")
    config = area / "one-epoch.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe({"train.epochs": 1})))
    report_run = area / "report-run"
    shutil.copytree(trained.run, report_run, symlinks=True)
    demo = ["--dataset", "demo", "--images", "6", "--root", area / "demo-images", "--regions", "grid"]
    return {
        "area": area,
        "extract": ["extract", *demo, "--num-regions", "2", "--image-size", "32", "--clip", "none",
                    "--out", area / "out.zarr", "--workers", "1"],
        "info": ["info", trained.val],
        "verify": ["verify", trained.val],
        "shard": ["shard", "--store", trained.train_store, "--out", area / "shards", "--workers", "1"],
        "export": ["export", "--store", trained.val, "--split", "val", "--format", "npz", "--out",
                   area / "export"],
        "train": ["train", "--shards", trained.shards, "--val-store", trained.val, "--config", config,
                  "--out", area / "run"],
        "eval": ["eval", "--store", trained.val, "--split", "val", "--run", trained.run],
        "index": ["index", "--store", trained.gallery, "--split", "test", "--run", trained.run, "--out",
                  area / "index"],
        "search": ["search", "a red circle", "--index", trained.index, "--run", trained.run],
        "report": ["report", "--run", report_run, "--store", trained.val, "--split", "val"],
    }  # fmt: skip


def state_of(*folders: Path) -> dict:
    """Every entry under the folders, with what a write would change (a folder's own time changes with a
    lock file made and removed beside an output: not a write that stays)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for folder in folders
        for p in [folder, *folder.rglob("*")]
        if p.exists()
    }


def outcome(result, before: dict, after: dict, case: str) -> str:
    """'refused' (one line, exit 2, nothing written) or 'ran' (exit 0); anything else fails the test."""
    if result.exit_code == 0:
        return "ran"
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}:\n{result.output}"
    assert after == before, (
        f"{case}: refused, yet wrote {sorted(set(after.items()) ^ set(before.items()))[:4]}"
    )
    return "refused"


def remove_outputs(area: Path) -> None:
    """What a command that ran wrote into the area: each case starts from the same state."""
    for name in ("out.zarr", "demo-images", "shards", "export", "run", "index", "search.html", "x"):
        for entry in (area / name, area / f"{name}.npz"):
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    for stray in area.glob(".*"):
        shutil.rmtree(stray) if stray.is_dir() else stray.unlink()


CASES = [(name, param, flag, kind) for name in COMMANDS for param, flag, kind in signature(name)]


@pytest.mark.parametrize(
    ("command", "param", "flag", "kind"), CASES, ids=[f"{c}{f or ':' + p}" for c, p, f, _ in CASES]
)
def test_every_option_refuses_a_bad_value_in_one_line_or_runs(
    runner, bases, trained, command, param, flag, kind
):
    area = bases["area"]
    base = [str(a) for a in bases[command]]
    seen = {}
    for value in bad_values(kind, area):
        # an argument (each command has one at most, first in its base) is replaced
        args = [*base, flag, value] if flag else [base[0], value, *base[2:]]
        watched = (area, trained.tmp)
        before = state_of(*watched)
        result = run_cli(runner, *args)
        seen[value] = outcome(
            result, before, state_of(*watched), f"userpipe {command} {flag or param}={value!r}"
        )
        remove_outputs(area)
    assert seen, f"{command} {flag or param}: no bad value generated"


def option_rules(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """('excludes', (a, b)) for each pair of a group that excludes each other, ('requires', (a, b)) for an
    option a that needs b: as the command declared them (userpipe/cli.py `command`)."""
    excludes, requires = COMMANDS[name].callback.option_rules
    pairs = [("excludes", pair) for group in excludes for pair in itertools.combinations(group, 2)]
    return pairs + [("requires", pair) for pair in requires.items()]


RULES = [(name, *rule) for name in COMMANDS for rule in option_rules(name)]


@pytest.mark.parametrize(
    ("command", "rule", "pair"), RULES, ids=[f"{c}:{r}:{'+'.join(p)}" for c, r, p in RULES]
)
def test_options_that_exclude_each_other_or_need_another_are_refused(runner, tmp_path, command, rule, pair):
    """Both given (excludes) or the first alone (requires): one line naming both options, nothing written."""
    params = {param.name: param for param in COMMANDS[command].params}
    kinds = {name: kind for name, _, kind in signature(command)}
    args = [command]
    for param in params.values():  # required ones get any value: the rules are checked first
        if param.required:
            args += ["x"] if param.param_type_name == "argument" else [param.opts[0], str(tmp_path / "given")]
    for name in pair if rule == "excludes" else pair[:1]:
        if name not in kinds:  # an on/off flag
            args.append(params[name].opts[0])
        else:
            args += [params[name].opts[0], "1" if kinds[name] in (int, float) else str(tmp_path / name)]
    before = state_of(tmp_path)
    result = run_cli(runner, *args)
    assert outcome(result, before, state_of(tmp_path), " ".join(args)) == "refused"
    assert all(params[name].opts[0] in result.output for name in pair), result.output


# --------------------------------------------------------------------------- every field of a run's config


def _bounds(field) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low included, high included) from a field's constraints."""
    low = high = None
    low_in = high_in = True
    for rule in field.metadata:
        for name, inclusive in (("gt", False), ("ge", True), ("lt", False), ("le", True)):
            if getattr(rule, name, None) is not None:
                if name in ("gt", "ge"):
                    low, low_in = getattr(rule, name), inclusive
                else:
                    high, high_in = getattr(rule, name), inclusive
    return low, high, low_in, high_in


def field_values(field, preset) -> tuple[list, list]:
    """(valid values near the preset, invalid values), from the field's type and range alone: a field added
    to the schema is drawn the day it is added. Valid values stay near the preset, so a run stays small."""
    kind = field.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = type(None) in typing.get_args(kind)
    base = args[0] if optional and len(args) == 1 else kind
    low, high, low_in, high_in = _bounds(field)
    below = [low - 1 if low_in else low] if low is not None else []
    above = [high + 1 if high_in else high] if high is not None else []
    valid = [None] if optional else []
    if typing.get_origin(base) is typing.Literal:
        return [*typing.get_args(base), *valid], ["bogus", 3]
    if base is bool:
        return [True, False], ["maybe", [1]]
    if base is int:
        start = preset if isinstance(preset, int) else (low + (0 if low_in else 1) if low is not None else 1)
        near = [start + step for step in (-1, 0, 1)]
        inside = [v for v in near if (low is None or v > low or low_in and v == low)]
        inside = [v for v in inside if (high is None or v < high or high_in and v == high)]
        return inside + valid, [*below, *above, 1.5, "x", 2**70]
    if base is float:
        start = preset if isinstance(preset, float | int) and preset else 0.5
        near = [start * factor for factor in (0.5, 1, 2)]
        inside = [v for v in near if (low is None or v > low or low_in and v == low)]
        inside = [v for v in inside if (high is None or v < high or high_in and v == high)]
        return inside + valid, [*below, *above, float("nan"), float("inf"), "x"]
    if typing.get_origin(base) is tuple:
        return [(), *valid], [[-1], [0], ["x"], 5]
    return [preset, *valid], ["", "no/such/model", 7]  # a text (a model name): only the preset is known


def run_config_fields() -> list[tuple[str, str, object]]:
    from userpipe.schemas.run import ModelConfig, TrainRecipe

    return [
        (section, name, field)
        for section, model in (("model", ModelConfig), ("train", TrainRecipe))
        for name, field in model.model_fields.items()
        if name != "schema_version"
    ]


# the tiny recipe for 16 pairs: one epoch of two steps
SMALL_OVERRIDES = {"model.queue_size": 16, "train.epochs": 1}
SMALL = tiny_recipe(SMALL_OVERRIDES)


@pytest.fixture(scope="module")
def small_run(chain) -> Chain:
    """Shards of 16 pairs (two steps of the tiny recipe's batch of 8), a validation store, and the recipe."""
    return chain(
        "small-run", images=16, captions_per_image=1, shard_count=None, config_overrides=SMALL_OVERRIDES
    )


@st.composite
def config_overrides(draw) -> dict[str, object]:
    """For every field of the run configuration: kept (most), a valid value near the preset, or an invalid
    one; so that about half the drawn configurations are valid as a whole."""
    preset = SMALL
    chosen = {}
    for section, name, field in run_config_fields():
        valid, invalid = field_values(field, preset[section].get(name, field.default))
        roll = draw(st.integers(0, 99))
        if roll < 2:
            chosen[f"{section}.{name}"] = draw(st.sampled_from(invalid))
        elif roll < 12:
            chosen[f"{section}.{name}"] = draw(st.sampled_from(valid))
    return chosen


def as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # the same cases every run: CI stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=config_overrides())
@example(overrides={"model.gpo_hidden": 0})  # the values a user trial found crashing after the run folder
@example(overrides={"train.seed": -1})
@example(overrides={"model.num_regions": 10})
@example(overrides={"train.backend": "triton"})
@example(overrides={"train.batch_size": 1})
@example(overrides={"train.lr_decay_epochs": [-1]})
@example(overrides={"model.queue_size": 17})
@example(overrides={"model.max_tokens": 100000})
@example(overrides={"model.text_layers": 7})
@example(overrides={"model.gpo_pe_dim": 31})  # found by this test: sines and cosines need an even width
@example(overrides={"train.max_steps": 1})
@example(overrides={"train.mu_start": 20})  # a warm-up without its length
@example(overrides={"train.mu_start": 20, "train.mu_warmup_steps": 2})
@example(overrides={"train.align_start": True})  # needs GPO's uniform start
@example(overrides={"train.align_start": True, "model.gpo_init": "uniform"})
def test_every_config_field_is_refused_in_one_line_or_trains(runner, small_run, overrides):
    out = small_run.tmp / "run"
    args = ["train", "--shards", small_run.shards, "--val-store", small_run.val]
    args += ["--config", small_run.config, "--out", out]
    for key, value in overrides.items():
        args += ["--set", f"{key}={as_yaml(value)}"]
    before = state_of(small_run.tmp)
    result = run_cli(runner, *args)
    try:
        verdict = outcome(result, before, state_of(small_run.tmp), f"train {overrides}")
        if verdict == "ran":
            steps = [line for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
            assert steps, f"{overrides}: exit 0 without a training step"
    finally:
        shutil.rmtree(out, ignore_errors=True)
