"""`userpipe search`: a query embedded with the model that built the index, looked up in it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from userpipe.retrieval import ann
from userpipe.retrieval.index import model_sha256
from userpipe.schemas import threads
from userpipe.schemas.errors import InputError
from userpipe.schemas.index import GALLERIES, read_index_manifest
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.encode import encode_regions, encode_texts
from userpipe.trainer.model import USER


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    row: int  # row in the gallery's .jsonl
    item: dict  # that row: {"id", "file", "row"} for images, {"text", "image"} for captions
    correct: bool | None  # a ground-truth match; None when the query has no known match
    image_id: str  # the image's id: the hit's own, or a caption's image's


class SearchIndex:
    def __init__(self, folder: Path):
        self.manifest = read_index_manifest(folder)
        self.folder = folder
        try:
            self.items = {
                g: [json.loads(line) for line in (folder / f"{g}.jsonl").read_text().splitlines()]
                for g in GALLERIES
            }
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{folder} is an incomplete index ({exc}): rebuild it with userpipe index"
            ) from None
        expected = {"images": self.manifest.num_images, "captions": self.manifest.num_captions}
        for gallery, rows in self.items.items():
            if len(rows) != expected[gallery]:
                raise InputError(
                    f"{folder}/{gallery}.jsonl has {len(rows)} rows, the manifest says "
                    f"{expected[gallery]}: rebuild the index"
                )
        self.image_row = {item["id"]: row for row, item in enumerate(self.items["images"])}
        self._faiss: dict = {}

    def check_model(self, checkpoint: Path) -> None:
        """Embeddings of another model live in another space: refuse instead of returning noise."""
        if model_sha256(checkpoint) != self.manifest.model.sha256:
            raise InputError(
                f"{self.folder} was built with the model in {self.manifest.model.checkpoint}, not "
                f"{checkpoint}; rebuild it with userpipe index"
            )

    def file(self, image_row: int) -> Path | None:
        file = self.items["images"][image_row]["file"]
        root = self.manifest.image_root
        return Path(root) / file if root and file else None

    def search(self, queries: torch.Tensor, gallery: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, E) L2-normalized queries -> (q, k') scores and gallery rows, best first; k' = min(k, size)."""
        index = self._index(gallery)
        threads.adjust()
        return index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, index.ntotal))

    def _index(self, gallery: str):
        import faiss

        if gallery not in self._faiss:
            path = self.folder / f"{gallery}.faiss"
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as exc:
                raise InputError(
                    f"{path} is damaged ({str(exc).splitlines()[-1][:160]}): rebuild the index "
                    "with userpipe index"
                ) from None
            expected = self.manifest.num_images if gallery == "images" else self.manifest.num_captions
            if index.ntotal != expected or index.d != self.manifest.embed_dim:
                raise InputError(
                    f"{path} holds {index.ntotal} x {index.d}, the manifest says {expected} x "
                    f"{self.manifest.embed_dim}: rebuild the index with userpipe index"
                )
            if self.manifest.galleries:  # the search setting tuned at build (nprobe, efSearch)
                ann.set_search(index, self.manifest.galleries[gallery].search)
            self._faiss[gallery] = index
        return self._faiss[gallery]

    def text_query(self, model: USER, tokenizer: CaptionTokenizer, text: str, k: int) -> list[Hit]:
        """Top-k images for a text; an exact caption of the gallery marks its image correct."""
        model.eval()
        scores, rows = self.search(encode_texts(model, tokenizer, [text]), "images", k)
        truth = {c["image"] for c in self.items["captions"] if c["text"].strip() == text.strip()}
        return self._hits(scores[0], rows[0], "images", lambda row: row in truth if truth else None)

    def image_query(self, model: USER, query: str, k: int) -> list[Hit]:
        """Top-k captions for an image: the id of an indexed image (its embedding as the index holds it,
        decoded from its codes for ivfpq; its captions are correct), or an image file (embedded with the
        extractor the index records, and `model`)."""
        from userpipe.pipeline.features import image_file_features

        own = self.image_row.get(query)
        if own is not None:
            embedding = torch.from_numpy(self._index("images").reconstruct(own))[None]
        elif Path(query).is_file():
            extractor = self.manifest.extractor
            if extractor is None:
                raise InputError(
                    f"{self.folder} is an index of schema 1.0, which does not record its extractor; "
                    "rebuild it with userpipe index to query it with image files"
                )
            features, count, global_embedding = image_file_features(extractor, Path(query))
            cge = model.config.enhancement == "cge"
            model.eval()
            embedding = encode_regions(
                model, features[None], np.array([count]), global_embedding[None] if cge else None
            )
        else:
            raise InputError(f"'{query}' is neither an image file nor the id of an image in {self.folder}")
        scores, rows = self.search(embedding, "captions", k)
        return self._hits(
            scores[0],
            rows[0],
            "captions",
            lambda row: None if own is None else self.items["captions"][row]["image"] == own,
        )

    def _hits(self, scores, rows, gallery: str, correct) -> list[Hit]:
        hits = []
        found = [(score, row) for score, row in zip(scores, rows, strict=True) if row >= 0]
        # (an approximate index pads with row -1 when the lists it probes hold fewer than k vectors)
        for rank, (score, row) in enumerate(found, start=1):
            item = self.items[gallery][row]
            image = item if gallery == "images" else self.items["images"][item["image"]]
            hits.append(Hit(rank, float(score), int(row), item, correct(int(row)), image["id"]))
        return hits
