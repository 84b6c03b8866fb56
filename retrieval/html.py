"""`userpipe search --html`: a self-contained page of the hits, thumbnails inlined."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from userpipe.retrieval.search import Hit, SearchIndex
from userpipe.schemas.outputs import HTML, HTML_SIGNATURE, claim

THUMBNAIL = 160  # px, longer side, in the HTML page and the report's query grid


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
