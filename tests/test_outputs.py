"""Nothing lost: userpipe writes only into new or empty folders or its own output of the same kind, never
onto an input, and replaces its own output atomically (docs/reference.md, "What userpipe may write")."""

import json
import os
from pathlib import Path

import pytest
from kit import Chain, karpathy_record, run_cli, write_image, write_json

from userpipe.pipeline.synthetic import write_synthetic_store


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def users_folder(path: Path) -> Path:
    (path / "photos").mkdir(parents=True)
    (path / "notes.txt").write_text("three years of field notes")
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return path


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_demo_refuses_a_root_that_holds_the_users_files(runner, tmp_path: Path):
    mine = users_folder(tmp_path / "mydata")
    before = tree_bytes(mine)
    result = run_cli(
        runner,
        "extract",
        "--dataset",
        "demo",
        "--root",
        mine,
        "--images",
        "6",
        "--out",
        tmp_path / "d.zarr",
        "--workers",
        "1",
    )
    assert_refused(result, "--root", "not the userpipe demo")
    assert tree_bytes(mine) == before
    assert not (tmp_path / "d.zarr").exists()


def test_demo_replaces_only_its_own_demo(tmp_path: Path):
    from userpipe.pipeline.demo import DEMO_JSON, ensure_demo

    root = tmp_path / "demo"
    ensure_demo(root, images=6)
    ensure_demo(root, images=8)  # userpipe's own demo of another size: replaced whole
    records = json.loads((root / DEMO_JSON).read_text())["images"]
    assert len(records) == 8 and len(list((root / "images").iterdir())) == 8
    assert not list(tmp_path.glob(".demo.*"))


@pytest.mark.parametrize("images, message", [("0", "--images 0"), ("2", "--images 2"), ("-1", "--images -1")])
def test_demo_sizes_below_one_image_per_split_are_refused(runner, tmp_path: Path, images, message):
    result = run_cli(
        runner,
        "extract",
        "--dataset",
        "demo",
        "--root",
        tmp_path / "demo",
        "--images",
        images,
        "--out",
        tmp_path / "d.zarr",
        "--workers",
        "1",
    )
    assert_refused(result, message, "greater than or equal to 3")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "d.zarr").exists()


def karpathy_dataset(root: Path) -> Path:
    records = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        write_image(root / f"{i}.jpg", i)
        records.append(karpathy_record(f"{i}.jpg", split, [f"image {i} caption"], i))
    return write_json(root / "karpathy.json", records)


@pytest.mark.parametrize(
    "out_of, relation",
    [(".", "contains the input"), ("..", "contains the input"), ("features.zarr", "lies inside the input")],
)
def test_extract_output_never_is_contains_or_lies_inside_an_input(runner, tmp_path: Path, out_of, relation):
    data = tmp_path / "d"
    dataset = karpathy_dataset(data)
    before = tree_bytes(tmp_path)
    out = (data / out_of).resolve()
    result = run_cli(
        runner,
        "extract",
        "--dataset",
        dataset,
        "--out",
        out,
        "--overwrite",
        "--regions",
        "grid",
        "--clip",
        "none",
        "--workers",
        "1",
    )
    assert_refused(result, relation)
    assert tree_bytes(tmp_path) == before


def test_extract_refuses_a_foreign_folder_without_suggesting_overwrite(runner, tmp_path: Path):
    dataset = karpathy_dataset(tmp_path / "d")
    mine = users_folder(tmp_path / "results")
    before = tree_bytes(mine)
    for extra in ((), ("--overwrite",)):
        result = run_cli(
            runner,
            "extract",
            "--dataset",
            dataset,
            "--out",
            mine,
            "--regions",
            "grid",
            "--clip",
            "none",
            "--workers",
            "1",
            *extra,
        )
        assert_refused(result, "holds files that are not a userpipe store")
        assert "--overwrite" not in result.output
        assert tree_bytes(mine) == before


def test_shard_onto_its_own_store_is_refused_and_the_store_kept(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 8)
    before = tree_bytes(store)
    for out in (store, store / "shards"):
        result = run_cli(runner, "shard", "--store", store, "--out", out, "--overwrite", "--workers", "1")
        assert_refused(result, "the input")
    assert tree_bytes(store) == before


