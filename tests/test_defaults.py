"""Options left at their defaults: a command run with only what it requires resolves every default as its
help says (the contract tests always name the outputs, so a default path is checked here)."""

import re
from pathlib import Path

from typer.testing import CliRunner

from userpipe.cli import app
from userpipe.pipeline.synthetic import write_synthetic_store


def test_shard_without_out_writes_beside_the_store(tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 6)
    args = ["shard", "--store", str(store), "--workers", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s-shards" / "train" / "manifest.json").is_file()


def test_shard_prints_plain_progress_lines_when_its_output_is_not_a_terminal(tmp_path: Path, monkeypatch):
    """Dask stages (extract, shard) share run_tasks: off a terminal, where rich's bar shows nothing until the
    end, a plain line every USERPIPE_PROGRESS_SECONDS (as training prints its own)."""
    monkeypatch.setenv("USERPIPE_PROGRESS_SECONDS", "0")
    store = write_synthetic_store(tmp_path / "s.zarr", 12)
    out = tmp_path / "out"
    args = ["shard", "--store", str(store), "--out", str(out), "--max-count", "4", "--workers", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if re.match(r"samples \d", line)]  # not the bar
    assert [line.split(",")[0] for line in lines] == ["samples 4/12", "samples 8/12", "samples 12/12"]
