"""Embedding a store split with a trained model: each image once, each caption once.

(The reference evaluation encodes every image five times, once per caption.) Reads the store
through its schema, in sequential chunk-sized blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from userpipe.schemas import threads
from userpipe.schemas.errors import InputError
from userpipe.schemas.run import ModelConfig
from userpipe.schemas.store_reader import open_store, store_split
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.evaluate import (
    check_finite,
    protocol_metrics,
)
from userpipe.trainer.model import USER

IMAGE_BATCH, TEXT_BATCH = 128, 256


@dataclass
class SplitEmbeddings:
    images: torch.Tensor  # (N, E) L2-normalized, valid images only
    captions: torch.Tensor  # (C, E)
    caption_image: torch.Tensor  # (C,) index into `images`
    image_ids: list[str]
    image_rows: np.ndarray  # (N,) each embedded image's row in the store split
    caption_texts: list[str]


def _pad_tokens(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def encode_texts(model: USER, tokenizer: CaptionTokenizer, texts, on_batch=None) -> torch.Tensor:
    """(len(texts), E) caption embeddings; the model must be in eval mode."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), TEXT_BATCH):
        threads.adjust()
        tokens, lengths = _pad_tokens([tokenizer(str(t)) for t in texts[start : start + TEXT_BATCH]])
        out.append(model.encode_texts(tokens.to(device), lengths.to(device)).float().cpu())
        if on_batch:
            on_batch(len(tokens))
    return torch.cat(out)


@torch.no_grad()
def encode_regions(
    model: USER, regions: np.ndarray, lengths: np.ndarray, clip: np.ndarray | None
) -> torch.Tensor:
    """(n, E) image embeddings of (n, R, D) region features; `clip` (n, C) only for cge models."""
    device = next(model.parameters()).device
    threads.adjust()
    return (
        model.encode_images(
            torch.from_numpy(regions.astype(np.float32)).to(device),
            torch.from_numpy(lengths.astype(np.int64)).to(device),
            None if clip is None else torch.from_numpy(clip.astype(np.float32)).to(device),
        )
        .float()
        .cpu()
    )


def check_store_fits(config: ModelConfig, store: Path, attrs, group) -> None:
    if config.feature_dim != attrs.extractor.feature_dim:
        raise InputError(
            f"the model takes {config.feature_dim}-d regions, {store} has {attrs.extractor.feature_dim}-d"
        )
    if config.enhancement == "cge" and "clip_image" not in group:
        raise InputError(f"a cge model needs CLIP image features, and {store} has none")


def open_split(store: Path, split: str, config: ModelConfig, max_images: int | None = None):
    """The store's split checked against the model that will encode it: (group, attrs, n, valid rows)."""
    group, attrs, n, valid, keep = split_rows(store, split, max_images)
    check_store_fits(config, store, attrs, group)
    return group, attrs, n, valid, keep


def split_rows(store: Path, split: str, max_images: int | None = None):
    """A complete store's split: (group, attrs, n, valid flags of its first n rows, the valid rows)."""
    root, attrs = open_store(store)
    if not attrs.complete:
        raise InputError(f"{store} is incomplete; finish it with userpipe extract first")
    group = store_split(store, root, attrs, split)
    n = (
        attrs.splits[split].num_images
        if max_images is None
        else min(max_images, attrs.splits[split].num_images)
    )
    valid = group["valid"][:n]
    keep = np.flatnonzero(valid)
    if not len(keep):
        raise InputError(f"split '{split}' of {store} has no valid images")
    return group, attrs, n, valid, keep


def split_sizes(store: Path, split: str, max_images: int | None = None) -> tuple[str, int, int, int]:
    """What encode_split embeds of a split, without a model: the store's dataset, the valid images among the
    first `max_images`, their captions, and the invalid images left out."""
    group, attrs, n, valid, keep = split_rows(store, split, max_images)
    captions = int(np.isin(group["caption_image"][:], keep).sum())
    return attrs.extractor.dataset, len(keep), captions, n - len(keep)


