"""`userpipe eval`: a run's best checkpoint, a checkpoint, an ensemble of runs, or the zero-shot baseline
of the store's open_clip model on a store split, under the protocol named (which must be the split it
names)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from userpipe.retrieval.zero_shot import zero_shot_embeddings
from userpipe.schemas.errors import InputError
from userpipe.trainer.checkpoint import checkpoint_dir, load_trained
from userpipe.trainer.cxc import cxc_positives, read_cxc
from userpipe.trainer.encode import SplitEmbeddings, embedding_metrics, encode_split, split_sizes
from userpipe.trainer.evaluate import (
    PROTOCOLS,
    check_protocol_split,
    with_sizes,
)


def evaluate_split(
    store: Path,
    split: str,
    protocol: str,
    embed: Callable[[], list[SplitEmbeddings]],
    cxc: Path | None = None,
    coco_captions: Path | None = None,
) -> dict:
    """The metrics of `embed()`'s embeddings of a split (several: an ensemble), the protocol and its
    annotations checked first; `cxc` and `coco_captions`: the CxC files the cxc protocol reads
    (trainer/cxc.py)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    if (protocol == "cxc") != (cxc is not None and coco_captions is not None):
        raise InputError("--protocol cxc goes with --cxc DIR and --coco-captions FILE, and they only with it")
    annotations = read_cxc(cxc, coco_captions) if cxc is not None else None  # before any model loads
    dataset, num_images, num_captions, invalid = split_sizes(store, split)
    left_out = f" (invalid images left out: {invalid:,})" if invalid else ""
    check_protocol_split(protocol, dataset, num_images, num_captions, f"split '{split}' of {store}{left_out}")
    embeddings = embed()
    first = embeddings[0]
    positives = (
        cxc_positives(first.image_ids, first.caption_texts, first.caption_image, annotations)
        if annotations is not None
        else None
    )
    return with_sizes(
        embedding_metrics(embeddings, protocol, positives), len(first.images), len(first.captions), protocol
    )


def evaluation_embedder(
    store: Path,
    split: str,
    run: Path | None = None,
    checkpoint: Path | None = None,
    ensemble: tuple[Path, ...] = (),
    zero_shot: str | None = None,
) -> Callable[[], list[SplitEmbeddings]]:
    """What `eval` embeds the split with: the zero-shot baseline (MODEL:PRETRAINED), the best checkpoints of
    an ensemble of runs, or one run's best (or a checkpoint)."""
    if zero_shot is not None:
        return lambda: [zero_shot_embeddings(zero_shot, store, split)]

    def trained() -> list[SplitEmbeddings]:
        sources = (
            [checkpoint_dir(r, None) for r in ensemble]
            if ensemble
            else [checkpoint_dir(run, checkpoint, "--run, --checkpoint, --ensemble or --zero-shot")]
        )
        embeddings = []
        for source in sources:
            model, _, tokenizer = load_trained(source)
            embeddings.append(encode_split(model, store, split, tokenizer))
        return embeddings

    return trained
