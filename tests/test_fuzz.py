"""Bad input, generated rather than listed: every reader either accepts its input or refuses it with
InputError (one line at the command line, exit 2), and damaged artefacts are refused the same way.

Readers are fuzzed directly (fast); the command line is fuzzed on the artefacts userpipe writes (store
metadata, shard manifests, checkpoints, indexes, logs), with bytes cut or flipped. The number of
generated cases per test is `max_examples` below (`HYPOTHESIS_PROFILE=thorough` for ten times more).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from kit import run_cli, tiny_recipe
from typer.testing import CliRunner

from userpipe.schemas.errors import InputError

# default: the same examples every run (CI stays reproducible); thorough: new random ones each time
settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
some_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


def one_line_refusal(exc: InputError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message


# --------------------------------------------------------------------------- Karpathy JSON

VALID_RECORD = {
    "filename": "a.jpg",
    "filepath": "imgs",
    "split": "train",
    "cocoid": 7,
    "imgid": 0,
    "sentences": [{"raw": "a cat", "tokens": ["a", "cat"]}],
    "boxes": [[1, 2, 30, 40]],
}


@st.composite
def karpathy_documents(draw) -> bytes:
    """A valid file with one part replaced, removed or mangled, or arbitrary JSON, or cut short."""
    records = [json.loads(json.dumps(VALID_RECORD)) for _ in range(draw(st.integers(1, 3)))]
    for i, record in enumerate(records):
        record["filename"], record["cocoid"] = f"{i}.jpg", i
    record = draw(st.sampled_from(records))
    field = draw(st.sampled_from(sorted(VALID_RECORD)))
    action = draw(st.sampled_from(["replace", "remove", "sentence", "box", "whole", "cut"]))
    document = {"images": records, "dataset": "coco"}
    if action == "replace":
        record[field] = draw(json_values)
    elif action == "remove":
        record.pop(field)
    elif action == "sentence":
        record["sentences"][0][draw(st.sampled_from(["raw", "tokens"]))] = draw(json_values | some_text)
    elif action == "box":
        record["boxes"] = draw(st.lists(st.lists(json_values | st.floats(-10, 100), max_size=5), max_size=3))
    elif action == "whole":
        document = draw(json_values)
    text = json.dumps(document).encode()
    if action == "cut":
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


@given(karpathy_documents())
def test_karpathy_reader_accepts_or_refuses_in_one_line(tmp_path_factory, document: bytes):
    from userpipe.pipeline.datasets import read_karpathy_json

    path = tmp_path_factory.mktemp("karpathy") / "d.json"
    path.write_bytes(document)
    try:
        index = read_karpathy_json(
            path, name="d", image_root=path.parent, uses_filepath=True, max_captions=None
        )
    except InputError as exc:
        one_line_refusal(exc)
        return
    for records in index.splits.values():  # what was accepted is what the contract says
        for r in records:
            assert r.captions and all(isinstance(c, str) and c for c in r.captions)
            assert r.boxes is None or all(len(b) == 4 and b[0] < b[2] and b[1] < b[3] for b in r.boxes)


# --------------------------------------------------------------------------- SCAN precomp


@st.composite
def precomp_folders(draw):
    n = draw(st.integers(0, 3))
    captions = draw(st.integers(0, 12))
    ids = draw(st.integers(0, 12))
    lines = draw(
        st.lists(
            st.sampled_from(["a caption", "", "   ", "one more caption"]),
            min_size=captions,
            max_size=captions,
        )
    )
    encoding = draw(st.sampled_from(["utf-8", "latin-1-bytes"]))
    features = draw(st.sampled_from(["finite", "nan", "inf", "huge", "int", "2d", "garbage"]))
    return n, lines, ids, encoding, features


def write_precomp_split(folder: Path, n, lines, ids, encoding, features) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shape = (n, 4, 8) if features != "2d" else (n, 8)
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if n and features in ("nan", "inf", "huge"):
        array[0] = {"nan": np.nan, "inf": np.inf, "huge": 1e6}[features]
    if features == "int":
        array = array.astype(np.int32)
    if features == "garbage":
        (folder / "train_ims.npy").write_bytes(b"\x93NUMPY garbage")
    else:
        np.save(folder / "train_ims.npy", array)
    text = "".join(line + "\n" for line in lines)
    (folder / "train_caps.txt").write_bytes(
        text.encode() if encoding == "utf-8" else text.encode() + b"\xff\n"
    )
    (folder / "train_ids.txt").write_text("".join(f"{100 + i}\n" for i in range(ids)))


@given(precomp_folders())
def test_precomp_import_accepts_or_refuses_in_one_line(tmp_path_factory, case):
    from userpipe.pipeline.importers import load_precomp

    folder = tmp_path_factory.mktemp("precomp") / "p"
    write_precomp_split(folder, *case)
    try:
        index, plan = load_precomp(folder, "coco", folder.parent / "nowhere", ("train",))
    except InputError as exc:
        one_line_refusal(exc)
        return
    n, lines, ids, _, _ = case
    records = index.splits["train"]
    assert len(records) == n and len(lines) == 5 * n and ids in (n, 5 * n)
    assert all(len(r.captions) == 5 and all(r.captions) for r in records)
    assert [c for r in records for c in r.captions] == [" ".join(x.split()) for x in lines]


def test_precomp_images_with_non_finite_features_are_flagged_invalid(runner, tmp_path: Path):
    folder = tmp_path / "precomp"
    write_precomp_split(folder, 3, [f"caption {i}" for i in range(15)], 3, "utf-8", "nan")
    np.save(
        folder / "train_ims.npy",
        np.stack([np.full((4, 8), np.nan), np.full((4, 8), 1e6), np.ones((4, 8))]).astype(np.float32),
    )
    result = run_cli(
        runner,
        "extract",
        "--dataset",
        "coco",
        "--root",
        tmp_path / "nowhere",
        "--regions",
        f"precomp:{folder}",
        "--clip",
        "none",
        "--out",
        tmp_path / "p.zarr",
        "--workers",
        "1",
        "--splits",
        "train",
        "--allow-failures",
    )
    assert result.exit_code == 0, result.output
    assert "train: 3 images, 15 captions, 2 invalid" in result.output
    assert "non-finite region features" in result.output


# --------------------------------------------------------------------------- TSV and npz

TSV_NAMES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_NAMES = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
LXMERT_NAMES += ("num_boxes", "boxes", "features")


def b64(values: np.ndarray) -> str:
    return base64.b64encode(values.tobytes()).decode()


PICKLE_RAN = Path(tempfile.gettempdir()) / f"userpipe-fuzz-pickle-ran-{os.getpid()}"


def detection_values(n: int) -> dict[str, np.ndarray]:
    """LXMERT's and MILVLG's per-box fields, as their tools write them."""
    return {
        "objects_id": np.arange(n, dtype=np.int64),
        "objects_conf": np.full(n, 0.5, np.float32),
        "attrs_id": np.arange(n, dtype=np.int64) + 3,
        "attrs_conf": np.full(n, 0.25, np.float32),
    }


@st.composite
def tsv_lines(draw) -> bytes:
    n = draw(st.integers(1, 3))
    layout = draw(st.sampled_from([TSV_NAMES, LXMERT_NAMES]))
    fields = {
        "image_id": "img1",
        "image_w": "96",
        "image_h": "72",
        "num_boxes": str(n),
        "boxes": b64(np.ones((n, 4), np.float32)),
        "features": b64(np.ones((n, 8), np.float32)),
        **{name: b64(values) for name, values in detection_values(n).items()},
    }
    fields |= {"img_id": fields["image_id"], "img_w": fields["image_w"], "img_h": fields["image_h"]}
    field = draw(st.sampled_from(layout))
    mutation = draw(st.sampled_from(["text", "cut", "flip", "drop-field", "negative-id"]))
    if mutation == "text":
        fields[field] = draw(some_text.filter(lambda t: "\t" not in t and "\n" not in t and "\r" not in t))
    elif mutation == "cut":
        fields[field] = fields[field][: draw(st.integers(0, max(0, len(fields[field]) - 1)))]
    elif mutation == "flip":
        value = fields[field]
        at = draw(st.integers(0, max(0, len(value) - 1)))
        fields[field] = value[:at] + draw(st.sampled_from("!*A=/")) + value[at + 1 :]
    elif mutation == "negative-id":
        fields["objects_id"] = b64(np.full(n, draw(st.sampled_from([-1, 2**15, 2**40])), np.int64))
    values = [fields[name] for name in layout]
    if mutation == "drop-field":
        values.pop(layout.index(field))
    return ("\t".join(values) + "\n").encode("utf-8")


@given(tsv_lines())
def test_tsv_lines_are_indexed_or_refused_and_read_or_flagged(tmp_path_factory, line: bytes):
    from userpipe.pipeline.importers import index_tsv
    from userpipe.pipeline.region_kinds import read_imported

    path = tmp_path_factory.mktemp("tsv") / "f.tsv"
    path.write_bytes(line)
    try:
        lookup, dim, detections = index_tsv(str(path))
    except InputError as exc:
        one_line_refusal(exc)
        return
    for ref in lookup.values():
        try:  # a line that passed the index but cannot be read makes its image invalid (ValueError)
            regions = read_imported("tsv", ref, dim, detections)
        except ValueError:
            continue
        k = len(regions.features)
        assert regions.features.shape[1] == dim and len(regions.boxes) == k
        assert (regions.detections is not None) == detections
        if detections:
            assert len(regions.detections.object_id) == len(regions.detections.attribute_conf) == k
            assert (
                regions.detections.object_id >= 0
            ).all() and regions.detections.object_id.dtype == np.int16


@st.composite
def npz_files(draw) -> bytes:
    n = draw(st.integers(0, 3))
    members = {
        "x": np.ones((n, 8), np.float32),
        "bbox": np.ones((n, 4), np.float32),
        "num_bbox": np.array(n),
        "image_h": np.array(72),
        "image_w": np.array(96),
    }
    info = {"image_id": "a", "image_h": 72, "image_w": 96, "num_boxes": n, **detection_values(n)}
    if draw(st.booleans()):  # MILVLG's pickled info dict
        members["info"] = np.array(info, dtype=object)
    action = draw(
        st.sampled_from(["drop", "reshape", "count", "bytes", "cut", "info-key", "info-values", "code"])
    )
    name = draw(st.sampled_from(sorted(members)))
    if action == "drop":
        members.pop(name)
    elif action == "reshape":
        members[name] = np.ones(draw(st.lists(st.integers(0, 3), max_size=3)), np.float32)
    elif action == "count":
        members["num_bbox"] = np.array(draw(st.integers(-2, 5)))
    elif action == "info-key":
        info.pop(draw(st.sampled_from(sorted(detection_values(0)))))
        members["info"] = np.array(info, dtype=object)
    elif action == "info-values":
        info[draw(st.sampled_from(sorted(detection_values(0))))] = draw(
            st.sampled_from([np.zeros(n + 1), np.full(n, -5), np.full(n, 0.5), "text", None])
        )
        members["info"] = np.array(info, dtype=object)
    elif action == "code":  # a pickle that would call a function when loaded
        members["info"] = np.array({**info, "objects_id": Touches(PICKLE_RAN)}, dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    data = buffer.getvalue()
    if action == "bytes":
        return draw(st.binary(max_size=64))
    if action == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


@given(npz_files(), npz_files())
def test_npz_first_file_is_validated_and_others_make_their_image_invalid(tmp_path_factory, first, second):
    from userpipe.pipeline.importers import index_npz
    from userpipe.pipeline.region_kinds import read_imported

    folder = tmp_path_factory.mktemp("npz")
    (folder / "a.npz").write_bytes(first)
    (folder / "b.npz").write_bytes(second)
    try:
        lookup, dim, detections = index_npz(folder)
    except InputError as exc:
        one_line_refusal(exc)
        return
    finally:
        assert not PICKLE_RAN.exists()
    try:
        regions = read_imported("npz", lookup["b"], dim, detections)
    except ValueError:
        return
    finally:
        assert not PICKLE_RAN.exists()
    assert regions.features.shape == (len(regions.boxes), dim)
    if detections:
        assert len(regions.detections.object_id) == len(regions.boxes)


def test_a_code_carrying_npz_info_is_refused_without_running_it(tmp_path: Path):
    from userpipe.pipeline.importers import index_npz

    marker = tmp_path / "ran"
    info = {"objects_id": Touches(marker)}
    np.savez(tmp_path / "a.npz", x=np.ones((1, 8)), bbox=np.ones((1, 4)), num_bbox=1, image_h=2, image_w=2,
             info=np.array(info, dtype=object))  # fmt: skip
    with pytest.raises(InputError, match="its info is not a pickled dict of arrays .*system"):
        index_npz(tmp_path)
    assert not marker.exists()


def npz_with_info(path: Path, info_pickle: bytes, n: int = 2) -> None:
    """An npz as MILVLG's writes it, its `info` member holding these pickle bytes."""
    with zipfile.ZipFile(path, "w") as z:
        arrays = {
            "x": np.ones((n, 8), np.float32),
            "bbox": np.ones((n, 4), np.float32),
            "num_bbox": np.array(n),
        }
        for name, array in {**arrays, "image_h": np.array(72), "image_w": np.array(96)}.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            z.writestr(f"{name}.npy", buffer.getvalue())
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
        z.writestr("info.npy", header.getvalue() + info_pickle)


