from pathlib import Path

import pytest
from kit import karpathy_record, write_image, write_json

from userpipe.pipeline.datasets import load_dataset, parse_splits, read_karpathy_json
from userpipe.schemas.errors import InputError


def test_coco_layout_restval_joins_train_and_six_captions_keep_first_five(coco_root: Path):
    index = load_dataset("coco", coco_root)
    assert [len(index.splits[s]) for s in ("train", "val", "test")] == [5, 2, 2]
    first = index.splits["train"][0]
    assert first.image_id == "100"
    assert first.file == "train2014/COCO_train2014_000000000100.jpg"
    assert first.captions == tuple(f"image 0 caption {k}" for k in range(5))
    assert index.splits["train"][4].image_id == "104"  # the restval image
    assert (index.image_root / first.file).is_file()
    assert index.has_boxes and len(index.sha256) == 64


def test_f30k_layout_uses_filename_stem_as_id(tmp_path: Path):
    root = tmp_path / "f30k"
    write_image(root / "flickr30k-images" / "1000092795.jpg", 0)
    write_json(
        root / "dataset_flickr30k.json",
        [karpathy_record("1000092795.jpg", "test", [f"c{k}" for k in range(5)], 7)],
        "flickr30k",
    )
    rec = load_dataset("f30k", root).splits["test"][0]
    assert (rec.image_id, rec.file, rec.imgid) == ("1000092795", "1000092795.jpg", 7)


def test_named_dataset_with_four_captions_names_the_image(coco_root: Path):
    path = coco_root / "dataset_coco.json"
    text = path.read_text().replace(
        '{"raw": "image 3 caption 4", "tokens": ["image", "3", "caption", "4"], "imgid": 3, "sentid": 34}', ""
    )
    path.write_text(text.replace(", ]", "]"))
    with pytest.raises(InputError, match=r"image 103 .* has 4 captions, coco needs 5"):
        load_dataset("coco", coco_root)


def test_custom_json_keeps_any_number_of_captions(tmp_path: Path):
    write_image(tmp_path / "imgs" / "a.jpg", 0)
    write_image(tmp_path / "imgs" / "b.jpg", 1)
    path = write_json(
        tmp_path / "mine.json",
        [
            karpathy_record("a.jpg", "train", ["one"], 0, filepath="imgs"),
            karpathy_record("b.jpg", "train", ["x", "y", "z", "w", "v", "u", "t"], 1, filepath="imgs"),
        ],
    )
    index = load_dataset(str(path), None)
    assert [len(r.captions) for r in index.splits["train"]] == [1, 7]
    assert index.max_captions is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"dataset": "coco"}', "no top-level 'images' list"),
        ('{"images": [{"filename": "a.jpg"}]}', r"image record 0 \(a.jpg\): split: Field required"),
        (
            '{"images": [{"filename": "a.jpg", "split": "train", "sentences": "a cat"}]}',
            r"image record 0 \(a.jpg\): sentences: Input should be a valid list",
        ),
        (
            '{"images": [{"filename": "a.jpg", "split": ["train"], "sentences": []}]}',
            r"image record 0 \(a.jpg\): split: Input should be a valid string",
        ),
        (
            '{"images": [{"filename": 7, "split": "train", "sentences": []}]}',
            "image record 0: filename: Input should be",
        ),
        (
            (
                '{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}], '
                '"boxes": [[1, 2, "b", 4]]}]}'
            ),
            r"image record 0 \(a.jpg\): boxes.0.2: Input should be a valid number",
        ),
        (
            (
                '{"images": [{"filename": "a.jpg", "split": "train", '
                '"sentences": [{"raw": "x"}, {"raw": "  "}]}]}'
            ),
            "caption 1 is empty",
        ),
        ('{"images": ["a.jpg"]}', "image record 0: Input should be a valid dictionary"),
        (
            '{"images": [{"filename": "a.jpg", "split": "holdout", "sentences": []}]}',
            "unknown split 'holdout'",
        ),
        ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}', "has no captions"),
        (
            '{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},'
            ' {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "y"}]}]}',
            "appears more than once",
        ),
    ],
)
def test_bad_karpathy_files_are_rejected_with_the_reason(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_karpathy_json(path, name="x", image_root=tmp_path, uses_filepath=True, max_captions=None)


def test_missing_files_and_folders(tmp_path: Path, coco_root: Path):
    with pytest.raises(InputError, match="dataset file not found"):
        load_dataset("f30k", tmp_path / "nowhere")
    (coco_root / "images").rename(coco_root / "elsewhere")
    with pytest.raises(InputError, match="image folder not found"):
        load_dataset("coco", coco_root)
    with pytest.raises(InputError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", None)


def test_split_names_are_checked():
    assert parse_splits("train, test") == ("train", "test")
    with pytest.raises(InputError, match="unknown split name.*dev"):
        parse_splits("train,dev")
