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

INDEX_SCHEMA_VERSION = "1.1"
MANIFEST_NAME = "index.json"
GALLERIES = ("images", "captions")


class IndexedModel(Frozen):
    checkpoint: str = Field(description="checkpoint directory the embeddings came from, as resolved then")
    sha256: str = Field(description="hash of its model.safetensors: the identity search checks")
    config: ModelConfig


class IndexManifest(Frozen):
    schema_version: Literal["1.0", "1.1"] = INDEX_SCHEMA_VERSION
    kind: Literal["faiss.IndexFlatIP"] = "faiss.IndexFlatIP"
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

    @model_validator(mode="after")
    def _extractor_recorded(self) -> IndexManifest:
        if self.schema_version != "1.0" and self.extractor is None:
            raise ValueError(f"an index of schema {self.schema_version} records its extractor")
        return self


def read_index_manifest(folder: Path) -> IndexManifest:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} is not an index (no {MANIFEST_NAME}; build one with userpipe index)")
    return read_model(IndexManifest, path, "index manifest", ManifestError)