def test_a_crafted_npz_info_is_an_invalid_image_read_without_building_what_it_describes(tmp_path: Path):
    import pickle

    from userpipe.pipeline.importers import index_npz
    from userpipe.pipeline.region_kinds import read_imported

    nested: list = []
    for _ in range(60):  # 2**60 leaves in a pickle of a few hundred bytes (its lists are shared)
        nested = [nested, nested]
    ids = {"objects_id": nested, "objects_conf": nested, "attrs_id": nested, "attrs_conf": nested}
    crafted = {
        "huge-length": (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"x", "is not a pickled dict"),
        "shared-lists": (
            pickle.dumps(np.array(ids, dtype=object), protocol=4),
            "objects_id is not 2 numbers (list",
        ),
        "float-ids": (
            pickle.dumps(np.array({**ids, **detection_values(2), "objects_id": np.ones(2)}, dtype=object)),
            "objects_id holds values that are not class indices",
        ),
        "2 MiB": (pickle.dumps(np.array({"pad": np.zeros(1 << 18)}, dtype=object)), "not a MILVLG info dict"),
    }
    good = tmp_path / "good"
    good.mkdir()
    npz_with_info(good / "a.npz", pickle.dumps(np.array(detection_values(2), dtype=object)))
    assert index_npz(good)[2]  # the first file has detections, so every file must
    for name, (info, message) in crafted.items():
        npz_with_info(tmp_path / f"{name}.npz", info)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_imported("npz", str(tmp_path / f"{name}.npz"), 8, detections=True)
        first = tmp_path / name
        first.mkdir()
        (tmp_path / f"{name}.npz").rename(first / "a.npz")
        with pytest.raises(InputError, match="the first .npz") as refused:
            index_npz(first)
        one_line_refusal(refused.value)
    # a source whose first file has no detections never reads another file's info
    npz_with_info(tmp_path / "later.npz", crafted["huge-length"][0])
    assert read_imported("npz", str(tmp_path / "later.npz"), 8, detections=False).detections is None


