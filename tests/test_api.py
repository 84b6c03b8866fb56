"""The Python API (userpipe/api.py): the README's example run as written, and the API against the commands
it stands for."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kit import run_cli

pytestmark = pytest.mark.slow  # the session's tiny run

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    """The README's one ```python block (its "From Python" section)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "the README holds one Python example"
    return blocks[0]


@pytest.fixture
def demo_layout(runner, trained, tmp_path) -> Path:
    """A folder laid out as after `just demo` (data/demo.zarr, runs/demo, runs/demo/index), from the tiny run
    and its 16-image gallery (split 'test')."""
    shutil.copytree(trained.gallery, tmp_path / "data" / "demo.zarr")
    run = tmp_path / "runs" / "demo"
    shutil.copytree(trained.run, run, symlinks=True)
    store = tmp_path / "data" / "demo.zarr"
    result = run_cli(runner, "index", "--run", run, "--store", store, "--out", run / "index")
    assert result.exit_code == 0, result.output
    return tmp_path


def test_the_readme_example_runs_as_written(demo_layout):
    """In a fresh interpreter, in the folder `just demo` leaves: it prints what it says it prints."""
    done = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=demo_layout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "16 test images"
    assert re.fullmatch(r"best match: img\d+", lines[1]) and re.fullmatch(r"RSUM: [0-9.]+", lines[2])
    assert [line.split()[0] for line in lines[3:]] == ["1", "2", "3"]


def test_the_api_gives_what_the_commands_print(runner, demo_layout):
    """load_run().evaluate equals `userpipe eval --json`; open_index().search equals `userpipe search --json`;
    encode_images/encode_texts rank as eval ranks."""
    import userpipe

    store, run_dir = demo_layout / "data" / "demo.zarr", demo_layout / "runs" / "demo"
    run = userpipe.load_run(run_dir)
    printed = json.loads(run_cli(runner, "eval", "--run", run_dir, "--store", store, "--json").stdout)
    assert run.evaluate(store, "test") == printed  # the same numbers, exactly
    ids, images = run.encode_images(userpipe.open_store(store), "test")
    split = run.encode_split(store, "test")
    assert ids == split.image_ids and torch.allclose(images, split.images)
    assert torch.allclose(run.encode_texts(split.caption_texts[:3]), split.captions[:3], atol=1e-6)
    query = split.caption_texts[4]
    hits = userpipe.open_index(run_dir / "index").search(query, k=3)
    searched = json.loads(
        run_cli(runner, "search", query, "--index", run_dir / "index", "-k", "3", "--json").stdout
    )
    assert [(h.image_id, h.correct) for h in hits] == [(r["id"], r["correct"]) for r in searched]
    assert [h.score for h in hits] == pytest.approx([r["score"] for r in searched])


def test_the_api_refuses_in_one_line_as_the_commands_do(demo_layout, tmp_path):
    import userpipe
    from userpipe.schemas.errors import InputError

    with pytest.raises(InputError, match="no Zarr store"):
        userpipe.open_store(tmp_path / "nothing.zarr")
    with pytest.raises(InputError, match="no checkpoint at"):
        userpipe.load_run(tmp_path / "nothing")
    index = userpipe.open_index(demo_layout / "runs" / "demo" / "index")
    with pytest.raises(InputError, match="the query is empty"):
        index.search("  ")
    with pytest.raises(InputError, match="has no split 'train'"):
        userpipe.open_store(demo_layout / "data" / "demo.zarr").captions("train")