@pytest.mark.slow
def test_shard_overwrite_replaces_its_own_shards_whole_and_only_them(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 12)
    out = tmp_path / "shards"
    args = ("shard", "--store", store, "--out", out, "--workers", "1")
    assert run_cli(runner, *args, "--max-count", "4").exit_code == 0
    old = tree_bytes(out)
    refused = run_cli(runner, *args, "--max-count", "6")
    assert_refused(refused, "shards of another plan", "--overwrite")
    assert tree_bytes(out) == old
    assert run_cli(runner, *args, "--max-count", "6", "--overwrite").exit_code == 0
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 6, "train-000001.tar": 6}
    assert not list(tmp_path.glob(".shards.*"))
    users_folder(tmp_path / "mine")
    assert_refused(
        run_cli(
            runner, "shard", "--store", store, "--out", tmp_path / "mine", "--overwrite", "--workers", "1"
        ),
        "not userpipe shards",
    )


@pytest.mark.slow
def test_an_interrupted_overwrite_leaves_the_old_store_and_is_resumed(runner, tmp_path: Path, monkeypatch):
    import userpipe.pipeline.extract as extract

    dataset = karpathy_dataset(tmp_path / "d")
    out = tmp_path / "s.zarr"
    args = (
        "extract",
        "--dataset",
        dataset,
        "--out",
        out,
        "--regions",
        "grid",
        "--clip",
        "none",
        "--workers",
        "1",
        "--chunk-size",
        "1",
    )
    assert run_cli(runner, *args, "--num-regions", "4").exit_code == 0
    old = tree_bytes(out)
    real = extract.run_tasks

    def interrupted(client, tasks, console, unit="items"):
        real(client, tasks[:2], console, unit)
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "run_tasks", interrupted)
    result = run_cli(runner, *args, "--num-regions", "2", "--overwrite")
    assert result.exit_code == 130 and "rerun the same command to resume" in result.output
    assert tree_bytes(out) == old  # the old store, untouched, while the new one is half built beside it
    assert (tmp_path / ".s.zarr.replacing").is_dir()
    monkeypatch.setattr(extract, "run_tasks", real)
    result = run_cli(runner, *args, "--num-regions", "2", "--overwrite")
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    assert (
        json.loads((out / "zarr.json").read_text())["attributes"]["userpipe"]["extractor"]["num_regions"] == 2
    )
    assert not list(tmp_path.glob(".s.zarr.*"))


@pytest.fixture(scope="module")
def shards_and_val(chain) -> Chain:
    return chain(
        "outputs",
        images=16,
        captions_per_image=None,
        shard_count=None,
        val_images=6,
        val_seed=2,
        config_overrides={"train.epochs": 1},
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("foreign", "holds files that are not a userpipe run"),
        ("shards", "is the input"),
        ("val-width", "the model takes 8-d regions"),
        ("batch", "fewer pairs than one batch"),
    ],
)
def test_train_refuses_before_writing_anything(runner, shards_and_val, tmp_path: Path, case, message):
    out = tmp_path / "run"
    extra = []
    if case == "foreign":
        users_folder(out)
    elif case == "shards":
        out = shards_and_val.shards
    elif case == "val-width":
        extra = ["--val-store", write_synthetic_store(tmp_path / "wide.zarr", 4, feature_dim=12, split="val")]
    else:
        extra = ["--set", "train.batch_size=1000"]
    before = tree_bytes(out) if out.exists() else None
    result = run_cli(
        runner,
        "train",
        "--shards",
        shards_and_val.shards,
        "--val-store",
        shards_and_val.val,
        "--config",
        shards_and_val.config,
        "--out",
        out,
        *extra,
    )
    assert_refused(result, message)
    assert (tree_bytes(out) if out.exists() else None) == before


