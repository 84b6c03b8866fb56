"""`--regions butd-vg`: the Visual Genome BUTD detector on detectron2, its two checkpoint formats, the
released test-time steps against plain references, extraction into the store, and the npz/TSV export."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from kit import extractor_config as config_with
from kit import karpathy_record, kill_at_first_done_chunk, run_cli, tree_bytes, write_json
from PIL import Image

pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2' (README: The Visual Genome detector)",
)

from detectron2.modeling import build_model  # noqa: E402
from torchvision.ops import roi_pool  # noqa: E402

from userpipe.pipeline.butd_checkpoints import file_state, load_checkpoint, write_checkpoint  # noqa: E402
from userpipe.pipeline.butd_vg import (  # noqa: E402
    ButdVgExtractor,
    caffe_proposals,
    config_file,
    kept_boxes,
    load_config,
    rpn_outputs,
    worker_device,
)
from userpipe.pipeline.region_kinds import resolve_region_config  # noqa: E402
from userpipe.schemas.errors import InputError  # noqa: E402
from userpipe.schemas.store import DETECTION_ARRAYS, WeightsRef  # noqa: E402

# The packaged config at toy widths: every part of the real network, a few MB of weights. Its pixel std
# keeps a random network's class scores unsaturated (saturated, every box ties with every other).
TINY_CONFIG = """_BASE_: {base}
MODEL:
  PIXEL_STD: [64.0, 64.0, 64.0]
  RESNETS: {{DEPTH: 50, STEM_OUT_CHANNELS: 8, RES2_OUT_CHANNELS: 16, WIDTH_PER_GROUP: 4}}
  RPN: {{CONV_DIMS: [16], PRE_NMS_TOPK_TEST: 400, POST_NMS_TOPK_TEST: 80}}
  ROI_HEADS: {{NUM_CLASSES: 30}}
USERPIPE_BUTD: {{NUM_ATTRIBUTES: 12, ATTRIBUTE_EMBED_DIM: 8, ATTRIBUTE_HIDDEN_DIM: 16}}
"""
FEATURE_DIM = 16 * 8  # res5 of the tiny config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny config and one random network in both file formats. The RPN's box deltas are zeroed, so
    proposals are the anchors themselves (random deltas blow every box up to the whole image)."""
    folder = tmp_path_factory.mktemp("butd")
    config = folder / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(base=config_file("butd_vg_r101_c4")))
    torch.manual_seed(0)
    state = build_model(load_config(config)).state_dict()
    state["proposal_generator.rpn_head.anchor_deltas.weight"].zero_()
    files = {"airsplay": folder / "tiny.pkl", "milvlg": folder / "tiny.pth"}
    for fmt, path in files.items():
        write_checkpoint(state, path, fmt)
    return {"config": config, "state": state, "files": files, "folder": folder}


def extractor_config(tiny: dict, fmt: str = "airsplay", num_regions: int = 36, min_regions=None, size=600):
    regions = resolve_region_config(
        "butd-vg", None, None, None, str(tiny["files"][fmt]), str(tiny["config"]), min_regions
    )
    return config_with(regions, num_regions, FEATURE_DIM, size, chunk_size=2)


