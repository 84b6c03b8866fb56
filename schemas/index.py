"""Vector indexes: the contract between `userpipe index` and `userpipe search`: the manifest
(`IndexManifest`, index.json) and the rows of images.jsonl and captions.jsonl beside the two faiss indexes.
The folder's layout and its versions: docs/architecture.md, "Using a trained model".
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from userpipe.schemas.base import Frozen, read_model
from userpipe.schemas.errors import ManifestError
from userpipe.schemas.run import ModelConfig
from userpipe.schemas.store import ExtractorConfig

INDEX_SCHEMA_VERSION = "1.2"  # 1.2: the index kind per gallery and its recall against exact search
MANIFEST_NAME = "index.json"
GALLERIES = ("images", "captions")


class IndexedModel(Frozen):
    checkpoint: str = Field(description="checkpoint directory the embeddings came from, as resolved then")
    sha256: str = Field(description="hash of its model.safetensors: the identity search checks")
    config: ModelConfig


class Recall(Frozen):
    """K-recall@K against exact search: the mean share of a query's exact top K in the index's top K."""

    r1: float = Field(ge=0, le=1)
    r5: float = Field(ge=0, le=1)
    r10: float = Field(ge=0, le=1)


class GalleryIndex(Frozen):
    """One gallery's faiss index as built (retrieval/ann.py)."""

    factory: str = Field(min_length=1, description="its faiss.index_factory description")
    search: str = Field(description="the faiss search setting tuned at build (e.g. nprobe=8); '' for exact")
    bytes: int = Field(ge=0, description="its serialized size")
    recall: Recall = Field(description="measured at build on the other gallery's embeddings as queries")
    queries: int = Field(ge=0, description="how many queries the recall was measured on")


class IndexManifest(Frozen):
    schema_version: Literal["1.0", "1.1", "1.2"] = INDEX_SCHEMA_VERSION
    kind: Literal["flat", "ivf", "hnsw", "ivfpq"] = "flat"
    galleries: dict[Literal["images", "captions"], GalleryIndex] | None = Field(
        None, description="each gallery's index (1.2; None before: exact IndexFlatIP)"
    )
    model: IndexedModel
    store: str = Field(description="the feature store the gallery was read from")
    split: str
    image_root: str | None = Field(description="folder the image files are relative to (None: unknown)")
    embed_dim: int = Field(gt=0)
    num_images: int = Field(gt=0)
    num_captions: int = Field(gt=0)
    extractor: ExtractorConfig | None = Field(
        None, description="the store's extractor: what embeds an image-file query (1.1; None in 1.0 indexes)"
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_before_1_2(cls, data):
        if isinstance(data, dict) and data.get("kind") == "faiss.IndexFlatIP":  # 1.0 and 1.1 named it so
            data = {**data, "kind": "flat"}
        return data

    @model_validator(mode="after")
    def _extractor_recorded(self) -> IndexManifest:
        if self.schema_version != "1.0" and self.extractor is None:
            raise ValueError(f"an index of schema {self.schema_version} records its extractor")
        if self.schema_version not in ("1.0", "1.1") and set(self.galleries or ()) != set(GALLERIES):
            raise ValueError(f"an index of schema {self.schema_version} records both galleries' indexes")
        return self


def read_index_manifest(folder: Path) -> IndexManifest:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} is not an index (no {MANIFEST_NAME}; build one with userpipe index)")
    return read_model(IndexManifest, path, "index manifest", ManifestError)
