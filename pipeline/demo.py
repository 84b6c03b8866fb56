"""The embedded demo dataset: procedurally drawn scenes of coloured shapes on cluttered backgrounds.

Written once, deterministically from a seed, in the Karpathy layout (dataset_demo.json + images/),
with per-object boxes so `--regions boxes` has annotations to use. Each image holds 2-4 objects
that differ in shape, colour, size and position, and its five captions are worded differently and
mention attributes and spatial relations, so that retrieval needs more than one global colour.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from rich.progress import Progress

from userpipe.pipeline.datasets import DatasetIndex, read_karpathy_json
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import DEMO, Output, claim

DEMO_JSON = "dataset_demo.json"
DEMO_VERSION = 1
DEFAULT_IMAGES = 3200  # 2,000 train / 200 val / 1,000 test
SPLIT_FRACTIONS = (("train", 0.625), ("val", 0.0625), ("test", 0.3125))
WIDTH, HEIGHT = 320, 256

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
SHAPES = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
}
SIZES = {"small": (14, 22, ("small", "little", "tiny")), "large": (32, 44, ("large", "big", "huge"))}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (
            max(0.0, self.cx - self.radius),
            max(0.0, self.cy - self.radius),
            min(float(WIDTH), self.cx + self.radius),
            min(float(HEIGHT), self.cy + self.radius),
        )


def split_sizes(total: int) -> dict[str, int]:
    if total < 3:
        raise InputError(f"--images {total}: the demo needs at least 3 images (one per split)")
    sizes = {name: max(1, int(round(total * frac))) for name, frac in SPLIT_FRACTIONS[1:]}
    sizes = {"train": total - sum(sizes.values()), **sizes}
    return sizes


def _position_phrase(obj: SceneObject, rng: random.Random) -> str:
    horizontal = "on the left" if obj.cx < WIDTH / 3 else "on the right" if obj.cx > 2 * WIDTH / 3 else ""
    vertical = "at the top" if obj.cy < HEIGHT / 3 else "at the bottom" if obj.cy > 2 * HEIGHT / 3 else ""
    if horizontal and vertical:
        return rng.choice([f"{vertical} {horizontal.replace('on the ', '')}", f"{horizontal}, {vertical}"])
    return horizontal or vertical or rng.choice(["in the middle", "near the centre"])


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b, by the dominant axis of their offset."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _noun(obj: SceneObject, rng: random.Random, with_size: bool = True) -> str:
    words = [rng.choice(SIZES[obj.size][2])] if with_size else []
    words += [obj.colour, rng.choice(SHAPES[obj.shape])]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions_for(objects: list[SceneObject], rng: random.Random) -> list[str]:
    a, b = objects[0], objects[1]
    others = objects[2:]
    listing = (
        ", ".join(_article(_noun(o, rng)) for o in objects[:-1]) + " and " + _article(_noun(objects[-1], rng))
    )
    count = {2: "two", 3: "three", 4: "four"}[len(objects)]
    captions = [
        f"{_article(_noun(a, rng))} {_relation(a, b)} {_article(_noun(b, rng))}.",
        f"there is {_article(_noun(a, rng, False))} {_position_phrase(a, rng)} "
        f"and {_article(_noun(b, rng, False))} {_position_phrase(b, rng)}.",
        f"{count} shapes on a cluttered background: {listing}.",
        f"the {b.colour} {rng.choice(SHAPES[b.shape])} is {_relation(b, a)} the {a.size} {a.colour} "
        f"{rng.choice(SHAPES[a.shape])}"
        + (f", with {_article(_noun(others[0], rng))} nearby." if others else "."),
        f"a busy picture showing {_article(_noun(b, rng))} {_position_phrase(b, rng)} "
        f"and {_article(_noun(a, rng))} {_relation(a, b)} it.",
    ]
    return captions


def _draw_background(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    base = tuple(rng.randint(60, 150) for _ in range(3))
    draw.rectangle((0, 0, WIDTH, HEIGHT), fill=base)
    for _ in range(rng.randint(40, 90)):  # clutter: thin muted strokes and specks, never object-sized
        tone = tuple(min(255, max(0, c + rng.randint(-50, 50))) for c in base)
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        if rng.random() < 0.6:
            angle, length = rng.uniform(0, math.pi), rng.uniform(10, 60)
            draw.line(
                (x, y, x + length * math.cos(angle), y + length * math.sin(angle)),
                fill=tone,
                width=rng.randint(1, 3),
            )
        else:
            r = rng.uniform(1, 5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tone)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x, y, r, fill = obj.cx, obj.cy, obj.radius, COLOURS[obj.colour]
    outline = (20, 20, 20)
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=2)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill, outline=outline, width=2)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill, outline=outline)
    elif obj.shape == "diamond":
        draw.polygon(
            [(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=fill, outline=outline
        )
    elif obj.shape == "star":
        points = [
            (
                x + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                y - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=fill, outline=outline)
    elif obj.shape == "cross":
        t = r * 0.35
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    else:
        raise ValueError(obj.shape)


def _place_objects(rng: random.Random) -> list[SceneObject]:
    objects: list[SceneObject] = []
    want = rng.randint(2, 4)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], want)  # no two alike in shape and colour
    for shape, colour in kinds:
        size = rng.choice(list(SIZES))
        lo, hi, _ = SIZES[size]
        for _attempt in range(50):
            r = rng.uniform(lo, hi)
            cx, cy = rng.uniform(r, WIDTH - r), rng.uniform(r, HEIGHT - r)
            if all(math.hypot(cx - o.cx, cy - o.cy) > (r + o.radius) * 1.05 for o in objects):
                objects.append(SceneObject(shape, colour, size, cx, cy, r))
                break
    if len(objects) < 2:  # pragma: no cover - 50 attempts on a 320x256 canvas always place two
        raise RuntimeError("could not place two objects")
    return objects


def render_scene(seed: int) -> tuple[Image.Image, list[SceneObject], list[str]]:
    rng = random.Random(seed)
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, rng)
    objects = _place_objects(rng)
    for obj in objects:
        _draw_object(draw, obj)
    return image, objects, captions_for(objects, rng)


def generator_tag(images: int, seed: int) -> dict:
    return {"generator": "userpipe-demo", "version": DEMO_VERSION, "images": images, "seed": seed}


def ensure_demo(root: Path, images: int = DEFAULT_IMAGES, seed: int = 0) -> Path:
    """Write the demo dataset under `root` unless an identical one is there; return its JSON path.

    `root` must be new, empty, or hold a demo written by userpipe (of another size: it is replaced).
    """
    with claim(root, DEMO, option="--root") as output:
        return _write_demo(output, root, images, seed)


def _write_demo(output: Output, root: Path, images: int, seed: int) -> Path:
    json_path = root / DEMO_JSON
    tag = generator_tag(images, seed)
    sizes = split_sizes(images)
    if output.state == "own":
        with open(json_path, encoding="utf-8") as f:
            if json.load(f).get("userpipe_demo") == tag:
                return json_path
    with output.built() as tmp:
        _render_into(tmp, images, seed, sizes, tag)
    return json_path


def _render_into(tmp: Path, images: int, seed: int, sizes: dict, tag: dict) -> None:
    (tmp / "images").mkdir()
    records = []
    with Progress(transient=True) as progress:
        task = progress.add_task("writing demo images", total=images)
        imgid = 0
        for split, count in sizes.items():
            for _ in range(count):
                image, objects, captions = render_scene(seed * 1_000_003 + imgid)
                filename = f"demo_{imgid:06d}.jpg"
                image.save(tmp / "images" / filename, quality=90)
                records.append(
                    {
                        "filepath": "images",
                        "filename": filename,
                        "imgid": imgid,
                        "split": split,
                        "sentences": [
                            {
                                "raw": c,
                                "tokens": c.rstrip(".").replace(",", "").replace(":", "").split(),
                                "imgid": imgid,
                                "sentid": imgid * 5 + k,
                            }
                            for k, c in enumerate(captions)
                        ],
                        "boxes": [[round(v, 2) for v in o.box] for o in objects],
                        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size} for o in objects],
                    }
                )
                imgid += 1
                progress.advance(task)
    with open(tmp / DEMO_JSON, "w", encoding="utf-8") as f:  # last: the tag makes the folder a demo
        json.dump({"dataset": "demo", "userpipe_demo": tag, "images": records}, f)


def load_demo(root: Path | None, images: int | None, seed: int = 0) -> DatasetIndex:
    root = root or Path("data") / "demo"
    json_path = ensure_demo(root, DEFAULT_IMAGES if images is None else images, seed)
    return read_karpathy_json(json_path, name="demo", image_root=root, uses_filepath=True, max_captions=5)
