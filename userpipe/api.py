"""userpipe from Python: the objects the commands work with, for a notebook or a script.

    import userpipe
    store = userpipe.open_store("data/demo.zarr")
    run = userpipe.load_run("runs/demo")
    image_ids, images = run.encode_images(store, "test")
    index = userpipe.open_index("runs/demo/index")

`userpipe info`, `eval`, `search` call these same functions (userpipe/cli.py); errors are `InputError`s
with the one-line messages the commands print.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from userpipe.retrieval.evaluate import evaluate_split
from userpipe.retrieval.search import Hit, SearchIndex
from userpipe.schemas.errors import InputError
from userpipe.schemas.run import RunConfig
from userpipe.schemas.sources import location
from userpipe.schemas.store import StoreAttrs
from userpipe.schemas.store_reader import open_store as _open_zarr_store
from userpipe.schemas.store_reader import store_split, store_summary
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import checkpoint_dir, load_trained
from userpipe.trainer.encode import SplitEmbeddings, encode_split, encode_texts
from userpipe.trainer.model import USER


@dataclass(frozen=True)
class Store:
    """A feature store written by `userpipe extract` (Zarr v3), read through its schema: every chunk read is
    checked against its checksum."""

    path: str | Path  # a folder or a URL
    root: object  # the checked group (schemas.store_reader.CheckedGroup)
    attrs: StoreAttrs

    def summary(self) -> dict:
        """What `userpipe info --json` prints: splits, arrays, extractor, failures, missing chunks."""
        return store_summary(self.path)

    def group(self, split: str):
        """The split's arrays (regions, boxes, num_regions, clip_image, caption_text, ...), checked reads."""
        return store_split(self.path, self.root, self.attrs, split)

    def captions(self, split: str) -> list[tuple[str, str]]:
        """(image id, caption) for every caption of the split."""
        group = self.group(split)
        ids = group["image_id"][:]
        return [
            (str(ids[i]), str(t))
            for i, t in zip(group["caption_image"][:], group["caption_text"][:], strict=True)
        ]


def open_store(path: str | Path) -> Store:
    """A store by its path or URL (refused in one line if it is not one, or of another schema)."""
    path = location(path)
    return Store(path, *_open_zarr_store(path))


def _store_path(store: Store | str | Path) -> str | Path:
    return store.path if isinstance(store, Store) else location(store)


@dataclass
class Run:
    """A trained model: a run's best checkpoint (or any checkpoint), in eval mode."""

    checkpoint: Path
    model: USER
    config: RunConfig
    tokenizer: CaptionTokenizer

    def encode_images(self, store: Store | str | Path, split: str = "test") -> tuple[list[str], torch.Tensor]:
        """The split's valid images: their ids and (N, E) L2-normalized embeddings."""
        embeddings = encode_split(
            self.model, _store_path(store), split, self.tokenizer, progress=False, with_captions=False
        )
        return embeddings.image_ids, embeddings.images

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), E) L2-normalized caption embeddings (`texts @ images.T`: what eval ranks)."""
        self.model.eval()
        return encode_texts(self.model, self.tokenizer, list(texts))

    def encode_split(self, store: Store | str | Path, split: str = "test") -> SplitEmbeddings:
        """Images and captions of a split, each once, as `userpipe eval` embeds them."""
        return encode_split(self.model, _store_path(store), split, self.tokenizer, progress=False)

    def evaluate(self, store: Store | str | Path, split: str = "test", protocol: str = "full") -> dict:
        """R@1/5/10, medr, meanr and RSUM, as `userpipe eval --protocol PROTOCOL` prints them."""
        path = _store_path(store)
        return evaluate_split(path, split, protocol, lambda: [self.encode_split(path, split)])


def load_run(path: str | Path | None = None, checkpoint: str | Path | None = None) -> Run:
    """A run directory's best checkpoint, or the checkpoint directory given."""
    directory = checkpoint_dir(
        None if path is None else Path(path),
        None if checkpoint is None else Path(checkpoint),
        "a run or a checkpoint",
    )
    model, config, tokenizer = load_trained(directory)
    model.eval()
    return Run(directory, model, config, tokenizer)


class Index:
    """An index written by `userpipe index` and the model its queries are embedded with: the checkpoint it
    records unless another is given, which must be the model that built it (checked by the weights' hash
    before anything loads; the model loads on the first query)."""

    def __init__(self, path: Path, checkpoint: Path | None = None, run: Run | None = None):
        self.searcher = SearchIndex(path)
        self._run = run
        recorded = Path(self.searcher.manifest.model.checkpoint)
        self.checkpoint = run.checkpoint if run else checkpoint_dir(None, checkpoint or recorded)
        self.searcher.check_model(self.checkpoint)

    @property
    def manifest(self):
        return self.searcher.manifest

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = load_run(checkpoint=self.checkpoint)
        return self._run

    def search(self, text: str, k: int = 5) -> list[Hit]:
        """The top-k images for a text (`userpipe search TEXT`); a caption of the gallery marks its image."""
        check_query(text, k)
        run = self.run
        return self.searcher.text_query(run.model, run.tokenizer, text, k)

    def search_image(self, query: str, k: int = 5) -> list[Hit]:
        """The top-k captions for an indexed image's id or an image file (`userpipe search --captions`)."""
        check_query(query, k)
        return self.searcher.image_query(self.run.model, query, k)

    def search_vectors(self, queries: torch.Tensor | np.ndarray, gallery: str = "images", k: int = 5):
        """(scores, rows) of the top-k gallery rows for (q, E) L2-normalized query embeddings."""
        return self.searcher.search(torch.as_tensor(queries, dtype=torch.float32), gallery, k)


def check_query(query: str, k: int) -> None:
    """A query and a count `search` can answer (refused in one line before anything loads)."""
    if not query.strip():
        raise InputError("the query is empty")
    if k <= 0:
        raise InputError(f"-k must be positive, got {k}")


def open_index(path: str | Path, run: Run | str | Path | None = None) -> Index:
    """An index folder, its queries embedded with `run` (a Run, or a run directory's best checkpoint) or by
    default with the checkpoint the index records."""
    if isinstance(run, Run):
        return Index(Path(path), run=run)
    return Index(Path(path), None if run is None else checkpoint_dir(Path(run), None))
