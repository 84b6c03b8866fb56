"""Vector search with a trained model: `userpipe index` embeds a store split into exact (flat inner
product) faiss indexes, `userpipe search` embeds a query with the same model and looks it up.

Flat inner product over the L2-normalized embeddings is the similarity eval ranks by, so a caption's
top-1 image here is its rank-0 image there (tests/test_search.py checks that R@1 agrees).
Folder layout: schemas/index.py.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from userpipe.schemas.base import file_sha256
from userpipe.schemas.errors import InputError
from userpipe.schemas.index import GALLERIES, MANIFEST_NAME, IndexedModel, IndexManifest, read_index_manifest
from userpipe.schemas.outputs import HTML, HTML_SIGNATURE, INDEX, check_output, claim
from userpipe.schemas.store_reader import open_store
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.checkpoint import WEIGHTS, checkpoint_dir, load_trained
from userpipe.trainer.encode import encode_regions, encode_split, encode_texts
from userpipe.trainer.model import USER

THUMBNAIL = 160  # px, longer side, in the HTML page and the report's query grid


def model_sha256(checkpoint: Path) -> str:
    return file_sha256(checkpoint / WEIGHTS)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _flat_ip(vectors: torch.Tensor):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    return index


def index_command(
    store: Path,
    out: Path,
    split: str,
    run: Path | None = None,
    checkpoint: Path | None = None,
    image_root: Path | None = None,
) -> IndexManifest:
    """`userpipe index`: a run's best checkpoint (or the checkpoint given) indexes a store split."""
    if image_root is not None and not image_root.is_dir():
        raise InputError(f"--image-root {image_root} is not a folder")
    source = checkpoint_dir(run, checkpoint)
    model, _, tokenizer = load_trained(source)
    return build_index(model, source, tokenizer, store, split, out, image_root)


def build_index(
    model: USER,
    checkpoint: Path,
    tokenizer: CaptionTokenizer,
    store: Path,
    split: str,
    out: Path,
    image_root: Path | None = None,
) -> IndexManifest:
    """Embed every valid image and caption of `split` into `out` (written whole or not at all)."""
    root, attrs = open_store(store)
    summary = attrs.splits.get(split)  # a split the store lacks: encode_split names it
    needed = 4 * model.config.embed_dim * (summary.num_images + summary.num_captions) if summary else 0
    with claim(out, INDEX, [store, checkpoint], needed=needed) as output:
        emb = encode_split(model, store, split, tokenizer)
        files = root[split]["file"][:]
        recorded_root = image_root.resolve() if image_root else attrs.image_root
        manifest = IndexManifest(
            model=IndexedModel(
                checkpoint=str(checkpoint.absolute()), sha256=model_sha256(checkpoint), config=model.config
            ),
            store=str(store.resolve()),
            split=split,
            image_root=str(recorded_root) if recorded_root else None,
            embed_dim=emb.images.shape[1],
            num_images=len(emb.images),
            num_captions=len(emb.captions),
            extractor=attrs.extractor,
        )
        with output.built(4 * manifest.embed_dim * (manifest.num_images + manifest.num_captions)) as folder:
            _write_index(folder, emb, files, manifest)
    return manifest


def _write_index(folder: Path, emb, files, manifest: IndexManifest) -> None:
    import faiss

    # serialized here and written by Python: faiss's own writer reports a full disk on stderr and as a
    # RuntimeError without the errno
    (folder / "images.faiss").write_bytes(faiss.serialize_index(_flat_ip(emb.images)).tobytes())
    (folder / "captions.faiss").write_bytes(faiss.serialize_index(_flat_ip(emb.captions)).tobytes())
    _write_jsonl(
        folder / "images.jsonl",
        [
            {"id": i, "file": str(files[row]), "row": int(row)}
            for i, row in zip(emb.image_ids, emb.image_rows, strict=True)
        ],
    )
    _write_jsonl(
        folder / "captions.jsonl",
        [{"text": t, "image": int(i)} for t, i in zip(emb.caption_texts, emb.caption_image, strict=True)],
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))  # last: what makes it an index


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    row: int  # row in the gallery's .jsonl
    item: dict  # that row: {"id", "file", "row"} for images, {"text", "image"} for captions
    correct: bool | None  # a ground-truth match; None when the query has no known match
    image_id: str  # the image's id: the hit's own, or a caption's image's


