"""The Visual Genome bottom-up-attention detector on stock detectron2: `--regions butd-vg`.

The regions of every USER/SCAN/VSE number are this detector's kept boxes (Anderson et al., CVPR 2018,
"Bottom-Up and Top-Down Attention", released as a Caffe model with tools/generate_tsv.py): a Faster R-CNN
R101-C4 trained on Visual Genome whose proposals' res5 maps are mean-pooled to 2048-d. The network is
detectron2's GeneralizedRCNN built from a config file (pipeline/configs/butd_vg_r101_c4.yaml) with the
parts stock detectron2 lacks registered here: Caffe's stem max-pool, Caffe's anchors, a dilated res5 head
and the attribute head. The test-time steps follow the released Caffe code (py-faster-rcnn's proposal
layer, generate_tsv.py's box choice); checkpoints load through explicit key tables
(pipeline/butd_checkpoints.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import (
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    ROI_HEADS_REGISTRY,
    GeneralizedRCNN,
    build_model,
    build_resnet_backbone,
)
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes
from PIL import Image
from torch import nn
from torchvision.ops import nms

from userpipe.pipeline.butd_checkpoints import load_checkpoint
from userpipe.pipeline.detections import Detections
from userpipe.pipeline.regions import GPU_PER_LOCAL_WORKER, ImageRegions, butd_scale, clip_boxes
from userpipe.schemas.errors import InputError
from userpipe.schemas.store import ExtractorConfig, RegionConfig

CONFIG_DIR = Path(__file__).parent / "configs"
BUTD_DEFAULTS = {  # what stock detectron2 has no key for; the config file sets them
    "CAFFE_MAXPOOL": True,
    "NUM_ATTRIBUTES": 400,
    "ATTRIBUTE_EMBED_DIM": 256,
    "ATTRIBUTE_HIDDEN_DIM": 512,
    "RPN_MIN_SIZE": 16,
    "NMS_THRESH": 0.3,
    "CONF_THRESH": 0.2,
}


def config_file(name_or_path: str) -> Path:
    """A packaged config by name (pipeline/configs/NAME.yaml) or a detectron2 config file path."""
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    return packaged if packaged.is_file() else Path(name_or_path).expanduser()


def load_config(path: Path) -> CfgNode:
    cfg = get_cfg()
    cfg.USERPIPE_BUTD = CfgNode(dict(BUTD_DEFAULTS))
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"  # the extractor moves the model
    cfg.freeze()
    return cfg


# --------------------------------------------------------------------------- the network's parts


class CaffeStem(BasicStem):
    """Caffe's ResNet stem: its max-pool has no padding and rounds the output size up (ceil mode), so the
    maps, and every box's pooled cells, line up with the released model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_butd_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> nn.Module:
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.USERPIPE_BUTD.CAFFE_MAXPOOL:
        stem = CaffeStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.NORM)
        stem.load_state_dict(backbone.stem.state_dict())
        backbone.stem = stem
    return backbone


def caffe_cell_anchors(stride: int, sizes: list[float], ratios: list[float]) -> torch.Tensor:
    """py-faster-rcnn's generate_anchors (Ren et al. 2015): a stride-wide base box reshaped to each ratio
    with rounded sides, then scaled to each size; ratio-major, pixel-inclusive corners."""
    anchors = []
    center = (stride - 1) / 2
    for ratio in ratios:
        width = np.round(np.sqrt(stride * stride / ratio))
        height = np.round(width * ratio)
        for size in sizes:
            w, h = width * size / stride, height * size / stride
            anchors.append(
                [center - (w - 1) / 2, center - (h - 1) / 2, center + (w - 1) / 2, center + (h - 1) / 2]
            )
    return torch.tensor(anchors, dtype=torch.float32)


class _Anchors(nn.Module):
    """The cell anchors as a persistent buffer: the released checkpoints carry them, and the RPN's output
    channels follow their order."""

    def __init__(self, anchors: torch.Tensor):
        super().__init__()
        self.register_buffer("0", anchors)

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter(self._buffers.values())


