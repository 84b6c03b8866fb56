"""`userpipe info`'s table: what a newcomer reads first about a store."""

from kit import run_cli

from userpipe.pipeline.synthetic import write_synthetic_store


def test_info_names_the_global_encoder_and_cuts_no_shape(runner, tmp_path, monkeypatch):
    store = write_synthetic_store(
        tmp_path / "s.zarr", 1200, num_regions=36, clip_dim=1280, captions_per_image=1, chunk_size=600
    )
    monkeypatch.setenv("COLUMNS", "40")  # rich's width off a terminal: far narrower than the table
    result = run_cli(runner, "info", store)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "train" in line and "│" in line]
    assert len(rows) == 1, result.stdout  # one line: the shapes neither cut nor folded
    assert all(shape in rows[0] for shape in ("1200x36x8", "1200x1280", "1200x1280")), rows
    cells = [cell.strip() for cell in rows[0].strip("│ ").split("│")]
    assert cells == ["train", "1200", "1200", "0", "1200x36x8", "1200x1280", "1200x1280"]
    assert "…" not in result.stdout
    header = result.stdout[result.stdout.index("┏") : result.stdout.index("┡")]
    # the store's arrays are named clip_* whatever the encoder: the table names what it is
    assert "clip_" not in header and "global image" in header and "global text" in header
    assert header.count("(open_clip)") == 2