def photo(seed: int, size=(200, 150)) -> Image.Image:
    """A smooth image with a few solid shapes (random noise would give the detector nothing to rank)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        pixels[y : y + rng.integers(10, 60), x : x + rng.integers(10, 80)] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["airsplay", "milvlg"])
def test_both_checkpoint_formats_load_every_key_and_give_back_the_network(tiny, fmt):
    model = build_model(load_config(tiny["config"]))
    load_checkpoint(model, WeightsRef(source=fmt, path=str(tiny["files"][fmt])))
    loaded = model.state_dict()
    assert loaded.keys() == tiny["state"].keys()
    assert all(torch.equal(loaded[k], tiny["state"][k]) for k in loaded)


def test_the_key_tables_match_the_released_checkpoints_shapes():
    """The facts the tables were derived from, at the real config (on the meta device: no memory)."""
    cfg = load_config(config_file("butd_vg_r101_c4")).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    airsplay, milvlg = file_state(state, "airsplay"), file_state(state, "milvlg")
    assert len(airsplay) == 536  # 104 convolutions with 4-buffer norms, RPN, predictor, attributes, anchors
    shapes = {
        "roi_heads.box_predictor.cls_score.weight": ((1601, 2048), (1601, 2048)),
        "roi_heads.box_predictor.bbox_pred.weight": ((6400, 2048), (6404, 2048)),
        "proposal_generator.rpn_head.objectness_logits.weight": ((12, 512, 1, 1), (24, 512, 1, 1)),
        "roi_heads.res5.0.conv1.weight": ((512, 1024, 1, 1), (512, 1024, 1, 1)),
        "backbone.res4.22.conv3.weight": ((1024, 256, 1, 1), (1024, 256, 1, 1)),
    }
    for key, (ours, theirs) in shapes.items():
        assert tuple(airsplay[key].shape) == ours and tuple(milvlg[key].shape) == theirs, key
    assert tuple(milvlg["roi_heads.box_predictor.cls_embed.weight"].shape) == (1601, 256)
    assert tuple(milvlg["roi_heads.box_predictor.attr_linear2.weight"].shape) == (401, 512)
    assert tuple(airsplay["roi_heads.box_predictor.fc_attr.weight"].shape) == (512, 2304)
    assert "backbone.res4.0.conv1.norm.num_batches_tracked" in milvlg
    assert "backbone.res3.0.conv1.norm.num_batches_tracked" not in milvlg  # frozen there


def test_milvlg_weights_give_the_caffe_probabilities_our_network_computes(tiny):
    """Read MILVLG's tensors as Caffe uses them: an anchor's object probability is the softmax of its
    (background channel a, object channel A + a) pair; class probabilities are a softmax over 1 + C rows,
    background first; the attribute head embeds a class by its Caffe row."""
    theirs, ours = file_state(tiny["state"], "milvlg"), tiny["state"]
    x = torch.randn(5, ours["proposal_generator.rpn_head.objectness_logits.weight"].shape[1])
    pairs = x @ theirs["proposal_generator.rpn_head.objectness_logits.weight"][:, :, 0, 0].T
    pairs = pairs + theirs["proposal_generator.rpn_head.objectness_logits.bias"]
    anchors = pairs.shape[1] // 2
    caffe = torch.softmax(torch.stack([pairs[:, :anchors], pairs[:, anchors:]]), dim=0)[1]
    logits = x @ ours["proposal_generator.rpn_head.objectness_logits.weight"][:, :, 0, 0].T
    torch.testing.assert_close(
        torch.sigmoid(logits + ours["proposal_generator.rpn_head.objectness_logits.bias"]), caffe
    )

    pooled = torch.randn(5, FEATURE_DIM)
    caffe_probs = torch.softmax(
        pooled @ theirs["roi_heads.box_predictor.cls_score.weight"].T
        + theirs["roi_heads.box_predictor.cls_score.bias"],
        dim=1,
    )
    our_probs = torch.softmax(
        pooled @ ours["roi_heads.box_predictor.cls_score.weight"].T
        + ours["roi_heads.box_predictor.cls_score.bias"],
        dim=1,
    )
    torch.testing.assert_close(our_probs[:, :-1], caffe_probs[:, 1:])  # object c: our row c, Caffe's c + 1
    torch.testing.assert_close(our_probs[:, -1], caffe_probs[:, 0])  # background
    embedding = "roi_heads.box_predictor.cls_embedding.weight"
    torch.testing.assert_close(ours[embedding][:-1], theirs["roi_heads.box_predictor.cls_embed.weight"][1:])
    deltas = "roi_heads.box_predictor.bbox_pred.weight"
    torch.testing.assert_close(ours[deltas], theirs[deltas][4:])  # Caffe's first 4 rows: the background box


def test_anchors_other_than_the_configs_are_refused(tiny, tmp_path):
    def detectron2_order(state):  # the same boxes, size-major as stock detectron2 would list them
        anchors = state["proposal_generator.anchor_generator.cell_anchors.0"]
        state["proposal_generator.anchor_generator.cell_anchors.0"] = (
            anchors.view(3, 4, 4).transpose(0, 1).reshape(12, 4)
        )

    message = _refusal(tiny, "airsplay", detectron2_order, tmp_path)
    assert "differs from the config's Caffe anchors" in message


def _refusal(tiny, fmt: str, change, tmp_path: Path) -> str:
    state = file_state(tiny["state"], fmt)
    change(state)
    path = tmp_path / f"bad.{fmt}"
    if fmt == "airsplay":
        import pickle

        path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}}))
    else:
        torch.save({"model": state}, path)
    model = build_model(load_config(tiny["config"]))
    with pytest.raises(InputError) as caught:
        load_checkpoint(model, WeightsRef(source=str(path), path=str(path)))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fmt", ["airsplay", "milvlg"])
def test_a_renamed_key_or_another_shape_is_refused_naming_it(tiny, fmt, tmp_path):
    keys = sorted(file_state(tiny["state"], fmt))
    rng = np.random.default_rng(7)
    for key in rng.choice([k for k in keys if not k.endswith("cell_anchors.0")], 6, replace=False):
        renamed = key.replace(".", "._", 1)

        def rename(state, key=key, renamed=renamed):
            state[renamed] = state.pop(key)

        message = _refusal(tiny, fmt, rename, tmp_path)
        assert "1 missing" in message and key in message and renamed in message, message

        def reshape(state, key=key):
            state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)

        message = _refusal(tiny, fmt, reshape, tmp_path)
        assert "another shape" in message and key in message, message


def test_files_that_are_no_checkpoint_are_one_line_errors(tiny, tmp_path):
    model = build_model(load_config(tiny["config"]))
    cases = {
        "empty.pkl": b"",
        "text.pth": b"not a checkpoint",
        "cut.pth": tiny["files"]["milvlg"].read_bytes()[:5000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    import pickle

    (tmp_path / "code.pkl").write_bytes(pickle.dumps({"model": {"x": os.system}}))  # never run
    (tmp_path / "other.pth").write_bytes(b"")
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    for name in [*cases, "code.pkl", "other.pth"]:
        with pytest.raises(InputError) as caught:
            load_checkpoint(model, WeightsRef(source=name, path=str(tmp_path / name)))
        assert name in str(caught.value) and "\n" not in str(caught.value)


def test_airsplay_folded_norms_load_as_unit_statistics(tiny, tmp_path):
    import pickle

    state = {k: v.numpy() for k, v in file_state(tiny["state"], "airsplay").items()}
    folded = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var"))}
    (tmp_path / "folded.pkl").write_bytes(pickle.dumps({"model": folded, "__author__": "test"}))
    model = build_model(load_config(tiny["config"]))
    load_checkpoint(model, WeightsRef(source="folded", path=str(tmp_path / "folded.pkl")))
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.res2.0.conv1.norm.running_var"], torch.ones(4))
    assert torch.equal(loaded["roi_heads.res5.0.conv1.norm.running_mean"], torch.zeros(32))
    assert torch.equal(loaded["backbone.stem.conv1.weight"], tiny["state"]["backbone.stem.conv1.weight"])


# --------------------------------------------------------------------------- the released steps


def plain_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """py-faster-rcnn's nms.py, pixel-inclusive areas."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind="stable")[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[1:][overlap <= threshold]
    return keep


