import json

import numpy as np
import pytest
from kit import EXTRACT_COCO_GRID, run_cli


def _model(trained):
    from userpipe.trainer.checkpoint import load_trained

    model, _, tokenizer = load_trained(trained.run / "checkpoints" / "best")
    return model, tokenizer


def test_index_holds_every_valid_image_and_caption(trained):
    manifest = json.loads((trained.index / "index.json").read_text())
    assert manifest["num_images"] == 15 and manifest["split"] == "test"  # image 3 is invalid
    images = [json.loads(line) for line in (trained.index / "images.jsonl").read_text().splitlines()]
    assert [i["id"] for i in images] == [f"img{i}" for i in range(16) if i != 3]
    captions = [json.loads(line) for line in (trained.index / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == manifest["num_captions"] == sum(1 + i % 5 for i in range(16) if i != 3)
    assert all(c["text"].endswith(f"of image {images[c['image']]['id'][3:]}") for c in captions)


def test_search_and_eval_agree_on_r1(runner, trained):
    from userpipe.retrieval.search import SearchIndex
    from userpipe.trainer.encode import encode_texts

    evaluated = run_cli(runner, "eval", "--run", trained.run, "--store", trained.gallery, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    index = SearchIndex(trained.index)
    model, tokenizer = _model(trained)
    model.eval()
    captions = index.items["captions"]
    _, top = index.search(encode_texts(model, tokenizer, [c["text"] for c in captions]), "images", 1)
    t2i_r1 = 100 * np.mean([row == c["image"] for row, c in zip(top[:, 0], captions, strict=True)])
    i2t = [index.image_query(model, item["id"], 1)[0].correct for item in index.items["images"]]
    assert 0 < t2i_r1 < 100  # a task the tiny model neither fails nor solves: agreement means something
    assert t2i_r1 == pytest.approx(metrics["t2i"]["r1"], abs=1e-9)
    assert 100 * np.mean(i2t) == pytest.approx(metrics["i2t"]["r1"], abs=1e-9)


def test_cli_search_prints_and_marks_the_matching_image(runner, trained, tmp_path):
    query = "caption 0 of image 7"
    result = run_cli(
        runner,
        "search",
        query,
        "--index",
        trained.index,
        "--run",
        trained.run,
        "-k",
        "20",
        "--json",
        "--html",
        tmp_path / "page.html",
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 15  # k larger than the gallery: all of it
    assert [h["rank"] for h in hits] == list(range(1, 16))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
    assert [h["id"] for h in hits if h["correct"]] == ["img7"]
    page = (tmp_path / "page.html").read_text()
    assert query in page and page.count("<figure") == 15 and page.count("class='correct'") == 1
    captions = run_cli(
        runner,
        "search",
        "img7",
        "--captions",
        "--index",
        trained.index,
        "--run",
        trained.run,
        "-k",
        "3",
        "--json",
    )
    assert captions.exit_code == 0, captions.output
    hits = json.loads(captions.stdout)
    assert len(hits) == 3 and all(h["correct"] == (h["image_id"] == "img7") for h in hits)
    assert all(h["text"].endswith(f"of image {h['image_id'][3:]}") for h in hits)
    table = run_cli(runner, "search", query, "--index", trained.index, "--run", trained.run, "-k", "20")
    assert table.exit_code == 0, table.output
    assert "match" in table.stdout and table.stdout.count(" yes ") == 1  # a caption: its image is known


def test_a_free_text_query_has_no_match_column(runner, trained):
    """No ground truth for a text that is not a caption of the gallery: no column that is always empty."""
    query = ("search", "a shape of some colour", "--index", trained.index, "--run", trained.run)
    table = run_cli(runner, *query)
    assert table.exit_code == 0, table.output
    assert "rank" in table.stdout and "match" not in table.stdout
    hits = json.loads(run_cli(runner, *query, "--json").stdout)
    assert len(hits) == 5 and all("correct" not in h for h in hits)


def test_search_refuses_another_model_and_bad_queries(runner, trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(trained.run / "checkpoints" / "best", other)
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, other / "model.safetensors")
    base = ("--index", trained.index)
    moved = tmp_path / "moved-index"  # its recorded checkpoint removed since: the default is gone
    shutil.copytree(trained.index, moved)
    manifest = json.loads((moved / "index.json").read_text())
    manifest["model"]["checkpoint"] = str(tmp_path / "gone")
    (moved / "index.json").write_text(json.dumps(manifest))
    cases = [
        (("search", "a query", *base, "--checkpoint", other), "was built with the model in"),
        (("search", "  ", *base, "--run", trained.run), "the query is empty"),
        (("search", "a query", *base, "--run", trained.run, "-k", "0"), "-k must be positive"),
        (
            ("search", "no-such-id", "--captions", *base, "--run", trained.run),
            "neither an image file nor the id",
        ),
        (("search", "a query", "--index", tmp_path, "--run", trained.run), "is not an index"),
        (("search", "a query", "--index", moved), f"no checkpoint at {tmp_path / 'gone'}"),
        (("search", "a query", *base, "--run", tmp_path), "no checkpoint at"),
    ]
    for args, message in cases:
        result = run_cli(runner, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


def test_index_refuses_to_replace_a_folder_that_is_not_an_index(runner, trained, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli(runner, "index", "--run", trained.run, "--store", trained.gallery, "--out", tmp_path)
    assert result.exit_code == 2 and "holds files that are not a userpipe index" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_an_image_file_is_searched_from_the_index_and_checkpoint_alone(runner, coco_root, tmp_path):
    """The index records its store's extractor: with the store gone, an image file embeds exactly as its
    store row did, so it finds what the image's id finds. A 1.0 index (no extractor) names the rebuild."""
    import shutil

    import torch
    from kit import tiny_recipe

    from userpipe.api import open_index
    from userpipe.retrieval.index import IndexRequest, index_command
    from userpipe.schemas.errors import InputError
    from userpipe.schemas.run import RunConfig
    from userpipe.trainer import checkpoint

    store = tmp_path / "coco.zarr"
    clip = ("--clip", "imagenet:efficientnet_lite0")
    result = run_cli(
        runner, *EXTRACT_COCO_GRID, "--root", coco_root, "--out", store, *clip, "--splits", "test"
    )
    assert result.exit_code == 0, result.output
    config = RunConfig.model_validate(tiny_recipe({"model.feature_dim": 1280, "model.num_regions": 4}))
    model = checkpoint.initial_model(config)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path / "run", model, optimizer, config, {"epoch": 0, "step": 0}, {"rsum": 0.0}, True)
    index = tmp_path / "index"
    manifest = index_command(IndexRequest(store, "test", index), run=tmp_path / "run")
    assert manifest.schema_version == "1.2" and manifest.extractor.regions.kind == "grid"
    image = coco_root / "images" / "val2014" / "COCO_val2014_000000000108.jpg"
    by_id = open_index(index, tmp_path / "run").search_image("108", 3)
    shutil.move(store, tmp_path / "elsewhere.zarr")
    found = open_index(index, tmp_path / "run")
    by_file, searcher = found.search_image(str(image), 3), found.searcher
    assert [h.row for h in by_file] == [h.row for h in by_id]
    np.testing.assert_allclose([h.score for h in by_file], [h.score for h in by_id], rtol=1e-5, atol=1e-6)
    # a caption hit carries its image's id, joined in the library
    assert [h.image_id for h in by_file] == [searcher.items["images"][h.item["image"]]["id"] for h in by_file]
    assert {h.image_id for h in by_file} <= {"107", "108"}

    old = json.loads((index / "index.json").read_text())
    del old["extractor"]
    (index / "index.json").write_text(json.dumps({**old, "schema_version": "1.0"}))
    hits = open_index(index, tmp_path / "run").search("image 8 caption 0", 1)
    assert hits[0].image_id == hits[0].item["id"]
    with pytest.raises(InputError, match="schema 1.0.*rebuild it with userpipe index"):
        open_index(index, tmp_path / "run").search_image(str(image), 3)
    (index / "index.json").write_text(json.dumps({**old, "schema_version": "1.1"}))
    with pytest.raises(InputError, match="records its extractor"):
        open_index(index, tmp_path / "run").search_image(str(image), 3)


# ---------------------------------------------------------------------------- images decoded within a budget


def _grid_config():
    from kit import extractor_config

    from userpipe.pipeline.features import extractor_models
    from userpipe.pipeline.region_kinds import resolve_region_config

    config = extractor_config(
        resolve_region_config("grid", None, "efficientnet_lite0", None, None), num_regions=4, image_size=64
    )
    extractor_models(config.model_dump_json())  # built before anything is measured
    return config


def test_a_huge_image_query_is_decoded_at_about_the_size_its_encoders_take(tmp_path):
    """A 9,000 x 9,000 PNG (78 kB; 81 M pixels, under the cap) decoded whole in float32 is 972 MB: decoded
    instead box-reduced to at least twice the encoders' input, it embeds in a few MB."""
    import tracemalloc

    from PIL import Image, ImageDraw

    from userpipe.pipeline.features import image_file_features, load_image

    path = tmp_path / "huge.png"
    image = Image.new("L", (9000, 9000), 200)
    ImageDraw.Draw(image).rectangle((1000, 2000, 5000, 7000), fill=30)
    image.save(path)
    del image
    decoded = load_image(str(path), 672)
    assert decoded.mode == "RGB" and 672 <= min(decoded.size) and max(decoded.size) < 2 * 672
    config = _grid_config()
    tracemalloc.start()
    try:
        regions, count, _ = image_file_features(config, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4 and np.isfinite(regions).all()
    assert peak < 50 * 2**20, peak


def test_a_decompression_bomb_query_is_a_one_line_refusal_naming_its_size(tmp_path):
    """A header that claims 10,000 x 10,000 (over the cap) or 100,000 x 100,000 pixels (over twice Pillow's
    limit, refused by Pillow as it opens) over a few bytes: refused before anything is decoded."""
    from kit import write_bomb_png

    from userpipe.pipeline.features import image_file_features
    from userpipe.schemas.errors import InputError

    config = _grid_config()
    for side, size in ((10_000, "is 10000x10000 pixels"), (100_000, "Image size (10000000000 pixels)")):
        path = write_bomb_png(tmp_path / f"bomb{side}.png", side, side)
        with pytest.raises(InputError) as caught:
            image_file_features(config, path)
        message = str(caught.value)
        assert message.startswith(f"cannot read image {path}: {path}") and size in message, message
        assert "\n" not in message


def test_a_decompression_bomb_in_the_gallery_is_a_placeholder_on_the_page(runner, trained, tmp_path):
    """`search --html` inlines the hits' thumbnails: a bomb among the gallery's files is left out (the
    placeholder a missing file gets), a large photo is decoded at reduced size."""
    import shutil

    from kit import write_bomb_png, write_image

    index = tmp_path / "index"
    shutil.copytree(trained.index, index)
    manifest = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**manifest, "image_root": str(tmp_path / "images")}))
    files = [json.loads(line)["file"] for line in (index / "images.jsonl").read_text().splitlines()]
    write_bomb_png(tmp_path / "images" / files[0], 100_000, 100_000)
    write_bomb_png(tmp_path / "images" / files[1], 10_000, 10_000)
    write_image(tmp_path / "images" / files[2], 0, size=(1600, 1200))
    page = tmp_path / "page.html"
    args = ("search", "caption 0 of image 0", "--index", index, "--run", trained.run, "-k", "20")
    result = run_cli(runner, *args, "--html", page)
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert text.count("<figure") == 15 and text.count("data:image/jpeg;base64,") == 1
    assert text.count('<div class="missing">') == 14