@ANCHOR_GENERATOR_REGISTRY.register()
class CaffeAnchorGenerator(DefaultAnchorGenerator):
    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.0):
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)
        if len(strides) != 1:
            raise ValueError("the Caffe anchors are defined for one feature map (C4)")
        self.cell_anchors = _Anchors(caffe_cell_anchors(strides[0], sizes[0], aspect_ratios[0]))


class ButdBoxPredictor(FastRCNNOutputLayers):
    """Stock class and box outputs plus BUTD's attribute head: a box's pooled feature joined with an
    embedding of its predicted class (background included) -> linear -> ReLU -> attribute scores, the
    last one meaning "no attribute" (background last, as detectron2 orders classes)."""

    def __init__(self, cfg: CfgNode, input_shape: ShapeSpec):
        super().__init__(cfg, input_shape)
        butd, classes = cfg.USERPIPE_BUTD, cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.cls_embedding = nn.Embedding(classes + 1, butd.ATTRIBUTE_EMBED_DIM)
        self.fc_attr = nn.Linear(input_shape.channels + butd.ATTRIBUTE_EMBED_DIM, butd.ATTRIBUTE_HIDDEN_DIM)
        self.attr_score = nn.Linear(butd.ATTRIBUTE_HIDDEN_DIM, butd.NUM_ATTRIBUTES + 1)

    def attribute_logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([features, self.cls_embedding(classes)], dim=1)
        return self.attr_score(F.relu(self.fc_attr(joined)))


@ROI_HEADS_REGISTRY.register()
class ButdRes5ROIHeads(Res5ROIHeads):
    """Stock Res5ROIHeads with the released res5: stride 1 and dilation RES5_DILATION, so the 14x14
    pooled cells stay 14x14; and the attribute head."""

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape):
        ret = super().from_config(cfg, input_shape)
        res5_width = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        ret["box_predictor"] = ButdBoxPredictor(cfg, ShapeSpec(channels=res5_width, height=1, width=1))
        return ret

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode):
        resnets = cfg.MODEL.RESNETS
        out_channels = resnets.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[1, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP * 8,
            out_channels=out_channels,
            num_groups=resnets.NUM_GROUPS,
            norm=resnets.NORM,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            dilation=resnets.RES5_DILATION,
        )
        return nn.Sequential(*blocks), out_channels


# --------------------------------------------------------------------------- the released test-time steps


def inclusive_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Caffe's NMS, whose boxes include their last pixel (width x2 - x1 + 1)."""
    return nms(boxes + boxes.new_tensor([0, 0, 1, 1]), scores, threshold)


