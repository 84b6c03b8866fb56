"""`userpipe index`: a run's model embeds a store split into exact (flat inner product) faiss indexes.

Flat inner product over the L2-normalized embeddings is the similarity eval ranks by, so a caption's
top-1 image here is its rank-0 image there (tests/test_search.py checks that R@1 agrees).
Folder layout: schemas/index.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from userpipe.schemas.base import file_sha256
from userpipe.schemas.errors import InputError
from userpipe.schemas.index import MANIFEST_NAME, IndexedModel, IndexManifest
from userpipe.schemas.outputs import INDEX, claim
from userpipe.schemas.store_reader import open_store
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import WEIGHTS, checkpoint_dir, load_trained
from userpipe.trainer.encode import encode_split
from userpipe.trainer.model import USER


def model_sha256(checkpoint: Path) -> str:
    return file_sha256(checkpoint / WEIGHTS)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _flat_ip(vectors: torch.Tensor):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    return index


def index_command(
    store: Path,
    out: Path,
    split: str,
    run: Path | None = None,
    checkpoint: Path | None = None,
    image_root: Path | None = None,
) -> IndexManifest:
    """`userpipe index`: a run's best checkpoint (or the checkpoint given) indexes a store split."""
    if image_root is not None and not image_root.is_dir():
        raise InputError(f"--image-root {image_root} is not a folder")
    source = checkpoint_dir(run, checkpoint)
    model, _, tokenizer = load_trained(source)
    return build_index(model, source, tokenizer, store, split, out, image_root)


def build_index(
    model: USER,
    checkpoint: Path,
    tokenizer: CaptionTokenizer,
    store: Path,
    split: str,
    out: Path,
    image_root: Path | None = None,
) -> IndexManifest:
    """Embed every valid image and caption of `split` into `out` (written whole or not at all)."""
    root, attrs = open_store(store)
    summary = attrs.splits.get(split)  # a split the store lacks: encode_split names it
    needed = 4 * model.config.embed_dim * (summary.num_images + summary.num_captions) if summary else 0
    with claim(out, INDEX, [store, checkpoint], needed=needed) as output:
        emb = encode_split(model, store, split, tokenizer)
        files = root[split]["file"][:]
        recorded_root = image_root.resolve() if image_root else attrs.image_root
        manifest = IndexManifest(
            model=IndexedModel(
                checkpoint=str(checkpoint.absolute()), sha256=model_sha256(checkpoint), config=model.config
            ),
            store=str(store.resolve()),
            split=split,
            image_root=str(recorded_root) if recorded_root else None,
            embed_dim=emb.images.shape[1],
            num_images=len(emb.images),
            num_captions=len(emb.captions),
            extractor=attrs.extractor,
        )
        with output.built(4 * manifest.embed_dim * (manifest.num_images + manifest.num_captions)) as folder:
            _write_index(folder, emb, files, manifest)
    return manifest


def _write_index(folder: Path, emb, files, manifest: IndexManifest) -> None:
    import faiss

    # serialized here and written by Python: faiss's own writer reports a full disk on stderr and as a
    # RuntimeError without the errno
    (folder / "images.faiss").write_bytes(faiss.serialize_index(_flat_ip(emb.images)).tobytes())
    (folder / "captions.faiss").write_bytes(faiss.serialize_index(_flat_ip(emb.captions)).tobytes())
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
