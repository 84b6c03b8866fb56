"""Retrieval metrics and the standard protocols of VSE++ (Faghri et al. 2018), SCAN
(Lee et al. 2018), VSE∞ (Chen et al. 2021) and USER (its released evaluation.py): 1K as 5-fold means,
5K, F30K 1K.

Ranks are counted, not sorted, in one pass over the similarity rows (how ties are ordered:
docs/architecture.md, "The trainer").
  i2t: rank of image i = the best rank among its captions;  t2i: rank of caption c = rank of its image.
  R@K = 100 · mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1;
  RSUM = i2t (R@1 + R@5 + R@10) + t2i (R@1 + R@5 + R@10).
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from userpipe.schemas import threads
from userpipe.schemas.errors import InputError, NonFiniteError

KS = (1, 5, 10)
ROWS = 64  # image rows per block: a (64, C) slice stays in cache while both directions count over it
PROTOCOLS = ("coco1k", "coco5k", "f30k", "full", "cxc")
FOLDS = 5


@dataclass(frozen=True)
class ProtocolSplit:
    """The split a protocol's name claims: the store's dataset, and the images and captions it evaluates."""

    name: str
    dataset: str
    images: int
    captions: int


# Karpathy & Fei-Fei (CVPR 2015)'s test splits, 5 captions per image, as VSE++ and SCAN report on them
PROTOCOL_SPLITS = {
    "coco1k": ProtocolSplit("COCO's 5K test split in 5 folds of 1,000", "coco", 5_000, 25_000),
    "coco5k": ProtocolSplit("COCO's 5K test split", "coco", 5_000, 25_000),
    "f30k": ProtocolSplit("Flickr30K's 1K test split", "f30k", 1_000, 5_000),
    "cxc": ProtocolSplit("Crisscrossed Captions on COCO's 5K test split", "coco", 5_000, 25_000),
}  # `full` takes any split
KARPATHY_FILES = {"dataset_coco.json": "coco", "dataset_flickr30k.json": "f30k"}


def check_protocol_split(protocol: str, dataset: str, num_images: int, num_captions: int, what: str) -> None:
    """A protocol's name is a claim about the data: a split other than the one it names (`what`, e.g. "split
    'test' of data/coco.zarr", holding the images and captions counted) is refused, so that no table calls
    another split's numbers COCO's or Flickr30K's."""
    need = PROTOCOL_SPLITS.get(protocol)
    family = KARPATHY_FILES.get(Path(dataset).name, dataset)  # a store extracted from the JSON's path
    if need is None or (family, num_images, num_captions) == (need.dataset, need.images, need.captions):
        return
    raise InputError(
        f"--protocol {protocol} is {need.name}: {need.images:,} images and {need.captions:,} captions of "
        f"dataset {need.dataset}; {what} holds {num_images:,} images and {num_captions:,} captions of "
        f"dataset '{dataset}' (--protocol full evaluates any split)"
    )


def with_sizes(metrics: dict, num_images: int, num_captions: int, protocol: str = "full") -> dict:
    """The metrics with the sizes of what they were computed over, which format_table's title states."""
    folds = {"num_folds": FOLDS} if protocol == "coco1k" else {}
    return {**metrics, "num_images": num_images, "num_captions": num_captions, **folds}


def rsum_noise(metrics: dict) -> float:
    """RSUM's sampling noise at these metrics (with their sizes): the sum, over both directions and each K,
    of a recall's binomial standard error 100·sqrt(p(1-p)/queries) (the standard error of a proportion),
    p at least chance (K / items ranked). A sum of errors, not of variances: one direction's R@K move
    together."""
    n, c = metrics["num_images"], metrics["num_captions"]
    total = 0.0
    for side, queries, items in (("i2t", n, c), ("t2i", c, n)):
        for k in KS:
            p = min(1.0, max(metrics[side][f"r{k}"] / 100, k / items))
            total += 100 * math.sqrt(p * (1 - p) / queries)
    return total


