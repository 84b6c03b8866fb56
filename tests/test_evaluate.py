"""Counted ranks against the reference protocol's per-query argsort loops."""

import numpy as np
import pytest

from trainer.evaluate import protocol_metrics, retrieval_metrics


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

    from schemas.errors import InputError
    from trainer.encode import SplitEmbeddings, embedding_metrics

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

    from trainer.evaluate import positive_ranks

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
