"""Options left at their defaults: a command run with only what it requires resolves every default as its
help says (the contract tests always name the outputs, so a default path is checked here)."""

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