def evaluated(metrics: dict) -> str:
    """'N images, C captions', or for a fold protocol each fold's share; '' when the metrics lack sizes."""
    if "num_images" not in metrics:
        return ""
    n, c, folds = metrics["num_images"], metrics["num_captions"], metrics.get("num_folds")
    if folds:
        return f"{folds} folds of {n // folds:,} images / {c // folds:,} captions"
    return f"{n:,} images, {c:,} captions"


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def ranks(sims: torch.Tensor, caption_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based i2t ranks (N,) and t2i ranks (C,): each caption's positive is its own image."""
    return positive_ranks(sims, caption_image, torch.arange(sims.shape[1]))


def positive_ranks(
    sims: torch.Tensor, pair_image: torch.Tensor, pair_caption: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based i2t ranks (N,) and t2i ranks (C,) of the best-ranked positive, the positives being the
    (image, caption) pairs given (each image and each caption in at least one), counted in one pass over
    the rows of `sims`.

    An item's rank is the number of items scoring strictly higher, plus the tied items with a larger index
    (what a stable descending argsort puts first). Exact ties are rare in float scores, so they are
    counted again only for the queries that have any.
    """
    threads.adjust()
    n, c = sims.shape
    columns, rows = torch.arange(c), torch.arange(n)
    score = sims[pair_image, pair_caption]  # each positive pair's score

    def best(query: torch.Tensor, item: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, its best positive's score and index (ties: the larger index, as the sort puts it)."""
        top = torch.full((size,), float("-inf"), dtype=sims.dtype).scatter_reduce(0, query, score, "amax")
        at = torch.full((size,), -1).scatter_reduce(
            0, query, torch.where(score == top[query], item, -1), "amax"
        )
        return top, at

    best_caption_score, best_caption = best(pair_image, pair_caption, n)
    best_image_score, best_image = best(pair_caption, pair_image, c)
    # numpy's comparisons are vectorised where torch's broadcast comparison is not; numpy runs one
    # thread, so the rows are split across the calling thread's share of the cores (schemas/threads.py)
    # float32 on the CPU: upcasting keeps every order and tie
    scores = sims.detach().to("cpu", torch.float32).numpy()
    caption_best = best_caption_score.detach().to("cpu", torch.float32).numpy()[:, None]
    image_best = best_image_score.detach().to("cpu", torch.float32).numpy()

    def count(rows_from: int, rows_to: int) -> tuple[np.ndarray, ...]:
        """Rows [rows_from, rows_to): i2t's higher counts and tie counts, t2i's higher and at-least counts."""
        higher, tied = np.empty(rows_to - rows_from, np.int64), np.empty(rows_to - rows_from, np.int64)
        image_higher, image_at_least = np.zeros(c, np.int64), np.zeros(c, np.int64)
        for start in range(rows_from, rows_to, ROWS):
            end = min(rows_to, start + ROWS)
            block, threshold = scores[start:end], caption_best[start:end]
            higher[start - rows_from : end - rows_from] = np.count_nonzero(block > threshold, axis=1)
            tied[start - rows_from : end - rows_from] = np.count_nonzero(block == threshold, axis=1)
            image_higher += np.count_nonzero(block > image_best, axis=0)
            image_at_least += np.count_nonzero(block >= image_best, axis=0)
        return higher, tied, image_higher, image_at_least

    parts = max(1, min(torch.get_num_threads(), n // ROWS))
    bounds = [n * k // parts for k in range(parts + 1)]
    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
        counted = list(pool.map(count, bounds[:-1], bounds[1:]))
    i2t = torch.from_numpy(np.concatenate([part[0] for part in counted]))
    equal = np.concatenate([part[1] for part in counted])
    t2i = torch.from_numpy(sum(part[2] for part in counted))
    t2i_at_least = torch.from_numpy(sum(part[3] for part in counted))
    tied = torch.from_numpy(np.flatnonzero(equal > 1))  # the best caption ties another caption
    if len(tied):
        higher_index = columns > best_caption[tied, None]
        i2t[tied] += ((sims[tied] == best_caption_score[tied, None]) & higher_index).sum(1)
    tied = (t2i_at_least - t2i > 1).nonzero().squeeze(1)  # the best image ties another image
    if len(tied):
        t2i[tied] += ((sims[:, tied] == best_image_score[tied]) & (rows[:, None] > best_image[tied])).sum(0)
    return i2t, t2i


def _summary(ranks: torch.Tensor) -> dict[str, float]:
    """The released evaluation's formulas on the same float64 ranks, so the numbers agree to the last bit."""
    r = ranks.numpy().astype(np.float64)
    out = {f"r{k}": 100.0 * int((r < k).sum()) / len(r) for k in KS}
    out["medr"] = float(np.floor(np.median(r)) + 1)
    out["meanr"] = float(r.mean() + 1)
    return out


def check_finite(images: torch.Tensor, captions: torch.Tensor) -> None:
    """Embeddings that can be ranked: NaN compares false with everything, so it would rank first."""
    bad_images, bad_captions = (int((~torch.isfinite(e)).any(1).sum()) for e in (images, captions))
    if bad_images or bad_captions:
        raise NonFiniteError(
            f"{bad_images} of {len(images)} image embeddings and {bad_captions} of {len(captions)} "
            "caption embeddings are non-finite (NaN or inf): the model diverged or its input holds "
            "non-finite features (userpipe verify checks stores and shards)"
        )


def retrieval_metrics(sims, caption_image=None) -> dict:
    """(N, C) image × caption similarities → i2t/t2i R@1/5/10, medr, meanr and RSUM.

    `caption_image[c]` is caption c's image; by default C = 5N with 5 contiguous captions per image.
    Non-finite similarities are refused (NonFiniteError), never ranked.
    """
    sims, caption_image = checked_scores(sims, caption_image)
    return _metrics(*ranks(sims, caption_image))


def _metrics(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor) -> dict:
    i2t, t2i = _summary(i2t_rank), _summary(t2i_rank)
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in KS)}


def checked_scores(sims, caption_image=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The similarities and each caption's image as tensors, refused when they cannot be ranked."""
    sims = _as_tensor(sims)
    n, c = sims.shape
    if sims.numel() and not all(torch.isfinite(v) for v in torch.aminmax(sims)):  # NaN propagates: one pass
        finite = torch.isfinite(sims)
        raise NonFiniteError(
            f"{int((~finite).sum())} of {n * c} similarities are non-finite (NaN or inf), in "
            f"{int((~finite).any(1).sum())} of {n} images and {int((~finite).any(0).sum())} of {c} "
            "captions"
        )
    if caption_image is None:
        if c % n:
            raise ValueError(f"{c} captions for {n} images: pass caption_image")
        caption_image = torch.arange(c) // (c // n)
    caption_image = _as_tensor(caption_image).long()
    if len(caption_image) != c or caption_image.min() < 0 or caption_image.max() >= n:
        raise ValueError("caption_image must give each caption's image index (0..N-1)")
    if torch.bincount(caption_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")
    return sims, caption_image


def protocol_metrics(sims, caption_image, protocol: str, positives=None) -> dict:
    """`coco1k`: mean over 5 folds of N/5 images and their captions (every metric, RSUM included);
    `coco5k`, `f30k`, `full`: the whole matrix (the names say which split the papers use); `cxc`: the whole
    matrix, a query's rank being its best-ranked positive's, `positives` the (image, caption) index pairs
    (trainer/cxc.py)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    sims, caption_image = _as_tensor(sims), _as_tensor(caption_image).long()
    if protocol == "cxc":
        if positives is None:
            raise ValueError("the cxc protocol needs the CxC positives (--cxc and --coco-captions)")
        sims, _ = checked_scores(sims, caption_image)
        return _metrics(*positive_ranks(sims, *positives))
    if protocol != "coco1k":
        return retrieval_metrics(sims, caption_image)
    n = sims.shape[0]
    if n % FOLDS:
        raise ValueError(f"coco1k needs a test split divisible into {FOLDS} folds, got {n} images")
    size = n // FOLDS
    folds = []
    for f in range(FOLDS):
        images = slice(f * size, (f + 1) * size)
        captions = ((caption_image >= f * size) & (caption_image < (f + 1) * size)).nonzero().squeeze(1)
        folds.append(retrieval_metrics(sims[images][:, captions], caption_image[captions] - f * size))
    mean = {
        side: {key: float(np.mean([fold[side][key] for fold in folds])) for key in folds[0][side]}
        for side in ("i2t", "t2i")
    }
    return {**mean, "rsum": float(np.mean([fold["rsum"] for fold in folds])), "folds": folds}


def format_table(metrics: dict, title: str = "") -> str:
    """The markdown table papers report; its title states what was evaluated when the metrics carry their
    sizes (`with_sizes`)."""
    sizes = evaluated(metrics)
    title = f"{title}: {sizes}" if title and sizes else title or sizes
    header = "| direction | R@1 | R@5 | R@10 | medr | meanr |\n|---|---|---|---|---|---|\n"
    rows = "".join(
        f"| {name} | {m['r1']:.1f} | {m['r5']:.1f} | {m['r10']:.1f} | {m['medr']:.0f} | {m['meanr']:.1f} |\n"
        for name, m in (("image→text", metrics["i2t"]), ("text→image", metrics["t2i"]))
    )
    return (f"{title}\n\n" if title else "") + header + rows + f"\nRSUM {metrics['rsum']:.1f}\n"