class SearchIndex:
    def __init__(self, folder: Path):
        self.manifest = read_index_manifest(folder)
        self.folder = folder
        try:
            self.items = {
                g: [json.loads(line) for line in (folder / f"{g}.jsonl").read_text().splitlines()]
                for g in GALLERIES
            }
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{folder} is an incomplete index ({exc}): rebuild it with userpipe index"
            ) from None
        expected = {"images": self.manifest.num_images, "captions": self.manifest.num_captions}
        for gallery, rows in self.items.items():
            if len(rows) != expected[gallery]:
                raise InputError(
                    f"{folder}/{gallery}.jsonl has {len(rows)} rows, the manifest says "
                    f"{expected[gallery]}: rebuild the index"
                )
        self.image_row = {item["id"]: row for row, item in enumerate(self.items["images"])}
        self._faiss: dict = {}

    def check_model(self, checkpoint: Path) -> None:
        """Embeddings of another model live in another space: refuse instead of returning noise."""
        if model_sha256(checkpoint) != self.manifest.model.sha256:
            raise InputError(
                f"{self.folder} was built with the model in {self.manifest.model.checkpoint}, not "
                f"{checkpoint}; rebuild it with userpipe index"
            )

    def file(self, image_row: int) -> Path | None:
        file = self.items["images"][image_row]["file"]
        root = self.manifest.image_root
        return Path(root) / file if root and file else None

    def search(self, queries: torch.Tensor, gallery: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, E) L2-normalized queries -> (q, k') scores and gallery rows, best first; k' = min(k, size)."""
        index = self._index(gallery)
        return index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, index.ntotal))

    def _index(self, gallery: str):
        import faiss

        if gallery not in self._faiss:
            path = self.folder / f"{gallery}.faiss"
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as exc:
                raise InputError(
                    f"{path} is damaged ({str(exc).splitlines()[-1][:160]}): rebuild the index "
                    "with userpipe index"
                ) from None
            expected = self.manifest.num_images if gallery == "images" else self.manifest.num_captions
            if index.ntotal != expected or index.d != self.manifest.embed_dim:
                raise InputError(
                    f"{path} holds {index.ntotal} x {index.d}, the manifest says {expected} x "
                    f"{self.manifest.embed_dim}: rebuild the index with userpipe index"
                )
            self._faiss[gallery] = index
        return self._faiss[gallery]

    def text_query(self, model: USER, tokenizer: CaptionTokenizer, text: str, k: int) -> list[Hit]:
        """Top-k images for a text; an exact caption of the gallery marks its image correct."""
        model.eval()
        scores, rows = self.search(encode_texts(model, tokenizer, [text]), "images", k)
        truth = {c["image"] for c in self.items["captions"] if c["text"].strip() == text.strip()}
        return self._hits(scores[0], rows[0], "images", lambda row: row in truth if truth else None)

    def image_query(self, model: USER, query: str, k: int) -> list[Hit]:
        """Top-k captions for an image: the id of an indexed image (its stored embedding; its captions are
        correct), or an image file (embedded with the extractor the index records, and `model`)."""
        from userpipe.pipeline.features import image_file_features

        own = self.image_row.get(query)
        if own is not None:
            embedding = torch.from_numpy(self._index("images").reconstruct(own))[None]
        elif Path(query).is_file():
            extractor = self.manifest.extractor
            if extractor is None:
                raise InputError(
                    f"{self.folder} is an index of schema 1.0, which does not record its extractor; "
                    "rebuild it with userpipe index to query it with image files"
                )
            features, count, global_embedding = image_file_features(extractor, Path(query))
            cge = model.config.enhancement == "cge"
            model.eval()
            embedding = encode_regions(
                model, features[None], np.array([count]), global_embedding[None] if cge else None
            )
        else:
            raise InputError(f"'{query}' is neither an image file nor the id of an image in {self.folder}")
        scores, rows = self.search(embedding, "captions", k)
        return self._hits(
            scores[0],
            rows[0],
            "captions",
            lambda row: None if own is None else self.items["captions"][row]["image"] == own,
        )

    def _hits(self, scores, rows, gallery: str, correct) -> list[Hit]:
        hits = []
        for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1):
            item = self.items[gallery][row]
            image = item if gallery == "images" else self.items["images"][item["image"]]
            hits.append(Hit(rank, float(score), int(row), item, correct(int(row)), image["id"]))
        return hits


def search_command(
    index: Path,
    query: str,
    k: int,
    images: bool,
    run: Path | None = None,
    checkpoint: Path | None = None,
    html_out: Path | None = None,
) -> tuple[SearchIndex, list[Hit]]:
    """`userpipe search`: the top-k images for a text (`images`) or captions for an image id or file, with the
    model the index was built with; also written as an HTML page to `html_out`."""
    if html_out:
        check_output(html_out, HTML, [index], "--html")
    if not query.strip():
        raise InputError("the query is empty")
    if k <= 0:
        raise InputError(f"-k must be positive, got {k}")
    source = checkpoint_dir(run, checkpoint)
    searcher = SearchIndex(index)
    searcher.check_model(source)
    model, _, tokenizer = load_trained(source)
    hits = (
        searcher.text_query(model, tokenizer, query, k) if images else searcher.image_query(model, query, k)
    )
    if html_out:
        write_html(html_out, searcher, query, "images" if images else "captions", hits)
    return searcher, hits


def thumbnail(path: Path | None) -> Image.Image | None:
    """The image scaled to THUMBNAIL px on its longer side, decoded at reduced size (its shorter side at least
    twice that); None (a placeholder) when there is no readable image file, or one over the pixel cap."""
    from userpipe.pipeline.features import load_image

    if path is None:
        return None
    try:
        image = load_image(str(path), 2 * THUMBNAIL)
    except (OSError, SyntaxError, ValueError):
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def _data_uri(image: Image.Image | None) -> str:
    if image is None:
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img_tag(path: Path | None, label: str) -> str:
    uri = _data_uri(thumbnail(path))
    return (
        f'<img src="{uri}" alt="{html.escape(label)}">'
        if uri
        else f'<div class="missing">{html.escape(label)}</div>'
    )


def write_html(out: Path, index: SearchIndex, query: str, gallery: str, hits: list[Hit]) -> None:
    """A self-contained page (thumbnails inlined): the query, then the hits best first, matches marked."""
    if gallery == "images":
        head = f"<p class='query'>{html.escape(query)}</p>"
        cards = "".join(
            f"<figure class='{_mark(h)}'>{_img_tag(index.file(h.row), h.item['id'])}<figcaption>#{h.rank} "
            f"{html.escape(h.item['id'])}<br>score {h.score:.3f}</figcaption></figure>"
            for h in hits
        )
    else:
        own = index.image_row.get(query)
        head = _img_tag(index.file(own) if own is not None else Path(query), query)
        cards = (
            "<ol>"
            + "".join(
                f"<li class='{_mark(h)}'>{html.escape(h.item['text'])} <small>(image "
                f"{html.escape(h.image_id)}, score {h.score:.3f})</small></li>"
                for h in hits
            )
            + "</ol>"
        )
    page = (
        HTML_SIGNATURE + "<style>"
        "body{font-family:sans-serif;margin:2em} figure{display:inline-block;margin:4px;padding:4px;"
        "border:4px solid #ddd;text-align:center} .correct{border-color:#2a2;color:#161} "
        ".missing{width:160px;"
        "height:120px;background:#eee} li.correct{font-weight:bold} .query{font-size:1.3em}</style>"
        f"<h1>userpipe search</h1>{head}<p>top {len(hits)} {gallery} from {html.escape(str(index.folder))} "
        f"({index.manifest.split} split, {index.manifest.num_images} images, {index.manifest.num_captions} "
        f"captions); ground-truth matches are green</p>{cards}\n"
    )
    with claim(out, HTML, [index.folder], "--html") as output, output.built(len(page)) as scratch:
        scratch.write_text(page, encoding="utf-8")


def _mark(hit: Hit) -> str:
    return "correct" if hit.correct else ""
