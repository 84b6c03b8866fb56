"""`userpipe eval --zero-shot MODEL:PRETRAINED`: the baseline every trained run is compared with — the
store's CLIP image globals against the split's captions embedded by the same open_clip model's text tower,
ranked under the same protocols as a run (CLIP, Radford et al. 2021, section 3.1.2: retrieval by the cosine
similarity of the two towers' embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from userpipe.pipeline.global_encoders import GlobalEncoder, resolve_global_config
from userpipe.schemas import threads
from userpipe.schemas.errors import InputError
from userpipe.trainer.encode import TEXT_BATCH, SplitEmbeddings, embed_split, split_rows


def _weights_sha(config) -> str | None:
    return config.weights.sha256 if config.weights else None


def zero_shot_embeddings(spec: str, store: Path, split: str, progress: bool = True) -> SplitEmbeddings:
    """The split's stored CLIP image globals and its captions embedded by `spec`'s text tower; `spec` must be
    the open_clip model (by name and weights content) the store was extracted with."""
    group, attrs, n, valid, keep = split_rows(store, split)
    stored = attrs.extractor.global_encoder
    if stored.kind != "open_clip" or "clip_image" not in group:
        raise InputError(
            f"--zero-shot needs a store extracted with an open_clip model (--clip MODEL:PRETRAINED); {store} "
            f"holds {'no global embeddings' if stored.kind == 'none' else stored.kind + ' globals'}"
        )
    try:
        config = resolve_global_config(spec)
    except InputError as exc:  # its messages name extract's option, which takes the same spec
        raise InputError(str(exc).replace("--clip", "--zero-shot")) from None
    if config.kind != "open_clip" or not config.text_dim:
        raise InputError(f"--zero-shot {spec}: not an open_clip MODEL:PRETRAINED with a text tower")
    if (config.model, _weights_sha(config)) != (stored.model, _weights_sha(stored)):
        weights = stored.weights.source if stored.weights else "?"
        raise InputError(
            f"--zero-shot {spec}: {store}'s image globals are from {stored.model} with weights {weights}; "
            "another model's text tower embeds captions in another space (pass --zero-shot "
            f"{stored.model_config_file or stored.model}:{weights})"
        )
    encoder = GlobalEncoder(config)

    def embed_images(rows: slice, ok: np.ndarray) -> torch.Tensor:
        stored_globals = torch.from_numpy(group["clip_image"][rows][ok].astype(np.float32))
        return torch.nn.functional.normalize(stored_globals, dim=-1)  # stored as float16

    def embed_texts(texts: list[str], on_batch) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            threads.adjust()
            batch = texts[start : start + TEXT_BATCH]
            out.append(torch.from_numpy(encoder.encode_texts(batch)))
            on_batch(len(batch))
        return torch.cat(out)

    return embed_split(group, split, n, valid, keep, embed_images, embed_texts, progress)


def zero_shot_label(spec: str) -> str:
    """The row's name: the model's (a model config file's stem)."""
    model = spec.split(":", 1)[0]
    return f"zero-shot {Path(model).stem if model.endswith('.json') else model} (open_clip)"