def plain_kept_boxes(boxes, scores, conf_thresh, min_boxes, max_boxes):
    """generate_tsv.py's get_detections_from_im, as released (scores include background, column 0)."""
    max_conf = np.zeros(len(boxes))
    for c in range(1, scores.shape[1]):
        keep = np.array(plain_nms(boxes, scores[:, c], 0.3))
        max_conf[keep] = np.where(scores[keep, c] > max_conf[keep], scores[keep, c], max_conf[keep])
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:max_boxes]
    return keep_boxes


@pytest.mark.parametrize("seed", range(4))
def test_kept_boxes_equal_generate_tsv(seed):
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 400, (120, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(8, 200, (120, 2))], 1).astype(np.float32)
    logits = rng.normal(0, 3, (120, 41)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for min_boxes, max_boxes, conf in [(36, 36, 0.2), (10, 100, 0.2), (10, 100, 0.05), (10, 100, 0.6)]:
        ours = kept_boxes(
            torch.from_numpy(boxes), torch.from_numpy(scores[:, 1:]), 0.3, conf, min_boxes, max_boxes
        )
        reference = plain_kept_boxes(boxes, scores, conf, min_boxes, max_boxes)
        assert ours.tolist() == reference.tolist(), (min_boxes, max_boxes, conf)


def plain_proposals(anchors, scores, deltas, height, width, min_size, pre, post, nms_thresh):
    """py-faster-rcnn's proposal_layer.py forward (bbox_transform_inv, clip_boxes, _filter_boxes, nms)."""
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    pred_ctr_x, pred_ctr_y = deltas[:, 0] * widths + ctr_x, deltas[:, 1] * heights + ctr_y
    pred_w, pred_h = np.exp(deltas[:, 2]) * widths, np.exp(deltas[:, 3]) * heights
    boxes = np.stack(
        [
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ],
        1,
    )
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height - 1)
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    keep = np.where((ws >= min_size) & (hs >= min_size))[0]
    boxes, scores = boxes[keep], scores[keep]
    order = scores.argsort(kind="stable")[::-1][:pre]
    boxes, scores = boxes[order], scores[order]
    keep = plain_nms(boxes, scores, nms_thresh)[:post]
    return boxes[keep]


