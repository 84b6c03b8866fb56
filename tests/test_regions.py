from pathlib import Path

import numpy as np
import pytest
import torch
from kit import extractor_config
from PIL import Image

from userpipe.pipeline.region_kinds import region_kind, resolve_region_config
from userpipe.pipeline.regions import grid_boxes, pad_with_grid
from userpipe.schemas.errors import InputError


def assert_valid_boxes(boxes: np.ndarray, width: int, height: int, count: int):
    assert boxes.shape == (count, 4) and boxes.dtype == np.float32
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_grid_tiles_the_image_exactly():
    boxes = grid_boxes(640, 480, 36)
    assert_valid_boxes(boxes, 640, 480, 36)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area == pytest.approx(640 * 480)
    assert len({tuple(b) for b in boxes}) == 36


def test_padding_keeps_given_boxes_first_and_clips_them():
    boxes = pad_with_grid(np.array([[-5, 10, 50, 900], [1, 2, 3, 4]]), 100, 80, 5)
    np.testing.assert_array_equal(boxes[:2], [[0, 10, 50, 80], [1, 2, 3, 4]])
    assert_valid_boxes(boxes, 100, 80, 5)
    assert len(pad_with_grid(np.zeros((40, 4)) + [0, 0, 1, 1], 100, 80, 36)) == 36
    np.testing.assert_array_equal(
        pad_with_grid(None, 100, 80, 6), grid_boxes(100, 80, 6)
    )  # an image without boxes


def test_packaged_backbone_gives_finite_distinct_features_per_box():
    config = extractor_config(resolve_region_config("boxes", None, "efficientnet_lite0", None, None))
    extractor = region_kind("boxes").build(config, "cpu")
    image = Image.new("RGB", (160, 120), (90, 90, 90))
    image.paste((220, 30, 30), (10, 10, 60, 60))
    found = extractor(image, [[10, 10, 60, 60]])
    features, boxes = found.features, found.boxes
    assert features.shape == (36, 1280) and np.isfinite(features).all()
    assert_valid_boxes(boxes, 160, 120, 36)
    np.testing.assert_array_equal(boxes[0], [10, 10, 60, 60])
    # the red square's region differs from a grey background cell
    assert np.linalg.norm(features[0] - features[-1]) > 0.1 * np.linalg.norm(features[0])


@pytest.mark.slow
def test_butd_with_local_detector_and_resnet_weights(tmp_path: Path):
    from torchvision.models import resnet50
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    torch.save(
        fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), tmp_path / "det.pth"
    )
    torch.save(resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    regions = resolve_region_config(
        "butd", None, "resnet50", str(tmp_path / "r50.pth"), str(tmp_path / "det.pth")
    )
    assert regions.detector == "fasterrcnn_resnet50_fpn" and len(regions.detector_weights.sha256) == 64
    config = extractor_config(regions, num_regions=10, feature_dim=2048, image_size=96)
    extractor = region_kind("butd").build(config, "cpu")
    found = extractor(Image.new("RGB", (128, 96), (30, 120, 200)))
    features, boxes = found.features, found.boxes
    assert features.shape == (10, 2048) and np.isfinite(features).all()
    assert_valid_boxes(boxes, 128, 96, 10)


def test_unknown_names_and_missing_weights_are_input_errors(tmp_path: Path):
    with pytest.raises(InputError, match="unknown backbone 'vgg'"):
        resolve_region_config("grid", None, "vgg", None, None)
    with pytest.raises(InputError, match="unknown region kind 'slic'"):
        resolve_region_config("slic", None, "efficientnet_lite0", None, None)
    with pytest.raises(InputError, match="weights file not found"):
        resolve_region_config("grid", None, "efficientnet_lite0", str(tmp_path / "none.pth"), None)
    torch.save({"a": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="do not fit"):  # found where the options are read, not in a task
        resolve_region_config("grid", None, "efficientnet_lite0", str(tmp_path / "wrong.pth"), None)
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(InputError, match=r"notes.pth is not a weights file torch can read \(UnpicklingError"):
        resolve_region_config("grid", None, "efficientnet_lite0", str(tmp_path / "notes.pth"), None)


def test_packaged_efficientnet_weights_are_real_imagenet_weights():
    """Loaded key-by-order from the package file, the model still recognises scikit-image's cat photo."""
    from skimage.data import chelsea

    from userpipe.pipeline.regions import BACKBONES

    spec = BACKBONES["efficientnet_lite0"]
    model, _, _ = spec.build()
    from userpipe.pipeline.weights import load_weights

    load_weights(model, spec.default_weights(), by_order=True)
    pixels = torch.from_numpy(chelsea()).permute(2, 0, 1).float()[None] / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        label = model.eval()((pixels - mean) / std).argmax().item()
    assert 281 <= label <= 285  # ImageNet's domestic cat classes (tabby, tiger cat, Persian, ...)