@pytest.mark.slow
def test_search_html_never_overwrites_a_file_it_did_not_write(runner, trained, tmp_path: Path):
    page = tmp_path / "thesis.html"
    page.write_text("<html>my thesis draft</html>")
    result = run_cli(
        runner,
        "search",
        "caption 1 of image 2",
        "--index",
        trained.index,
        "--run",
        trained.run,
        "--html",
        page,
    )
    assert_refused(result, "--html", "exists and is not a userpipe search page")
    assert page.read_text() == "<html>my thesis draft</html>"
    ours = tmp_path / "ours.html"
    for _ in range(2):  # its own page is replaced
        result = run_cli(
            runner,
            "search",
            "caption 1 of image 2",
            "--index",
            trained.index,
            "--run",
            trained.run,
            "--html",
            ours,
        )
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["extract", "shard", "train", "index"])
def test_an_output_that_is_a_plain_file_is_refused_and_kept(
    runner, shards_and_val, trained, tmp_path: Path, command
):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    store = write_synthetic_store(tmp_path / "s.zarr", 6)
    args = {
        "extract": (
            "extract",
            "--dataset",
            karpathy_dataset(tmp_path / "d"),
            "--regions",
            "grid",
            "--clip",
            "none",
            "--workers",
            "1",
            "--overwrite",
        ),
        "shard": ("shard", "--store", store, "--workers", "1", "--overwrite"),
        "train": (
            "train",
            "--shards",
            shards_and_val.shards,
            "--val-store",
            shards_and_val.val,
            "--config",
            shards_and_val.config,
        ),
        "index": ("index", "--run", trained.run, "--store", trained.gallery),
    }[command]
    assert_refused(run_cli(runner, *args, "--out", target), "is a file, not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "name, content",
    [
        ("index.json", '{"title": "my site"}'),
        ("manifest.json", '{"name": "my web app", "icons": []}'),
        ("config.json", '{"model": "resnet", "train": {"lr": 0.1}}'),
    ],
)
def test_a_common_file_name_does_not_make_a_folder_userpipes(runner, trained, tmp_path: Path, name, content):
    """Only metadata that validates as userpipe's own marks a folder as its output."""
    mine = users_folder(tmp_path / "site")
    (mine / name).write_text(content)
    before = tree_bytes(mine)
    store = write_synthetic_store(tmp_path / "s.zarr", 6)
    for args in (
        ("index", "--run", trained.run, "--store", trained.gallery),
        ("shard", "--store", store, "--workers", "1", "--overwrite"),
    ):
        assert_refused(run_cli(runner, *args, "--out", mine), "holds files that are not")
    assert tree_bytes(mine) == before


