"""`--regions butd`: boxes from torchvision's COCO Faster R-CNN (R50-FPN, score >= 0.2, topped up with a
grid), pooled BUTD-style from a backbone: a CPU-friendly stand-in for the Visual Genome detector (butd-vg)."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import pooled_kind, register

DETECTOR = "fasterrcnn_resnet50_fpn"
DETECTOR_WEIGHTS = "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
SCORE_THRESH = 0.2  # the bottom-up-attention forks' conf_thresh


def _detector_fields(options) -> dict:
    from userpipe.pipeline.weights import local_weights, torchvision_weights

    weights = (
        local_weights(options.detector_weights, "detector")
        if options.detector_weights
        else torchvision_weights(DETECTOR_WEIGHTS, "detector", "--detector-weights")
    )
    return {"detector": DETECTOR, "detector_weights": weights}


def _detected(config, device: str):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from userpipe.pipeline.regions import BUTD_LONG_SIDE, BUTD_SHORT_SIDE, pad_with_grid
    from userpipe.pipeline.weights import load_weights

    detector = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        box_detections_per_img=config.num_regions,
        box_score_thresh=SCORE_THRESH,
        min_size=config.image_size,
        max_size=int(config.image_size * BUTD_LONG_SIDE / BUTD_SHORT_SIDE),
    )
    load_weights(detector, config.regions.detector_weights)
    detector.eval().to(device)

    def propose(width, height, annotated, pixels):
        found = detector([pixels])[0]["boxes"].cpu().numpy()  # sorted by score, NMS applied
        return pad_with_grid(found, width, height, config.num_regions)

    return propose


register(
    pooled_kind(
        "butd",
        "torchvision's COCO Faster R-CNN boxes, BUTD pooling",
        _detected,
        reads=("detector_weights",),
        resolve_more=_detector_fields,
    )
)
