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
from conftest import TINY, run_cli

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
    return ["", str(area / "missing"), str(area / "notes.txt"), str(area / "folder"), str(area / "empty")]


@pytest.fixture(scope="module")
def bases(trained, tmp_path_factory) -> dict:
    """A working invocation of every command (outputs under `area`, inputs the session's run)."""
    tmp = trained["tmp"]
    area = tmp_path_factory.mktemp("contract")
    (area / "notes.txt").write_text("three years of field notes\n")
    (area / "folder").mkdir()
    (area / "folder" / "a.txt").write_text("not userpipe's")
    (area / "empty").write_bytes(b"")
    config = area / "one-epoch.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {**TINY["model"], "text_layers": 1}, "train": {**TINY["train"], "epochs": 1}}
        )
    )
    report_run = area / "report-run"
    shutil.copytree(trained["run"], report_run, symlinks=True)
    demo = ["--dataset", "demo", "--images", "6", "--root", area / "demo-images", "--regions", "grid"]
    return {
        "area": area,
        "extract": ["extract", *demo, "--num-regions", "2", "--image-size", "32", "--clip", "none",
                    "--out", area / "out.zarr", "--workers", "1"],
        "info": ["info", trained["val"]],
        "verify": ["verify", trained["val"]],
        "shard": ["shard", "--store", tmp / "train.zarr", "--out", area / "shards", "--workers", "1"],
        "export": ["export", "--store", trained["val"], "--split", "val", "--format", "npz", "--out",
                   area / "export"],
        "train": ["train", "--shards", tmp / "shards", "--val-store", trained["val"], "--config", config,
                  "--out", area / "run"],
        "eval": ["eval", "--store", trained["val"], "--split", "val", "--run", trained["run"]],
        "index": ["index", "--store", trained["gallery"], "--split", "test", "--run", trained["run"], "--out",
                  area / "index"],
        "search": ["search", "a red circle", "--index", trained["index"], "--run", trained["run"]],
        "report": ["report", "--run", report_run, "--store", trained["val"], "--split", "val"],
    }  # fmt: skip


def state_of(*folders: Path) -> dict:
    """Every entry under the folders, with what a write would change."""
    return {
        str(p): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
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
        watched = (area, trained["tmp"])
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
