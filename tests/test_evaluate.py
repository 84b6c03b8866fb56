"""Counted ranks against the reference protocol's per-query argsort loops."""

from pathlib import Path

import numpy as np
import pytest

from userpipe.trainer.evaluate import protocol_metrics, retrieval_metrics


def reference_metrics(sims: np.ndarray, caption_image: np.ndarray | None = None) -> dict:
    """VSE++/SCAN's i2t and t2i loops, with a stable argsort so exact ties have a defined order."""
    n = sims.shape[0]
    caption_image = np.arange(sims.shape[1]) // 5 if caption_image is None else caption_image
    i2t = np.zeros(n)
    for i in range(n):
        inds = np.argsort(sims[i], kind="stable")[::-1]
        i2t[i] = min(np.where(inds == c)[0][0] for c in np.flatnonzero(caption_image == i))
    t2i = np.zeros(sims.shape[1])
    for c in range(sims.shape[1]):
        inds = np.argsort(sims[:, c], kind="stable")[::-1]
        t2i[c] = np.where(inds == caption_image[c])[0][0]

    def summary(ranks):
        return {
            "r1": 100 * np.mean(ranks < 1),
            "r5": 100 * np.mean(ranks < 5),
            "r10": 100 * np.mean(ranks < 10),
            "medr": np.floor(np.median(ranks)) + 1,
            "meanr": ranks.mean() + 1,
        }

    a, b = summary(i2t), summary(t2i)
    return {"i2t": a, "t2i": b, "rsum": sum(a[k] + b[k] for k in ("r1", "r5", "r10"))}


def assert_same(ours: dict, ref: dict):
    for side in ("i2t", "t2i"):
        for key, value in ref[side].items():
            assert ours[side][key] == pytest.approx(value, abs=1e-9), (side, key)
    assert ours["rsum"] == pytest.approx(ref["rsum"], abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_counted_ranks_equal_the_argsort_loops(seed):
    rng = np.random.default_rng(seed)
    n = 60
    sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
    sims[np.arange(n), 5 * np.arange(n)] += 2.0  # make the task non-trivial: some hits at rank 0
    assert_same(retrieval_metrics(sims), reference_metrics(sims))


def test_near_ties_and_exact_ties_follow_the_stable_descending_order():
    rng = np.random.default_rng(7)
    n = 40
    sims = rng.integers(0, 4, size=(n, 5 * n)).astype(np.float32)  # massive exact ties
    sims[::3] = np.nextafter(sims[::3], np.float32(10))  # and neighbours one ulp apart
    assert_same(retrieval_metrics(sims), reference_metrics(sims))


def test_custom_caption_counts():
    rng = np.random.default_rng(1)
    caption_image = np.repeat(np.arange(30), rng.integers(1, 8, 30))
    sims = rng.normal(size=(30, len(caption_image)))
    assert_same(retrieval_metrics(sims, caption_image), reference_metrics(sims, caption_image))
    caption_image = np.array([0, 0, 1, 2, 2, 2, 3])
    perfect = np.where(caption_image[None, :] == np.arange(4)[:, None], 1.0, 0.0)
    assert retrieval_metrics(perfect, caption_image)["rsum"] == 600
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(rng.normal(size=(5, 7)), caption_image)


def test_coco1k_is_the_mean_over_five_folds():
    rng = np.random.default_rng(3)
    n = 50
    sims = rng.normal(size=(n, 5 * n))
    sims[np.arange(n), 5 * np.arange(n)] += 1.5
    caption_image = np.arange(5 * n) // 5
    folds = [reference_metrics(sims[f * 10 : (f + 1) * 10, f * 50 : (f + 1) * 50]) for f in range(5)]
    ours = protocol_metrics(sims, caption_image, "coco1k")
    assert ours["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert ours["t2i"]["medr"] == pytest.approx(np.mean([f["t2i"]["medr"] for f in folds]))
    assert_same(protocol_metrics(sims, caption_image, "coco5k"), reference_metrics(sims))
    with pytest.raises(ValueError, match="divisible into 5 folds"):
        protocol_metrics(sims[:12], caption_image[:60], "coco1k")


def test_embedding_metrics_of_one_model_and_of_an_ensemble():
    """One function turns embeddings into metrics for validation, eval, ensembles and the report: an ensemble
    ranks by the mean of its members' similarities."""
    import torch

    from userpipe.schemas.errors import InputError
    from userpipe.trainer.encode import SplitEmbeddings, embedding_metrics

    rng = np.random.default_rng(7)
    caption_image = torch.arange(100) // 5

    def embeddings(seed_shift: float) -> SplitEmbeddings:
        images = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(20, 8))), dim=1)
        captions = torch.nn.functional.normalize(
            images[caption_image] + seed_shift * torch.randn(100, 8), dim=1
        )
        return SplitEmbeddings(
            images, captions, caption_image, [str(i) for i in range(20)], np.arange(20), [""] * 100
        )

    torch.manual_seed(0)
    a, b = embeddings(0.8), embeddings(1.2)
    assert_same(embedding_metrics([a]), reference_metrics((a.images @ a.captions.T).numpy()))
    mean = ((a.images @ a.captions.T + b.images @ b.captions.T) / 2).numpy()
    assert_same(embedding_metrics([a, b]), reference_metrics(mean))
    assert (
        embedding_metrics([a, b], "coco1k")["rsum"]
        == protocol_metrics(mean, caption_image.numpy(), "coco1k")["rsum"]
    )
    other = SplitEmbeddings(
        b.images, b.captions[:95], caption_image[:95], b.image_ids, b.image_rows, [""] * 95
    )
    with pytest.raises(InputError, match="different images or captions"):
        embedding_metrics([a, other])
    with pytest.raises(InputError, match="coco1k needs a test split divisible into 5 folds"):
        embedding_metrics(
            [SplitEmbeddings(a.images[:19], a.captions[:95], caption_image[:95], [], np.arange(19), [])],
            "coco1k",
        )