def test_caffe_proposals_equal_py_faster_rcnn(tiny):
    cfg = load_config(tiny["config"])
    rng = np.random.default_rng(3)
    anchors = rng.uniform(-50, 300, (900, 2))
    anchors = np.concatenate([anchors, anchors + rng.uniform(10, 150, (900, 2))], 1).astype(np.float32)
    deltas = rng.normal(0, 0.2, (900, 4)).astype(np.float32)
    logits = rng.normal(0, 2, 900).astype(np.float32)
    ours = caffe_proposals(
        torch.from_numpy(anchors), torch.from_numpy(logits), torch.from_numpy(deltas), 240, 320, 1.5, cfg
    )
    reference = plain_proposals(anchors, logits, deltas, 240, 320, 16 * 1.5, 400, 80, 0.7)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-3)


def test_fixed_mode_gives_36_boxes_inside_the_image_whose_features_are_the_res5_mean_pool(tiny):
    extractor = ButdVgExtractor(extractor_config(tiny))
    model = extractor.model
    for seed in range(2):
        image = photo(seed)
        found = extractor(image)
        assert found.features.shape == (36, FEATURE_DIM) and found.boxes.shape == (36, 4)
        width, height = image.size
        assert (found.boxes >= 0).all() and (found.boxes[:, [0, 2]] <= width).all()
        assert (found.boxes[:, [1, 3]] <= height).all()
        assert (found.detections.object_id >= 0).all() and (found.detections.object_id < 30).all()
        assert (found.detections.attribute_id < 12).all() and (found.detections.object_conf <= 1).all()

        # a plain recomputation: Caffe stem, res2-4, ROI max-pool 14x14 at 1/16, res5, mean
        pixels, scale = extractor.pixels(image)
        with torch.no_grad():
            stem = model.backbone.stem.conv1
            x = torch.nn.functional.max_pool2d(torch.relu(stem(pixels[None])), 3, 2, 0, ceil_mode=True)
            for stage in ("res2", "res3", "res4"):
                x = getattr(model.backbone, stage)(x)
            rois = torch.from_numpy(found.boxes * scale)
            pooled = roi_pool(x, [rois], output_size=14, spatial_scale=1 / 16)
            reference = model.roi_heads.res5(pooled).mean(dim=(2, 3)).numpy()
        np.testing.assert_allclose(found.features, reference, rtol=1e-4, atol=1e-5)


def test_rpn_outputs_pair_each_anchor_with_its_own_score_and_deltas(tiny):
    """An explicit loop over rows, columns and cell anchors, as Caffe's proposal layer enumerates them."""
    config = extractor_config(tiny, size=160)  # a 10 x 14 map: the loop stays short
    extractor = ButdVgExtractor(config)
    model = extractor.model
    torch.manual_seed(1)
    torch.nn.init.normal_(model.proposal_generator.rpn_head.anchor_deltas.weight, std=0.05)
    pixels, _ = extractor.pixels(photo(0))
    with torch.no_grad():
        features = model.backbone(pixels[None])
        anchors, objectness, deltas = rpn_outputs(model, features)
        (scores,), (raw_deltas,) = model.proposal_generator.rpn_head([features["res4"]])
    cell = list(model.proposal_generator.anchor_generator.cell_anchors)[0]
    scores, raw_deltas = scores[0], raw_deltas[0]  # one image
    count, height, width = scores.shape
    n = 0
    for y in range(height):
        for x in range(width):
            for a in range(count):
                torch.testing.assert_close(anchors[n], cell[a] + torch.tensor([x, y, x, y]) * 16.0)
                assert objectness[n] == scores[a, y, x]
                assert torch.equal(deltas[n], raw_deltas[4 * a : 4 * a + 4, y, x])
                n += 1
    assert n == len(anchors) and deltas.abs().sum() > 0


