import json
from pathlib import Path

from userpipe.pipeline.demo import COLOURS, DEMO_JSON, ensure_demo, load_demo, render_scene, split_sizes


def test_default_split_sizes_follow_the_papers_proportions():
    assert split_sizes(3200) == {"train": 2000, "val": 200, "test": 1000}
    assert sum(split_sizes(37).values()) == 37


def test_scenes_are_deterministic_and_captions_name_what_is_drawn():
    image_a, objects, captions = render_scene(11)
    image_b, _, captions_b = render_scene(11)
    assert image_a.tobytes() == image_b.tobytes() and captions == captions_b
    assert render_scene(12)[0].tobytes() != image_a.tobytes()
    assert 2 <= len(objects) <= 4 and len(captions) == 5 and len(set(captions)) == 5
    first, second = objects[0], objects[1]
    assert first.colour in captions[0] and second.colour in captions[0]
    assert any(rel in captions[0] for rel in ("left of", "right of", "above", "below"))
    for obj in objects:  # each object's colour shows at its centre pixel
        pixel = image_a.getpixel((int(obj.cx), int(obj.cy)))
        assert max(abs(a - b) for a, b in zip(pixel, COLOURS[obj.colour], strict=True)) < 5


def test_written_once_in_karpathy_layout_and_reused(tmp_path: Path):
    root = tmp_path / "demo"
    index = load_demo(root, images=10)
    assert {s: len(r) for s, r in index.splits.items()} == split_sizes(10)
    record = index.splits["train"][0]
    assert (root / record.file).is_file() and len(record.captions) == 5
    assert all(0 <= b[0] < b[2] <= 320 and 0 <= b[1] < b[3] <= 256 for b in record.boxes)
    stamp = (root / DEMO_JSON).stat().st_mtime_ns
    ensure_demo(root, images=10)
    assert (root / DEMO_JSON).stat().st_mtime_ns == stamp  # same size and seed: not rewritten
    ensure_demo(root, images=12)
    assert len(json.loads((root / DEMO_JSON).read_text())["images"]) == 12