class Touches:
    """Pickles as a shell command that creates `path`: an unpickler that builds it runs code from the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# --------------------------------------------------------------------------- run configs and --set


@given(st.one_of(json_values.map(json.dumps), some_text), st.lists(some_text, max_size=3))
def test_run_configs_and_overrides_load_or_refuse_in_one_line(tmp_path_factory, config_text, overrides):
    from userpipe.trainer.config import load_run_config, parse_overrides

    path = tmp_path_factory.mktemp("config") / "c.yaml"
    path.write_text(config_text)
    try:
        load_run_config(str(path), parse_overrides(overrides))
    except InputError as exc:
        one_line_refusal(exc)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["train.lr", "train", "model.embed_dim", "train.lr.x", "x", ""]),
            st.sampled_from(["=", ""]),
            some_text | st.sampled_from(["[1", "{a: 1", "1e-4", "null"]),
        ),
        max_size=3,
    )
)
def test_set_strings_on_a_preset_load_or_refuse_in_one_line(pairs):
    from userpipe.trainer.config import load_run_config, parse_overrides

    try:
        load_run_config("demo", parse_overrides(["".join(p) for p in pairs]))
    except InputError as exc:
        one_line_refusal(exc)


# --------------------------------------------------------------------- damaged artefacts, at the command line

CLI_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)  # a command per example: report, do not shrink
damage = st.tuples(st.sampled_from(["cut", "flip", "append"]), st.floats(0, 1), st.integers(0, 255))


def damaged(data: bytes, how) -> bytes:
    kind, where, value = how
    at = min(int(where * len(data)), max(0, len(data) - 1))
    if kind == "cut":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (value or 1)]) + data[at + 1 :] if data else b"\x00"
    return data + bytes([value]) * 7


def cli_outcome(result, allowed_ok: bool) -> None:
    """Exit 2 with one `error:` line, or (where damage may be harmless) a normal exit; never a traceback."""
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    else:
        assert allowed_ok and result.exit_code in (0, 1), (result.exit_code, result.output)


@pytest.fixture(scope="module")
def artefacts(trained, chain) -> dict:
    """The trained run, its index and gallery (conftest's `trained`), and a shard folder of 6 images."""
    small = chain("artefacts", images=6, seed=0, captions_per_image=None, shard_count=None, val_images=0)
    return {**vars(trained), "shards": small.shards}


ARTEFACT_FILES = [
    ("gallery", "zarr.json", ("info", "{copy}")),
    ("gallery", "test/zarr.json", ("eval", "--run", "{run}", "--store", "{copy}")),
    ("gallery", "test/regions/zarr.json", ("eval", "--run", "{run}", "--store", "{copy}")),
    ("shards", "manifest.json", ("verify", "{copy}")),
    ("shards", "train-000000.tar", ("verify", "{copy}")),
    (
        "run",
        "checkpoints/best/config.json",
        ("eval", "--checkpoint", "{copy}/checkpoints/best", "--store", "{gallery}"),
    ),
    (
        "run",
        "checkpoints/best/model.safetensors",
        ("eval", "--checkpoint", "{copy}/checkpoints/best", "--store", "{gallery}"),
    ),
    ("index", "index.json", ("search", "caption 1 of image 2", "--index", "{copy}", "--run", "{run}")),
    ("index", "images.faiss", ("search", "caption 1 of image 2", "--index", "{copy}", "--run", "{run}")),
    ("index", "captions.jsonl", ("search", "img2", "--captions", "--index", "{copy}", "--run", "{run}")),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, name, command", ARTEFACT_FILES, ids=[f"{k}/{n}" for k, n, _ in ARTEFACT_FILES]
)
@settings(max_examples=8, phases=CLI_PHASES)
@given(how=damage)
def test_damaged_artefacts_are_refused_in_one_line(artefacts, kind, name, command, how):
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy"
        shutil.copytree(artefacts[kind], copy)
        target = copy / name
        target.write_bytes(damaged(target.read_bytes(), how))
        before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        args = [a.format(copy=copy, run=artefacts["run"], gallery=artefacts["gallery"]) for a in command]
        cli_outcome(run_cli(CliRunner(), *args), allowed_ok=True)
        assert {
            p: p.read_bytes() for p in copy.rglob("*") if p.is_file()
        } == before  # reading changed nothing


@pytest.mark.slow
@settings(max_examples=8, phases=CLI_PHASES)
@given(how=damage)
@example(how=("flip", 0.2632313654402066, 102))  # a member's name flipped: the sample lacked regions.npy
def test_training_on_a_damaged_shard_stops_in_one_line(artefacts, how):
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shutil.copytree(artefacts["tmp"] / "shards", shards)
        target = shards / "train-000001.tar"
        target.write_bytes(damaged(target.read_bytes(), how))
        before = {p: p.read_bytes() for p in shards.rglob("*") if p.is_file()}
        config = Path(tmp) / "tiny.yaml"
        config.write_text(json.dumps(tiny_recipe({"train.epochs": 1})))
        result = run_cli(
            CliRunner(),
            "train",
            "--shards",
            shards,
            "--val-store",
            artefacts["val"],
            "--config",
            config,
            "--out",
            Path(tmp) / "run",
        )
        # every change to a shard's bytes is caught (size, tar, sha256), mid-run: progress lines may precede
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert (
            len(errors) == 1
            and "train-000001.tar" in errors[0]
            and errors[0] == result.output.strip().splitlines()[-1]
        )
        assert {p: p.read_bytes() for p in shards.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@settings(max_examples=12, phases=CLI_PHASES)
@given(how=damage, line=st.integers(0, 50))
def test_a_damaged_log_line_is_refused_in_one_line_on_resume(artefacts, how, line):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(artefacts["run"], run)
        lines = (run / "log.jsonl").read_bytes().splitlines(keepends=True)
        at = line % len(lines)
        lines[at] = damaged(lines[at].rstrip(b"\n"), how) + b"\n"
        (run / "log.jsonl").write_bytes(b"".join(lines))
        config = Path(tmp) / "tiny.yaml"
        config.write_text(json.dumps(tiny_recipe({"train.epochs": 2})))
        result = run_cli(
            CliRunner(),
            "train",
            "--shards",
            artefacts["tmp"] / "shards",
            "--val-store",
            artefacts["val"],
            "--config",
            config,
            "--out",
            run,
            "--resume",
        )
        cli_outcome(result, allowed_ok=True)


def test_a_zip_that_is_not_an_npz_names_the_file(tmp_path: Path):
    from userpipe.pipeline.importers import index_npz

    with zipfile.ZipFile(tmp_path / "a.npz", "w") as z:
        z.writestr("readme.txt", "not arrays")
    with pytest.raises(InputError, match="a.npz .* is unusable"):
        index_npz(tmp_path)
