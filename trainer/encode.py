"""Embedding a store split with a trained model: each image once, each caption once.

(The reference evaluation encodes every image five times, once per caption.) Reads the store
through its schema, in sequential chunk-sized blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from pipeline.errors import InputError
from pipeline.store import open_store
from trainer.captions import CaptionTokenizer
from trainer.model import USER

IMAGE_BATCH, TEXT_BATCH = 128, 256


@dataclass
class SplitEmbeddings:
    images: torch.Tensor  # (N, E) L2-normalized, valid images only
    captions: torch.Tensor  # (C, E)
    caption_image: torch.Tensor  # (C,) index into `images`
    image_ids: list[str]


def _pad_tokens(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def encode_split(model: USER, store: Path, split: str, tokenizer: CaptionTokenizer, max_images: int | None = None,
                 progress: bool = True) -> SplitEmbeddings:
    root, attrs = open_store(store)
    if split not in attrs.splits:
        raise InputError(f"{store} has no split '{split}' (it has: {', '.join(attrs.splits)})")
    group = root[split]
    n = attrs.splits[split].num_images if max_images is None else min(max_images, attrs.splits[split].num_images)
    valid = group["valid"][:n]
    keep = np.flatnonzero(valid)
    if not len(keep):
        raise InputError(f"split '{split}' of {store} has no valid images")
    config = model.config
    if config.feature_dim != attrs.extractor.feature_dim:
        raise InputError(f"the model takes {config.feature_dim}-d regions, {store} has {attrs.extractor.feature_dim}-d")
    needs_clip = config.enhancement == "cge"
    if needs_clip and "clip_image" not in group:
        raise InputError(f"a cge model needs CLIP image features, and {store} has none")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        caption_image_all = group["caption_image"][:]
        caption_rows = np.flatnonzero(np.isin(caption_image_all, keep))
        texts = group["caption_text"][:][caption_rows]
        images, captions = [], []
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"encoding {split}", total=len(keep) + len(caption_rows))
            for start in range(0, n, IMAGE_BATCH):
                rows = slice(start, min(n, start + IMAGE_BATCH))
                ok = valid[rows]
                if not ok.any():
                    continue
                regions = torch.from_numpy(group["regions"][rows][ok].astype(np.float32)).to(device)
                lengths = torch.from_numpy(group["num_regions"][rows][ok].astype(np.int64)).to(device)
                clip = (torch.from_numpy(group["clip_image"][rows][ok].astype(np.float32)).to(device)
                        if needs_clip else None)
                images.append(model.encode_images(regions, lengths, clip).float().cpu())
                bar.advance(task, int(ok.sum()))
            for start in range(0, len(caption_rows), TEXT_BATCH):
                tokens, lengths = _pad_tokens([tokenizer(str(t)) for t in texts[start:start + TEXT_BATCH]])
                captions.append(model.encode_texts(tokens.to(device), lengths.to(device)).float().cpu())
                bar.advance(task, len(tokens))
    finally:
        model.train(was_training)
    position = np.full(n, -1)
    position[keep] = np.arange(len(keep))
    ids = group["image_id"][:n]
    return SplitEmbeddings(torch.cat(images), torch.cat(captions),
                           torch.from_numpy(position[caption_image_all[caption_rows]]).long(),
                           [str(ids[i]) for i in keep])