def test_adaptive_mode_keeps_the_boxes_generate_tsv_would(tiny, monkeypatch):
    import userpipe.pipeline.butd_vg as butd_vg

    calls = []

    def recorded(boxes, scores, nms_thresh, conf_thresh, min_boxes, max_boxes):
        keep = kept_boxes(boxes, scores, nms_thresh, conf_thresh, min_boxes, max_boxes)
        reference = plain_kept_boxes(
            boxes.numpy(), np.pad(scores.numpy(), ((0, 0), (1, 0))), conf_thresh, min_boxes, max_boxes
        )
        calls.append((nms_thresh, conf_thresh, min_boxes, max_boxes, keep.tolist(), reference.tolist()))
        return keep

    monkeypatch.setattr(butd_vg, "kept_boxes", recorded)
    extractor = ButdVgExtractor(extractor_config(tiny, num_regions=60, min_regions=10))
    counts = [len(extractor(photo(seed)).features) for seed in range(2)]
    assert [c[:4] for c in calls] == [(0.3, 0.2, 10, 60)] * 2
    assert all(keep == reference for *_, keep, reference in calls)
    assert counts == [len(c[4]) for c in calls]


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def butd_coco(tmp_path: Path) -> Path:
    """A COCO-layout dataset of 5 photos (one a broken file) for butd-vg extraction."""
    root = tmp_path / "coco"
    folder = root / "images" / "val2014"
    folder.mkdir(parents=True)
    records = []
    for i, split in enumerate(["train", "train", "val", "test", "test"]):
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        photo(i).save(folder / name)
        captions = [f"c {i} {k}" for k in range(5)]
        records.append(karpathy_record(name, split, captions, i, cocoid=100 + i, filepath="val2014"))
    (root / "images" / "val2014" / "COCO_val2014_000000000101.jpg").write_bytes(b"not a jpeg")
    write_json(root / "dataset_coco.json", records)
    return root


def butd_args(tiny, root: Path, out: Path, fmt: str = "airsplay") -> list:
    return [
        "extract", "--dataset", "coco", "--root", root, "--out", out, "--regions", "butd-vg",
        "--detector-config", tiny["config"], "--detector-weights", tiny["files"][fmt],
        "--clip", "none", "--chunk-size", "1", "--workers", "1", "--allow-failures",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_extract_resume_after_kill_and_export_round_trip(runner, tiny, butd_coco, tmp_path):
    reference = tmp_path / "reference.zarr"
    result = run_cli(runner, *butd_args(tiny, butd_coco, reference))
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(reference), mode="r")
    train = group["train"]
    assert list(train["valid"][:]) == [True, False]  # the broken file is flagged, not a zero vector
    assert np.isnan(train["regions"][1]).all() and train["error"][1]
    test = group["test"]
    assert list(test["num_regions"][:]) == [36, 36]
    assert test["object_id"].shape == (2, 36) and (test["object_id"][:] >= 0).all()
    assert group.attrs["userpipe"]["schema_version"] == "1.2"
    assert len(group.attrs["userpipe"]["extractor"]["regions"]["detector_weights"]["sha256"]) == 64

    resumed = tmp_path / "resumed.zarr"
    command = [sys.executable, "-m", "userpipe", *map(str, butd_args(tiny, butd_coco, resumed))]
    kill_at_first_done_chunk(command, resumed)
    result = run_cli(runner, *butd_args(tiny, butd_coco, resumed))
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    assert tree_bytes(resumed) == tree_bytes(reference)

    # export, then import into a new store: the same regions, boxes, sizes and detections
    for fmt, out in (("npz", tmp_path / "npz"), ("tsv", tmp_path / "test.tsv")):
        result = run_cli(
            runner, "export", "--store", reference, "--split", "test", "--format", fmt, "--out", out
        )
        assert result.exit_code == 0, result.output
        again = run_cli(
            runner, "export", "--store", reference, "--split", "test", "--format", fmt, "--out", out
        )
        assert again.exit_code == 2 and "exists" in again.output
        back = tmp_path / f"from-{fmt}.zarr"
        imported = run_cli(
            runner, "extract", "--dataset", "coco", "--root", butd_coco, "--out", back,
            "--regions", f"{fmt}:{out}", "--clip", "none", "--splits", "test", "--workers", "1",
        )  # fmt: skip
        assert imported.exit_code == 0, imported.output
        back_group = zarr.open_group(str(back), mode="r")
        assert back_group.attrs["userpipe"]["extractor"]["regions"]["imported_detections"]
        for name in (
            "image_id",
            "regions",
            "boxes",
            "num_regions",
            "width",
            "height",
            "valid",
            *DETECTION_ARRAYS,
        ):
            np.testing.assert_array_equal(back_group["test"][name][:], test[name][:], err_msg=f"{fmt} {name}")
    info = np.load(tmp_path / "npz" / f"{test['image_id'][0]}.npz", allow_pickle=True)["info"].item()
    np.testing.assert_array_equal(info["objects_id"], test["object_id"][0])  # MILVLG's names and dtypes
    assert info["objects_id"].dtype == np.int64 and info["attrs_conf"].dtype == np.float32
    lxmert = (tmp_path / "test.tsv").read_text().splitlines()[0].split("\t")
    assert (
        len(lxmert) == 10
        and (np.frombuffer(base64.b64decode(lxmert[3]), np.int64) == info["objects_id"]).all()
    )