@torch.no_grad()
def encode_split(
    model: USER,
    store: Path,
    split: str,
    tokenizer: CaptionTokenizer,
    max_images: int | None = None,
    progress: bool = True,
    with_captions: bool = True,
) -> SplitEmbeddings:
    """A trained (or untrained) USER model's embeddings of a split (its images only, without captions)."""
    group, attrs, n, valid, keep = open_split(store, split, model.config, max_images)
    needs_clip = model.config.enhancement == "cge"
    was_training = model.training
    model.eval()
    try:
        return embed_split(
            group,
            split,
            n,
            valid,
            keep,
            lambda rows, ok: encode_regions(
                model,
                group["regions"][rows][ok],
                group["num_regions"][rows][ok],
                group["clip_image"][rows][ok] if needs_clip else None,
            ),
            _caption_encoder(model, tokenizer) if with_captions else None,
            progress,
        )
    finally:
        model.train(was_training)


def _caption_encoder(model: USER, tokenizer: CaptionTokenizer):
    return lambda texts, on_batch: encode_texts(model, tokenizer, texts, on_batch)


def embed_split(
    group,
    split: str,
    n: int,
    valid: np.ndarray,
    keep: np.ndarray,
    embed_images: Callable[[slice, np.ndarray], torch.Tensor],
    embed_texts: Callable[[list[str], Callable[[int], None]], torch.Tensor] | None,
    progress: bool = True,
) -> SplitEmbeddings:
    """A split's valid images (`embed_images(rows, ok)`: the store rows `rows` whose `ok` is set, in blocks
    of IMAGE_BATCH) and their captions (`embed_texts(texts, on_batch)`; None: no captions), each once,
    checked finite."""
    if embed_texts:
        caption_image_all = group["caption_image"][:]
        caption_rows = np.flatnonzero(np.isin(caption_image_all, keep))
        texts = group["caption_text"][:][caption_rows]
    else:  # images only: the caption arrays are not read
        caption_image_all, caption_rows, texts = np.zeros(0, int), np.zeros(0, int), np.array([], object)
    images = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"encoding {split}", total=len(keep) + len(caption_rows))
        for start in range(0, n, IMAGE_BATCH):
            rows = slice(start, min(n, start + IMAGE_BATCH))
            ok = valid[rows]
            if not ok.any():
                continue
            images.append(embed_images(rows, ok))
            bar.advance(task, int(ok.sum()))
        images = torch.cat(images)
        captions = (
            embed_texts(list(texts), lambda k: bar.advance(task, k))
            if embed_texts
            else torch.zeros(0, images.shape[1])
        )
    check_finite(images, captions)
    position = np.full(n, -1)
    position[keep] = np.arange(len(keep))
    ids = group["image_id"][:n]
    return SplitEmbeddings(
        images,
        captions,
        torch.from_numpy(position[caption_image_all[caption_rows]]).long(),
        [str(ids[i]) for i in keep],
        keep,
        [str(t) for t in texts],
    )


def embedding_metrics(embeddings: list[SplitEmbeddings], protocol: str = "full", positives=None) -> dict:
    """Retrieval metrics of one model's embeddings of a split, or of several models' (an ensemble: their
    image x caption similarities averaged, as the VSE∞ and USER evaluations ensemble two runs)."""
    first = embeddings[0]
    if any(not torch.equal(e.caption_image, first.caption_image) for e in embeddings[1:]):
        raise InputError("the ensemble's embeddings are of different images or captions; encode one split")
    sims = sum(e.images @ e.captions.T for e in embeddings) / len(embeddings)
    try:
        return protocol_metrics(sims, first.caption_image, protocol, positives)
    except ValueError as exc:  # a protocol the split does not fit, e.g. coco1k on 1,001 images
        raise InputError(str(exc)) from None
