"""`userpipe index`: a run's model embeds a store split into faiss indexes, exact (flat inner product, the
default) or approximate (`--kind ivf|hnsw|ivfpq`, retrieval/ann.py), each gallery's recall against exact
search measured at build and recorded in the manifest.

Flat inner product over the L2-normalized embeddings is the similarity eval ranks by, so a caption's
top-1 image here is its rank-0 image there (tests/test_search.py checks that R@1 agrees).
Folder layout: schemas/index.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from userpipe.retrieval import ann
from userpipe.schemas.base import file_sha256
from userpipe.schemas.errors import InputError
from userpipe.schemas.index import MANIFEST_NAME, GalleryIndex, IndexedModel, IndexManifest, Recall
from userpipe.schemas.outputs import INDEX, claim
from userpipe.schemas.sources import resolved
from userpipe.schemas.store_reader import open_store
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import WEIGHTS, checkpoint_dir, load_trained
from userpipe.trainer.encode import encode_split
from userpipe.trainer.model import USER


def index_summary(kind: str, built: GalleryIndex | None) -> str:
    """One line on how exact a gallery's index is, for `index` and `search` (None: an index of schema 1.0 or
    1.1, which is exact)."""
    if built is None or not built.search:
        return f"{kind} (exact)"
    r = built.recall
    return (
        f"{kind} ({built.factory}, {built.search}): recall@1/5/10 {r.r1:.3f}/{r.r5:.3f}/{r.r10:.3f} of exact "
        f"search, measured at build on {built.queries:,} queries"
    )


def model_sha256(checkpoint: Path) -> str:
    return file_sha256(checkpoint / WEIGHTS)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _gallery_index(kind: str, vectors: torch.Tensor, queries: torch.Tensor, max_memory: int | None):
    """(the faiss index, its GalleryIndex record): planned, built, and tuned on the other gallery's embeddings
    as queries (captions for images, images for captions); its recall measured on other such queries."""
    import faiss

    gallery = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    tuning, measuring = ann.held_out_queries(np.ascontiguousarray(queries.numpy(), dtype=np.float32))
    chosen = ann.plan(kind, *gallery.shape, max_memory)
    index = ann.build(gallery, chosen)
    k = min(10, len(gallery))
    exact = ann.exact_top(gallery, np.concatenate([tuning, measuring]), k)  # one exact pass for both
    setting, _ = ann.tune(index, chosen, tuning, exact[: len(tuning)])
    recall = ann.recall_at(index.search(measuring, k)[1], exact[len(tuning) :])
    record = GalleryIndex(
        factory=chosen.factory,
        search=setting,
        bytes=len(faiss.serialize_index(index)),
        recall=Recall(**recall),
        queries=len(measuring),
    )
    return index, record


@dataclass(frozen=True)
class IndexRequest:
    """What `userpipe index` is asked besides the model: where the gallery is and what index to build."""

    store: str | Path  # a folder or a URL (`sources.location`)
    split: str
    out: Path
    image_root: Path | None = None
    kind: str = "flat"
    max_memory: str | None = None  # a size, e.g. 2GB: both galleries' indexes together


def index_command(
    request: IndexRequest, run: Path | None = None, checkpoint: Path | None = None
) -> IndexManifest:
    """`userpipe index`: a run's best checkpoint (or the checkpoint given) indexes a store split."""
    if request.image_root is not None and not request.image_root.is_dir():
        raise InputError(f"--image-root {request.image_root} is not a folder")
    ann.check_kind(request.kind)
    if request.max_memory is not None:
        ann.parse_size(request.max_memory)  # refused before the model loads
    source = checkpoint_dir(run, checkpoint)
    model, _, tokenizer = load_trained(source)
    return build_index(model, source, tokenizer, request)


def build_index(
    model: USER, checkpoint: Path, tokenizer: CaptionTokenizer, request: IndexRequest
) -> IndexManifest:
    """Embed every valid image and caption of the split into the request's folder (written whole or not at
    all), with the kind of index asked for."""
    store, split, out, kind = request.store, request.split, request.out, request.kind
    budget = None if request.max_memory is None else ann.parse_size(request.max_memory)
    root, attrs = open_store(store)
    summary = attrs.splits.get(split)  # a split the store lacks: encode_split names it
    d = model.config.embed_dim
    counts = (summary.num_images, summary.num_captions) if summary else (0, 0)
    # each gallery's share of the budget by its size, refused (one line) before anything is embedded
    shares = [None if budget is None else budget * c // max(1, sum(counts)) for c in counts]
    planned = [ann.plan(kind, c, d, share).bytes for c, share in zip(counts, shares, strict=True) if c]
    with claim(out, INDEX, [store, checkpoint], needed=sum(planned)) as output:
        emb = encode_split(model, store, split, tokenizer)
        images, image_record = _gallery_index(kind, emb.images, emb.captions, shares[0])
        captions, caption_record = _gallery_index(kind, emb.captions, emb.images, shares[1])
        files = root[split]["file"][:]
        recorded_root = request.image_root.resolve() if request.image_root else attrs.image_root
        manifest = IndexManifest(
            kind=kind,
            galleries={"images": image_record, "captions": caption_record},
            model=IndexedModel(
                checkpoint=str(checkpoint.resolve()), sha256=model_sha256(checkpoint), config=model.config
            ),
            store=resolved(store),
            split=split,
            image_root=str(recorded_root) if recorded_root else None,
            embed_dim=emb.images.shape[1],
            num_images=len(emb.images),
            num_captions=len(emb.captions),
            extractor=attrs.extractor,
        )
        with output.built(image_record.bytes + caption_record.bytes) as folder:
            _write_index(folder, emb, files, manifest, {"images": images, "captions": captions})
    return manifest


def _write_index(folder: Path, emb, files, manifest: IndexManifest, indexes: dict) -> None:
    import faiss

    # serialized here and written by Python: faiss's own writer reports a full disk on stderr and as a
    # RuntimeError without the errno
    for gallery, index in indexes.items():
        (folder / f"{gallery}.faiss").write_bytes(faiss.serialize_index(index).tobytes())
    _write_jsonl(
        folder / "images.jsonl",
        [
            {"id": i, "file": str(files[row]), "row": int(row)}
            for i, row in zip(emb.image_ids, emb.image_rows, strict=True)
        ],
    )
    _write_jsonl(
        folder / "captions.jsonl",
        [{"text": t, "image": int(i)} for t, i in zip(emb.caption_texts, emb.caption_image, strict=True)],
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))  # last: what makes it an index