@pytest.mark.parametrize("ties", [False, True])
def test_ranks_with_extra_positives_equal_the_argsort_loops(ties):
    """CxC-style positives (an image's own captions plus others; a caption's own image plus others): the
    rank of the best-ranked positive, as the per-query argsort loops find it."""
    import torch

    from userpipe.trainer.evaluate import positive_ranks

    rng = np.random.default_rng(3)
    n = 50
    sims = rng.integers(0, 4, size=(n, 5 * n)).astype(np.float32) if ties else rng.normal(size=(n, 5 * n))
    own = [(c // 5, c) for c in range(5 * n)]
    extra = {
        (int(i), int(c)) for i, c in zip(rng.integers(0, n, 300), rng.integers(0, 5 * n, 300), strict=True)
    }
    pairs = np.array(sorted(set(own) | extra))
    i2t, t2i = positive_ranks(
        torch.from_numpy(sims), torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    )
    for i in range(n):
        order = np.argsort(sims[i], kind="stable")[::-1]
        assert i2t[i] == min(np.flatnonzero(order == c)[0] for c in pairs[pairs[:, 0] == i, 1])
    for c in range(5 * n):
        order = np.argsort(sims[:, c], kind="stable")[::-1]
        assert t2i[c] == min(np.flatnonzero(order == i)[0] for i in pairs[pairs[:, 1] == c, 0])


# ---------------------------------------------------------------------------- a protocol's name is a claim


@pytest.fixture(scope="module")
def protocol_stores(tmp_path_factory) -> dict:
    """Test splits of the sizes the protocols name, of their dataset and of another, and small ones
    (5 captions per image, small features: a 5,000-image store is under a megabyte)."""
    from userpipe.pipeline.synthetic import write_synthetic_store

    tmp = tmp_path_factory.mktemp("protocols")

    def store(name: str, images: int, dataset: str, **options) -> Path:
        return write_synthetic_store(
            tmp / f"{name}.zarr",
            images,
            captions_per_image=5,
            chunk_size=1000,
            split="test",
            dataset=dataset,
            **options,
        )

    return {
        "coco 5K": store("coco", 5000, "coco"),
        "f30k 1K": store("f30k", 1000, "f30k"),
        "coco 25": store("coco25", 25, "coco"),
        "f30k 19": store("f30k19", 19, "f30k"),
        "f30k 5K": store("f30k5k", 5000, "f30k"),
        "coco 1K": store("coco1k", 1000, "coco"),
        "coco 5K, 1 invalid": store("coco-invalid", 5000, "coco", invalid=(7,)),
    }


def _cxc_files(folder: Path) -> tuple[str, ...]:
    """Well-formed CxC files, read (as they are) before the store is looked at."""
    from userpipe.trainer.cxc import SITS_COLUMNS

    (folder / "cxc").mkdir(exist_ok=True)
    (folder / "cxc" / "sits_test.csv").write_text(
        ",".join(SITS_COLUMNS) + "\nCOCO_val2014:sentid:1,COCO_val2014_000000000001.jpg,4,c2i\n"
    )
    (folder / "captions.json").write_text('{"annotations": []}')
    return ("--cxc", str(folder / "cxc"), "--coco-captions", str(folder / "captions.json"))


@pytest.mark.parametrize(
    "protocol, store, holds",
    [
        ("coco1k", "coco 25", "25 images and 125 captions of dataset 'coco'"),
        ("coco1k", "f30k 5K", "5,000 images and 25,000 captions of dataset 'f30k'"),
        ("coco5k", "coco 25", "25 images and 125 captions of dataset 'coco'"),
        ("coco5k", "f30k 5K", "5,000 images and 25,000 captions of dataset 'f30k'"),
        ("coco5k", "coco 5K, 1 invalid", "(invalid images left out: 1) holds 4,999 images and 24,995"),
        ("f30k", "f30k 19", "19 images and 95 captions of dataset 'f30k'"),
        ("f30k", "coco 1K", "1,000 images and 5,000 captions of dataset 'coco'"),
        ("cxc", "coco 25", "25 images and 125 captions of dataset 'coco'"),
        ("cxc", "f30k 5K", "5,000 images and 25,000 captions of dataset 'f30k'"),
    ],
)
def test_a_named_protocol_refuses_a_split_that_is_not_the_one_it_names(
    runner, protocol_stores, tmp_path, protocol, store, holds
):
    """coco1k on 25 images would average five folds of five and print R@10 = 100 as COCO 1K: refused (one
    line, exit 2) before any model is loaded, by size and by the dataset the store records."""
    from kit import run_cli

    from userpipe.trainer.evaluate import PROTOCOL_SPLITS

    need = PROTOCOL_SPLITS[protocol]
    cxc = _cxc_files(tmp_path) if protocol == "cxc" else ()
    path = protocol_stores[store]
    result = run_cli(
        runner, "eval", "--checkpoint", tmp_path / "none", "--store", path, "--protocol", protocol, *cxc
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    line = " ".join(result.output.split())  # the console wraps long lines
    assert f"--protocol {protocol} is {need.name}: " in line
    assert f"{need.images:,} images and {need.captions:,} captions of dataset {need.dataset}" in line
    assert f"split 'test' of {path}" in line and holds in line and "--protocol full evaluates any" in line


@pytest.mark.parametrize(
    "protocol, store", [("coco1k", "coco 5K"), ("coco5k", "coco 5K"), ("cxc", "coco 5K"), ("f30k", "f30k 1K")]
)
def test_a_named_protocol_accepts_the_split_it_names(protocol_stores, protocol, store):
    from userpipe.trainer.encode import split_sizes
    from userpipe.trainer.evaluate import check_protocol_split

    dataset, images, captions, invalid = split_sizes(protocol_stores[store], "test")
    assert invalid == 0
    check_protocol_split(protocol, dataset, images, captions, "the split")  # does not raise
    karpathy = {"coco": "/data/coco/dataset_coco.json", "f30k": "f30k/dataset_flickr30k.json"}[dataset]
    check_protocol_split(protocol, karpathy, images, captions, "the split")  # extracted from the JSON's path
    for other in ("coco 25", "f30k 19"):  # `full` takes any split
        check_protocol_split("full", *split_sizes(protocol_stores[other], "test")[:3], "the split")


def test_a_tables_title_states_what_was_evaluated():
    from userpipe.trainer.evaluate import format_table, with_sizes

    rng = np.random.default_rng(0)
    sims = rng.normal(size=(10, 50))
    metrics = retrieval_metrics(sims)
    assert format_table(with_sizes(metrics, 1000, 5000), "f30k on s [test]").startswith(
        "f30k on s [test]: 1,000 images, 5,000 captions\n\n| direction |"
    )
    folds = with_sizes(protocol_metrics(sims, np.arange(50) // 5, "coco1k"), 5000, 25000, "coco1k")
    assert format_table(folds, "coco1k on s [test]").startswith(
        "coco1k on s [test]: 5 folds of 1,000 images / 5,000 captions\n"
    )
    assert format_table(with_sizes(metrics, 8, 21)).startswith("8 images, 21 captions\n\n")


@pytest.mark.slow
def test_eval_on_the_split_a_protocol_names_prints_its_sizes(runner, protocol_stores, tmp_path):
    """End to end with an untrained model: coco1k on a 5,000-image COCO store is evaluated, its title saying
    the folds' size; f30k's JSON holds the sizes."""
    import json

    import torch
    from kit import run_cli, tiny_recipe

    from userpipe.schemas.run import RunConfig
    from userpipe.trainer import checkpoint

    config = RunConfig.model_validate(tiny_recipe())
    model = checkpoint.initial_model(config)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path / "run", model, optimizer, config, {"epoch": 0, "step": 0}, {"rsum": 0.0}, True)
    base = ("eval", "--run", tmp_path / "run", "--store")
    table = run_cli(runner, *base, protocol_stores["coco 5K"], "--protocol", "coco1k")
    assert table.exit_code == 0, table.output
    assert f"coco1k on {protocol_stores['coco 5K']} [test]: 5 folds of 1,000 images / 5,000 captions" in (
        table.stdout
    )
    as_json = run_cli(runner, *base, protocol_stores["f30k 1K"], "--protocol", "f30k", "--json")
    assert as_json.exit_code == 0, as_json.output
    metrics = json.loads(as_json.stdout)
    assert (metrics["num_images"], metrics["num_captions"]) == (1000, 5000) and "num_folds" not in metrics