def test_bad_butd_vg_options_are_one_line_errors_before_any_work(runner, tiny, butd_coco, tmp_path):
    out = tmp_path / "never.zarr"
    base = butd_args(tiny, butd_coco, out)
    weights_at = base.index("--detector-weights")
    cases = [
        (base[:weights_at] + base[weights_at + 2 :], "needs --detector-weights"),
        ([*base, "--detector-config", tmp_path / "missing.yaml"], "detector config not found"),
        ([*base, "--min-regions", "50"], "--min-regions must be between 1 and --num-regions"),
        ([*base, "--device", "tpu"], "--device must be auto, cpu or cuda"),
        ([*base, "--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        ([*base, "--detector-weights", tiny["config"]], "cannot read detector weights"),
    ]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    cases.append(([*base, "--detector-config", bad_yaml], "not a valid detectron2 config"))
    for args, expected in cases:
        result = run_cli(runner, *args)
        assert result.exit_code == 2 and expected in result.output, (expected, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()


def test_an_image_file_query_on_a_butd_vg_store_runs_the_detector(tiny, tmp_path):
    """`userpipe search IMAGE` embeds a query file with the store's extractor (pipeline.features)."""
    from userpipe.pipeline.features import image_file_features

    config = extractor_config(tiny)
    query = tmp_path / "query.png"  # lossless, so the file holds the same pixels as the image
    photo(5).save(query)
    regions, count, clip = image_file_features(config, query)
    direct = ButdVgExtractor(config)(photo(5))
    assert count == 36 and clip is None and regions.shape == (36, FEATURE_DIM)
    np.testing.assert_array_equal(regions, direct.features.astype(np.float16))


def test_an_image_with_no_usable_proposal_is_an_invalid_image_not_zero_regions(tiny, tmp_path):
    from userpipe.pipeline.features import image_file_features

    extractor = ButdVgExtractor(extractor_config(tiny))
    tiny_image = Image.new("RGB", (4, 4), (10, 200, 30))  # every proposal is under 16 original pixels
    with pytest.raises(ValueError, match="no proposal"):
        extractor(tiny_image)
    tiny_image.save(tmp_path / "query.png")
    with pytest.raises(InputError, match="cannot embed image"):  # as a search query: one line
        image_file_features(extractor_config(tiny), tmp_path / "query.png")


@pytest.mark.parametrize("image_id", ["a/b", "..", "tab\there", "line\nbreak", "caf\u00e9", "\x00"])
def test_export_refuses_ids_that_cannot_name_a_file_or_a_tsv_field(image_id):
    from userpipe.pipeline.export import _file_safe

    with pytest.raises(InputError, match="cannot name"):
        _file_safe(image_id)
    assert _file_safe("COCO_val2014_000000000042") == "COCO_val2014_000000000042"


def test_each_local_worker_takes_its_own_gpu_and_other_workers_their_current_device(monkeypatch):
    import distributed

    from userpipe.pipeline.regions import GPU_PER_LOCAL_WORKER

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # as CUDA_VISIBLE_DEVICES would make it

    def device_in(worker_name, device):
        def get_worker():
            if worker_name is None:
                raise ValueError("not in a worker")
            return type("Worker", (), {"name": worker_name})()

        monkeypatch.setattr(distributed, "get_worker", get_worker)
        return worker_device(device)

    # this run's LocalCluster names its workers 0..n-1; a single worker may run in this process
    local = [device_in(n, GPU_PER_LOCAL_WORKER) for n in (*range(6), None)]
    assert local == [torch.device("cuda", i) for i in (0, 1, 2, 3, 0, 1, 0)]
    # an existing scheduler's workers (dask-cuda names them by GPU index too, but pins CUDA_VISIBLE_DEVICES)
    for name in (1, "tcp://10.0.0.5:40123", None):
        assert device_in(name, "cuda") == torch.device("cuda", 2)
    assert device_in(3, "cpu") == torch.device("cpu")
