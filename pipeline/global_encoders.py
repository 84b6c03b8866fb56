"""Whole-image (and caption) global embeddings: open_clip models, or an ImageNet backbone for offline use.

`--clip` specs:
  MODEL:PRETRAINED     open_clip; MODEL is a config name or a path to a model-config .json,
                       PRETRAINED an open_clip pretrained tag or a local .pt/.safetensors file
  imagenet:BACKBONE[:PATH]  a region backbone's globally pooled ImageNet feature (not CLIP, no text tower)
  none                 no global embeddings
Every embedding is L2-normalized.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from userpipe.pipeline.regions import BACKBONES
from userpipe.pipeline.weights import load_weights, local_weights
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import GlobalConfig, WeightsRef

IMAGENET_GLOBAL_SIZE = 224
IMAGE_BATCH = 8  # larger CPU batches run slower per image (cache), measured on efficientnet_lite0


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _register_open_clip_model(model: str) -> tuple[str, str | None]:
    """Returns the open_clip model name and, for a config file, its resolved path."""
    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        return path.stem, str(path.resolve())
    if model not in open_clip.list_models():
        raise InputError(
            f"unknown open_clip model '{model}' (see open_clip.list_models(), or pass a config .json)"
        )
    return model, None


def _cached_open_clip_file(cfg: dict) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        for name in (HF_SAFE_WEIGHTS_NAME, filename or HF_WEIGHTS_NAME):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        local = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    return None


def _open_clip_weights(model: str, pretrained: str) -> WeightsRef:
    import open_clip

    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or Path(pretrained).is_file():
        return local_weights(pretrained, "open_clip")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise InputError(
            f"unknown pretrained tag '{pretrained}' for {model} (known: {', '.join(tags) or 'none'})"
        )
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    path = _cached_open_clip_file(cfg)
    if path is None:  # a hub tag not in the local cache: the user asked for a download
        unreachable = (
            f"pretrained tag '{pretrained}' for {model} must be downloaded and no model hub is "
            "reachable ({}); download the weights elsewhere and pass "
            f"--clip {model}:/path/to/open_clip_model.safetensors"
        )
        if _hub_offline():
            raise InputError(unreachable.format("HF_HUB_OFFLINE is set"))
        try:
            path = open_clip.download_pretrained(cfg)
        except (OSError, RuntimeError, ValueError) as exc:  # hub and urllib errors are OSError subclasses
            raise InputError(unreachable.format(type(exc).__name__)) from None
    ref = local_weights(path, "open_clip")
    return ref.model_copy(update={"source": pretrained})


def resolve_global_config(spec: str) -> GlobalConfig:
    """Parse and validate a `--clip` spec, resolve its weights file and read its embedding dims."""
    if spec == "none":
        return GlobalConfig(kind="none")
    head, _, rest = spec.partition(":")
    if head == "imagenet":
        backbone, _, path = rest.partition(":")
        if backbone not in BACKBONES:
            raise InputError(
                f"unknown backbone '{backbone}' in --clip {spec}: choose from {', '.join(BACKBONES)}"
            )
        backbone_spec = BACKBONES[backbone]
        weights = local_weights(path, "global backbone") if path else backbone_spec.default_weights()
        return GlobalConfig(
            kind="imagenet", model=backbone, weights=weights, image_dim=backbone_spec.feature_dim
        )
    if not rest:
        raise InputError(
            f"--clip {spec} names no weights: use MODEL:PRETRAINED (a tag or a weights file), "
            "imagenet:BACKBONE, or none"
        )
    import open_clip

    model, config_file = _register_open_clip_model(head)
    weights = _open_clip_weights(model, rest)
    embed_dim = open_clip.get_model_config(model)["embed_dim"]
    return GlobalConfig(
        kind="open_clip",
        model=model,
        model_config_file=config_file,
        weights=weights,
        image_dim=embed_dim,
        text_dim=embed_dim,
    )


def _l2_normalize(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


class GlobalEncoder:
    """Embeds images and captions as configured; `has_text` is False for ImageNet backbones."""

    def __init__(self, config: GlobalConfig):
        self.config = config
        self.has_text = bool(config.text_dim)
        if config.kind == "open_clip":
            import open_clip

            if config.model_config_file:
                open_clip.add_model_config(config.model_config_file)
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                config.model, pretrained=config.weights.path
            )
            self.model = model.eval()
            self.tokenizer = open_clip.get_tokenizer(config.model)
        elif config.kind == "imagenet":
            spec = BACKBONES[config.model]
            model, trunk, head = spec.build()
            load_weights(model, config.weights, by_order=spec.weights_by_order)
            self.model = torch.nn.Sequential(trunk, head).eval().to(memory_format=torch.channels_last)
            self.mean = torch.tensor(spec.mean).view(3, 1, 1)
            self.std = torch.tensor(spec.std).view(3, 1, 1)
            self.preprocess = self._imagenet_preprocess
        else:
            raise ValueError("GlobalEncoder needs a model; kind 'none' has none")

    def _imagenet_preprocess(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import center_crop, resize, to_tensor

        image = center_crop(resize(image.convert("RGB"), IMAGENET_GLOBAL_SIZE), IMAGENET_GLOBAL_SIZE)
        return (to_tensor(image) - self.mean) / self.std

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return np.concatenate(
            [self._encode_batch(images[i : i + IMAGE_BATCH]) for i in range(0, len(images), IMAGE_BATCH)]
        )

    def _encode_batch(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.preprocess(im) for im in images])
        if self.config.kind == "open_clip":
            return _l2_normalize(self.model.encode_image(batch))
        return _l2_normalize(self.model(batch.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _l2_normalize(self.model.encode_text(self.tokenizer(texts)))
