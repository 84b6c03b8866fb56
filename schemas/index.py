"""Vector indexes: the contract between `userpipe index` and `userpipe search`.

An index is a folder:

  index.json      IndexManifest (below)
  images.faiss    faiss IndexFlatIP over the L2-normalized image embeddings, row i = images.jsonl line i
  images.jsonl    {"id", "file", "row"} per indexed image (file relative to `image_root`, row in the
                  store split)
  captions.faiss  the same over the caption embeddings, row j = captions.jsonl line j
  captions.jsonl  {"text", "image"} per caption, `image` = its row in images.jsonl

Embeddings are L2-normalized, so inner product = cosine similarity = the score eval ranks by.

Versions: 1.1 records the extractor configuration of the store the gallery came from, so an image-file
query is embedded from the index and checkpoint alone; 1.0 indexes (without it) still load and answer
text and image-id queries, and an image-file query names the rebuild command.
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