def test_the_working_directory_is_never_an_output(runner, trained, tmp_path: Path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    for out in (".", ".."):
        result = run_cli(runner, "index", "--run", trained.run, "--store", trained.gallery, "--out", out)
        assert_refused(result, "is the working directory or holds it")


@pytest.mark.slow
def test_a_symlinked_output_keeps_its_link_and_the_new_index_lands_in_its_target(
    runner, trained, tmp_path: Path
):
    target, link = tmp_path / "big-disk" / "index", tmp_path / "index"
    target.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # new, then replacing its own
        result = run_cli(runner, "index", "--run", trained.run, "--store", trained.gallery, "--out", link)
        assert result.exit_code == 0, result.output
    assert link.is_symlink() and (target / "index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big-disk", "index"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["index"]


def test_an_error_message_with_brackets_is_printed_as_it_is(runner, tmp_path: Path):
    out = tmp_path / "[run]" / "x"
    out.parent.mkdir()
    out.write_text("mine")
    result = run_cli(runner, "shard", "--store", write_synthetic_store(tmp_path / "s.zarr", 6), "--out", out)
    assert_refused(result, f"{out} is a file")


# -------------------------------------------------------------------------- the switch, recovery and the lock


def folder_with(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "content.txt").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_in_puts_the_new_output_in_place_whole(tmp_path: Path, monkeypatch, exchange):
    from userpipe.schemas import outputs

    if not exchange:  # a filesystem without RENAME_EXCHANGE (NFS)
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = folder_with(tmp_path / "out", "old")
    outputs._swap_in(folder_with(tmp_path / ".out.new-1", "new"), out)
    assert (out / "content.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]


def test_recover_undoes_a_swap_killed_between_its_two_renames_and_removes_unfinished_builds(tmp_path: Path):
    from userpipe.schemas.outputs import _recover as recover

    folder_with(tmp_path / ".out.old-abc", "old")  # killed after `out -> .out.old-abc`, before `new -> out`
    folder_with(tmp_path / ".out.new-def", "half-built")
    recover(tmp_path / "out")
    assert (tmp_path / "out" / "content.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    folder_with(tmp_path / ".out.old-ghi", "old")  # killed after both renames, before the removal
    recover(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_writer_lock_excludes_a_second_writer_and_dies_with_its_holder(tmp_path: Path):
    import subprocess
    import sys

    from userpipe.schemas.errors import InputError
    from userpipe.schemas.outputs import RUN, claim

    out = tmp_path / "out"
    with claim(out, RUN):
        with pytest.raises(InputError, match=rf"--out {out} is being written by process {os.getpid()}"):
            with claim(out, RUN):
                pass
    assert not (tmp_path / ".out.lock").exists()
    # a holder killed with SIGKILL: its lock file stays, its lock does not
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from userpipe.schemas.outputs import RUN, claim\n"
            f"with claim(__import__('pathlib').Path({str(out)!r}), RUN):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(InputError, match=f"process {holder.pid}"):
        with claim(out, RUN):
            pass
    holder.kill()
    holder.wait()
    assert (tmp_path / ".out.lock").exists()
    with claim(out, RUN):
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())


# -------------------------------------------------------------------------- the one protocol: claim


def test_a_write_outside_every_claim_is_caught_by_the_tests_guard(tmp_path: Path, unclaimed_writes):
    """conftest.py's audit hook: what a running command writes must lie in an output it claimed."""
    import sys

    from userpipe.schemas.outputs import RUN, claim

    sys.audit("userpipe.command", "a-command", True)
    try:
        with claim(tmp_path / "run", RUN) as output:
            output.create({"config.json": "{}"})
            (tmp_path / "run" / "log.jsonl").write_text("{}\n")  # inside the claimed output: fine
        (tmp_path / "stray.txt").write_text("not in any claim")
    finally:
        sys.audit("userpipe.command", "a-command", False)
    caught = list(unclaimed_writes)
    unclaimed_writes.clear()
    assert caught == [f"userpipe a-command: open {tmp_path.resolve() / 'stray.txt'}"]


def test_a_claim_refused_or_failed_leaves_no_folder_it_made(tmp_path: Path):
    from userpipe.schemas.errors import InputError
    from userpipe.schemas.outputs import INDEX, claim

    out = tmp_path / "a" / "b" / "index"
    with pytest.raises(InputError, match="lies inside the input"):
        with claim(out, INDEX, [tmp_path / "a"]):
            pass
    with pytest.raises(RuntimeError):
        with claim(out, INDEX) as output, output.built():
            raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_two_exports_to_one_out_cannot_both_write(runner, tmp_path: Path):
    """export claims its output like every writer: a second export to the same --out is refused while the
    first holds it, and an existing --out is never replaced."""
    from userpipe.schemas.outputs import EXPORT_FOLDER, claim

    store = write_synthetic_store(tmp_path / "s.zarr", 4, seed=1, split="val")
    out = tmp_path / "exported"
    with claim(out, EXPORT_FOLDER):  # the first export, still writing
        result = run_cli(
            runner, "export", "--store", store, "--split", "val", "--format", "npz", "--out", out
        )
    assert_refused(result, f"--out {out} is being written by process")
    assert not out.exists()
    assert (
        run_cli(
            runner, "export", "--store", store, "--split", "val", "--format", "npz", "--out", out
        ).exit_code
        == 0
    )
    before = tree_bytes(out)
    again = run_cli(runner, "export", "--store", store, "--split", "val", "--format", "npz", "--out", out)
    assert_refused(again, f"--out {out} exists; export writes only a new folder")
    assert tree_bytes(out) == before
    inside = run_cli(
        runner, "export", "--store", store, "--split", "val", "--format", "tsv", "--out", store / "x.tsv"
    )
    assert_refused(inside, "lies inside the input")
    assert not (store / "x.tsv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "shard", "train", "index"])
def test_an_output_the_disk_cannot_hold_is_refused_before_the_work(
    runner, trained, tmp_path: Path, monkeypatch, command
):
    """Sizes known in advance (a new store, the shards, a run's checkpoint, an index's vectors) are compared
    with the free space first: refused in one line, nothing written, rather than after hours of work."""
    from userpipe.schemas import outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda path: 1000)
    out = tmp_path / "out"
    args = {
        "extract": ("extract", "--dataset", "demo", "--images", "6", "--root", tmp_path / "demo", "--regions",
                    "grid", "--num-regions", "2", "--image-size", "32", "--clip", "none", "--workers", "1"),
        "shard": ("shard", "--store", trained.train_store, "--workers", "1"),
        "train": ("train", "--shards", trained.shards, "--val-store", trained.val, "--config",
                  trained.config),
        "index": ("index", "--run", trained.run, "--store", trained.gallery, "--split", "test"),
    }[command]  # fmt: skip
    result = run_cli(runner, *args, "--out", out)
    assert_refused(result, "no space left: the write needs about", "1.0 kB are free there")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
