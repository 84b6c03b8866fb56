"""Retrieval metrics and the standard protocols of VSE++ (Faghri et al. 2018), SCAN
(Lee et al. 2018), VSE∞ (Chen et al. 2021) and USER (its released evaluation.py): 1K as 5-fold means, 5K, F30K 1K.

Ranks are counted, not sorted: an item's 0-based rank is the number of items scoring strictly
higher, plus the tied items that a stable descending sort of the reference form
(`np.argsort(d, kind="stable")[::-1]`) puts first, i.e. tied items with a larger index. That equals
the reference's per-query argsort positions, and runs block by block with bounded memory.
  i2t: rank of image i = the best rank among its captions;  t2i: rank of caption c = rank of its image.
  R@K = 100 · mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1;
  RSUM = i2t (R@1 + R@5 + R@10) + t2i (R@1 + R@5 + R@10).
"""

from __future__ import annotations

import numpy as np
import torch

from schemas.errors import NonFiniteError

KS = (1, 5, 10)
BLOCK = 256  # queries per block: BLOCK × (images or captions) comparisons at a time
PROTOCOLS = ("coco1k", "coco5k", "f30k", "full")
FOLDS = 5


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _counted_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: position of column `target[row]` in a stable descending argsort of the row."""
    rows = torch.arange(len(scores))
    gt = scores[rows, target][:, None]
    columns = torch.arange(scores.shape[1])[None, :]
    return (scores > gt).sum(1) + ((scores == gt) & (columns > target[:, None])).sum(1)


def i2t_ranks(sims: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    n = sims.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    columns = torch.arange(sims.shape[1])
    for start in range(0, n, BLOCK):
        block = sims[start:start + BLOCK]
        own = caption_image[None, :] == torch.arange(start, start + len(block))[:, None]
        # the image's best caption: highest score, ties to the larger index (the smaller stable rank)
        key = torch.where(own, block, torch.tensor(float("-inf"), dtype=block.dtype))
        best_score = key.max(dim=1, keepdim=True).values
        best = torch.where(own & (key == best_score), columns[None, :], -1).max(dim=1).values
        ranks[start:start + len(block)] = _counted_ranks(block, best)
    return ranks


def t2i_ranks(sims: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    c = sims.shape[1]
    ranks = torch.empty(c, dtype=torch.long)
    for start in range(0, c, BLOCK):
        block = sims[:, start:start + BLOCK].T  # (captions, images)
        ranks[start:start + len(block)] = _counted_ranks(block, caption_image[start:start + len(block)])
    return ranks


def _summary(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    out = {f"r{k}": 100.0 * (r < k).double().mean().item() for k in KS}
    out["medr"] = float(np.floor(np.median(r.numpy())) + 1)
    out["meanr"] = r.mean().item() + 1
    return out


def check_finite(images: torch.Tensor, captions: torch.Tensor) -> None:
    """Embeddings that can be ranked: NaN compares false with everything, so it would rank first."""
    bad_images, bad_captions = (int((~torch.isfinite(e)).any(1).sum()) for e in (images, captions))
    if bad_images or bad_captions:
        raise NonFiniteError(f"{bad_images} of {len(images)} image embeddings and {bad_captions} of {len(captions)} "
                             "caption embeddings are non-finite (NaN or inf): the model diverged or its input holds "
                             "non-finite features (userpipe verify checks stores and shards)")


def retrieval_metrics(sims, caption_image=None) -> dict:
    """(N, C) image × caption similarities → i2t/t2i R@1/5/10, medr, meanr and RSUM.

    `caption_image[c]` is caption c's image; by default C = 5N with 5 contiguous captions per image.
    Non-finite similarities are refused (NonFiniteError), never ranked.
    """
    sims = _as_tensor(sims)
    n, c = sims.shape
    finite = torch.isfinite(sims)
    if not finite.all():
        raise NonFiniteError(f"{int((~finite).sum())} of {n * c} similarities are non-finite (NaN or inf), in "
                             f"{int((~finite).any(1).sum())} of {n} images and {int((~finite).any(0).sum())} of {c} "
                             "captions")
    if caption_image is None:
        if c % n:
            raise ValueError(f"{c} captions for {n} images: pass caption_image")
        caption_image = torch.arange(c) // (c // n)
    caption_image = _as_tensor(caption_image).long()
    if len(caption_image) != c or caption_image.min() < 0 or caption_image.max() >= n:
        raise ValueError("caption_image must give each caption's image index (0..N-1)")
    if torch.bincount(caption_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")
    i2t, t2i = _summary(i2t_ranks(sims, caption_image)), _summary(t2i_ranks(sims, caption_image))
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in KS)}


def protocol_metrics(sims, caption_image, protocol: str) -> dict:
    """`coco1k`: mean over 5 folds of N/5 images and their captions (every metric, RSUM included);
    `coco5k`, `f30k`, `full`: the whole matrix (the names say which split the papers use)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    sims, caption_image = _as_tensor(sims), _as_tensor(caption_image).long()
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
    mean = {side: {key: float(np.mean([fold[side][key] for fold in folds])) for key in folds[0][side]}
            for side in ("i2t", "t2i")}
    return {**mean, "rsum": float(np.mean([fold["rsum"] for fold in folds])), "folds": folds}


def format_table(metrics: dict, title: str = "") -> str:
    """The markdown table papers report."""
    header = "| direction | R@1 | R@5 | R@10 | medr | meanr |\n|---|---|---|---|---|---|\n"
    rows = "".join(f"| {name} | {m['r1']:.1f} | {m['r5']:.1f} | {m['r10']:.1f} | {m['medr']:.0f} | {m['meanr']:.1f} |\n"
                   for name, m in (("image→text", metrics["i2t"]), ("text→image", metrics["t2i"])))
    return (f"{title}\n\n" if title else "") + header + rows + f"\nRSUM {metrics['rsum']:.1f}\n"