def caffe_proposals(
    anchors: torch.Tensor,
    objectness: torch.Tensor,
    deltas: torch.Tensor,
    height: int,
    width: int,
    scale: float,
    cfg: CfgNode,
) -> torch.Tensor:
    """py-faster-rcnn's proposal layer (lib/rpn/proposal_layer.py, as BUTD runs it): anchors moved by the
    deltas with pixel-inclusive sizes, clipped, boxes under RPN_MIN_SIZE (in original pixels) dropped,
    the PRE_NMS_TOPK best by objectness, NMS, then the POST_NMS_TOPK best. `anchors` (N, 4), `objectness`
    (N,) logits and `deltas` (N, 4) in the same anchor order."""
    widths = anchors[:, 2] - anchors[:, 0] + 1
    heights = anchors[:, 3] - anchors[:, 1] + 1
    center_x = anchors[:, 0] + 0.5 * widths + deltas[:, 0] * widths
    center_y = anchors[:, 1] + 0.5 * heights + deltas[:, 1] * heights
    half_w, half_h = 0.5 * torch.exp(deltas[:, 2]) * widths, 0.5 * torch.exp(deltas[:, 3]) * heights
    boxes = torch.stack([center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    min_size = cfg.USERPIPE_BUTD.RPN_MIN_SIZE * scale
    large = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_size)
    boxes, objectness = boxes[large], objectness[large]
    order = torch.argsort(objectness, descending=True, stable=True)[: cfg.MODEL.RPN.PRE_NMS_TOPK_TEST]
    boxes, objectness = boxes[order], objectness[order]
    keep = inclusive_nms(boxes, objectness, cfg.MODEL.RPN.NMS_THRESH)[: cfg.MODEL.RPN.POST_NMS_TOPK_TEST]
    return boxes[keep]


def rpn_outputs(model: GeneralizedRCNN, features: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's anchors (N, 4), objectness logits (N,) and box deltas (N, 4), all in the anchor grid's
    order: position by position (row-major), the cell anchors in turn at each (as Caffe's proposal layer
    flattens them)."""
    rpn = model.proposal_generator
    feature_maps = [features[f] for f in rpn.in_features]
    (objectness,), (deltas,) = rpn.rpn_head(feature_maps)  # (1, A, H, W), (1, A * 4, H, W)
    anchors = rpn.anchor_generator(feature_maps)[0].tensor
    height, width = objectness.shape[-2:]
    return (
        anchors,
        objectness[0].permute(1, 2, 0).reshape(-1),
        deltas[0].view(-1, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4),
    )


def kept_boxes(
    boxes: torch.Tensor,
    class_scores: torch.Tensor,
    nms_thresh: float,
    conf_thresh: float,
    min_boxes: int,
    max_boxes: int,
) -> torch.Tensor:
    """The proposals BUTD keeps (tools/generate_tsv.py, Anderson et al. 2018): a box's confidence is its
    highest foreground class score among the classes in which it survives NMS over all proposals; boxes
    reaching `conf_thresh` are kept (in proposal order) when they number within [min_boxes, max_boxes],
    else the `min_boxes` or `max_boxes` most confident. `class_scores` (N, C) excludes background."""
    confidence = torch.zeros(len(boxes), dtype=class_scores.dtype, device=class_scores.device)
    for c in range(class_scores.shape[1]):
        survivors = inclusive_nms(boxes, class_scores[:, c], nms_thresh)
        confidence[survivors] = torch.maximum(confidence[survivors], class_scores[survivors, c])
    passing = torch.nonzero(confidence >= conf_thresh).flatten()
    if min_boxes <= len(passing) <= max_boxes:
        return passing
    ranked = torch.argsort(confidence, descending=True, stable=True)
    return ranked[: min_boxes if len(passing) < min_boxes else max_boxes]


def worker_device(device: str) -> torch.device:
    """ "cpu"; "cuda": the worker's current device (dask-cuda's workers each see their own GPU first in
    CUDA_VISIBLE_DEVICES); GPU_PER_LOCAL_WORKER: worker n of this run's LocalCluster takes GPU n mod count."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if device != GPU_PER_LOCAL_WORKER:
        return torch.device(device)
    try:
        from distributed import get_worker

        name = int(get_worker().name)
    except ValueError:  # not in a Dask worker
        name = 0
    return torch.device("cuda", name % torch.cuda.device_count())


class ButdVgExtractor:
    """One image -> its kept boxes' features, boxes, object classes and attributes (BUTD's extraction)."""

    def __init__(self, config: ExtractorConfig, device: str = "cpu"):
        regions = config.regions
        self.cfg = load_config(Path(regions.detector_config.path))
        self.model: GeneralizedRCNN = build_model(self.cfg).eval()
        load_checkpoint(self.model, regions.detector_weights)
        self.device = worker_device(device)
        self.model.to(self.device)
        self.short_side = config.image_size
        self.max_boxes = config.num_regions
        self.min_boxes = regions.min_regions or config.num_regions

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, float]:
        """The network's input (BGR 0-255 minus the pixel mean, bilinearly resized as the released test:
        shorter side to `short_side`, longer side at most MAX/MIN of it) and the scale used."""
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
        height, width = rgb.shape[:2]
        bgr = rgb.flip(-1).permute(2, 0, 1)[None].to(self.device)
        input_cfg = self.cfg.INPUT
        scale = butd_scale(
            width,
            height,
            self.short_side,
            self.short_side * input_cfg.MAX_SIZE_TEST / input_cfg.MIN_SIZE_TEST,
        )
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        # cv2.resize(fx=fy=scale): the rounded size, sampled at (x + 0.5) / scale - 0.5 (F.interpolate
        # takes either a size or a scale, not both)
        resized = torch.ops.aten.upsample_bilinear2d(bgr, size, False, scale, scale)
        return (resized[0] - self.model.pixel_mean) / self.model.pixel_std, scale

    @torch.inference_mode()
    def __call__(self, image: Image.Image, annotated_boxes=None) -> ImageRegions:
        """The kept boxes (a dataset's annotated boxes are not used: the detector proposes its own)."""
        model, heads, cfg = self.model, self.model.roi_heads, self.cfg
        pixels, scale = self.pixels(image)
        height, width = pixels.shape[-2:]
        features = model.backbone(pixels[None])
        proposals = caffe_proposals(*rpn_outputs(model, features), height, width, scale, cfg)
        pooled = heads._shared_roi_transform([features[f] for f in heads.in_features], [Boxes(proposals)])
        pooled = pooled.mean(dim=(2, 3))
        predictor: ButdBoxPredictor = heads.box_predictor
        class_logits, _ = predictor(pooled)
        probs = F.softmax(class_logits.float(), dim=1)
        butd = cfg.USERPIPE_BUTD
        boxes = proposals / scale  # generate_tsv.py chooses among the proposals in original pixels
        keep = kept_boxes(
            boxes, probs[:, :-1], butd.NMS_THRESH, butd.CONF_THRESH, self.min_boxes, self.max_boxes
        )
        if not len(keep):
            raise ValueError(
                f"no proposal of at least {butd.RPN_MIN_SIZE} pixels survived in this "
                f"{image.size[0]}x{image.size[1]} image"
            )
        object_conf, object_id = probs[keep, :-1].max(dim=1)
        # the attribute head sees the argmax over every class, background included (as released)
        attribute_logits = predictor.attribute_logits(pooled[keep], class_logits[keep].argmax(dim=1))
        attribute_conf, attribute_id = F.softmax(attribute_logits.float(), dim=1)[:, :-1].max(dim=1)
        image_width, image_height = image.size
        boxes = clip_boxes(boxes[keep].cpu().numpy(), image_width, image_height)
        return ImageRegions(
            pooled[keep].float().cpu().numpy(),
            boxes,
            Detections(
                object_id.cpu().numpy().astype(np.int16),
                object_conf.cpu().numpy(),
                attribute_id.cpu().numpy().astype(np.int16),
                attribute_conf.cpu().numpy(),
            ),
        )


@dataclass(frozen=True)
class DetectorFacts:
    """What the driver needs before any work: the region width and the default input size."""

    feature_dim: int
    short_side: int


def checked_detector(regions: RegionConfig) -> DetectorFacts:
    """Build the network without memory (meta tensors) and check the checkpoint's keys and shapes
    against it, so a checkpoint that does not fit is refused before the store is created."""
    cfg = load_config(Path(regions.detector_config.path)).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception as exc:  # detectron2 asserts on inconsistent settings
        raise InputError(f"detector config {regions.detector_config.source} does not build: {exc}") from None
    generator = model.proposal_generator.anchor_generator
    if isinstance(
        generator, CaffeAnchorGenerator
    ):  # values, not meta placeholders, to check a file's against
        sizes, ratios = cfg.MODEL.ANCHOR_GENERATOR.SIZES[0], cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
        generator.cell_anchors = _Anchors(caffe_cell_anchors(generator.strides[0], sizes, ratios))
    load_checkpoint(model, regions.detector_weights, check_only=True)
    res5_width = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
    return DetectorFacts(res5_width, cfg.INPUT.MIN_SIZE_TEST)
