"""The one error boundary: expected failures are one line and exit 2; bugs keep their traceback."""

import errno
from pathlib import Path

import pytest
from kit import run_cli

from userpipe.pipeline.synthetic import write_synthetic_store
from userpipe.schemas.errors import InputError


def test_an_input_error_is_always_one_line():
    assert (
        str(InputError("config c.yaml is not valid YAML (found\n  a tab\r\n here)"))
        == "config c.yaml is not valid YAML (found a tab here)"
    )


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.EACCES, "Permission denied"),
        (errno.ENOSPC, "No space left"),
        (errno.EROFS, "Read-only file system"),
    ],
)
def test_os_errors_of_the_users_paths_are_one_line_exit_2(runner, tmp_path: Path, monkeypatch, code, words):
    from userpipe.schemas.outputs import Output

    store = write_synthetic_store(tmp_path / "s.zarr", 6)
    out = tmp_path / "shards"

    def refuse(output, files, at=None):
        raise OSError(code, __import__("os").strerror(code), str(output.given))

    monkeypatch.setattr(Output, "create", refuse)  # the first write of `shard`
    result = run_cli(runner, "shard", "--store", store, "--out", out, "--workers", "1")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {out}: {words}" + ("" if code != errno.ENOSPC else " on device")
    ]


def test_a_bug_keeps_its_traceback(runner, tmp_path: Path, monkeypatch):
    import userpipe.pipeline.shard as shard

    store = write_synthetic_store(tmp_path / "s.zarr", 6)
    monkeypatch.setattr(shard, "plan_shards", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # not turned into "error: ..." (CliRunner re-raises it)
        run_cli(runner, "shard", "--store", store, "--out", tmp_path / "shards", "--workers", "1")
