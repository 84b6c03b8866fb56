"""`userpipe extract`: dataset -> region features + global embeddings -> Zarr store, in Dask tasks.

Reader (datasets, importers) / writer (store) / distributor (this module) split, as img2dataset:
the driver validates everything and creates the store before any work starts, then submits one
task per image chunk (and per caption chunk when the global encoder has a text tower). A task owns
its Zarr chunks, writes them, and only then sets its `*_done` flag, so a rerun after a crash skips
finished chunks and recomputes the rest bit-for-bit.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from glob import glob
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from pydantic import Field
from rich.console import Console

from userpipe.pipeline.cluster import dask_client, run_tasks
from userpipe.pipeline.datasets import DatasetIndex, check_image_folders, load_dataset
from userpipe.pipeline.demo import load_demo
from userpipe.pipeline.features import extractor_models, image_features, load_image
from userpipe.pipeline.global_encoders import resolve_global_config
from userpipe.pipeline.importers import ImportPlan
from userpipe.pipeline.region_kinds import KINDS, RegionOptions, region_kind
from userpipe.pipeline.region_kinds.registry import DatasetRequest, RegionKind
from userpipe.pipeline.regions import GPU_PER_LOCAL_WORKER
from userpipe.pipeline.store import (
    collect_failures,
    create_store,
    every_chunk_written,
    store_bytes,
    write_attrs,
    write_index_arrays,
)
from userpipe.schemas import threads
from userpipe.schemas.base import LocalWorkers, Options
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import STORE, Output, check_output, claim, disk_full
from userpipe.schemas.sources import location, read_bytes
from userpipe.schemas.store import (
    ATTRS_KEY,
    DETECTION_ARRAYS,
    ChunkImages,
    ExtractorConfig,
    ImageSide,
    RegionSlots,
    SplitSummary,
    StoreAttrs,
    caption_chunk_size,
    num_chunks,
    split_array_specs,
    validate_store,
)
from userpipe.schemas.store_reader import done_flags, open_store, remove_chunk, store_problems, zarr_store

TEXT_BATCH = 256


class ExtractOptions(Options):
    dataset: str = Field(min_length=1)
    root: Path | None
    out: str | None  # a folder or a URL (`sources.location`)
    splits: tuple[str, ...]
    regions: str | None  # None: dataset default
    backbone: str | None  # None: resolve_region_config's default
    backbone_weights: str | None
    detector_weights: str | None
    clip: str | None  # None: dataset default
    num_regions: RegionSlots
    image_size: ImageSide | None
    chunk_size: ChunkImages
    images: int | None = Field(ge=3, le=10_000_000)  # demo size: one image per split at least
    workers: LocalWorkers
    scheduler: str | None
    overwrite: bool
    detector_config: str | None = None  # butd-vg: a packaged name or a detectron2 .yaml (None: default)
    min_regions: int | None = None  # butd-vg: fewest boxes per image (None: exactly num_regions)
    device: str | None = None  # butd-vg: auto (None; cuda when there is a GPU), cpu or cuda


@dataclass
class Prepared:
    config: ExtractorConfig
    index: DatasetIndex
    imports: ImportPlan | None
    out: Path | str  # a folder, or a URL


def default_out(dataset: str) -> Path:
    return Path("data") / f"{Path(dataset).stem if dataset.endswith('.json') else dataset}.zarr"


def _given_inputs(opts: ExtractOptions) -> list:
    """The files and folders named on the command line that the extraction reads."""
    _, _, source = (opts.regions or "").partition(":")
    located = glob(source) if any(c in source for c in "*?[") else [source]
    return [
        opts.dataset if opts.dataset.endswith(".json") else None,
        opts.root,
        *located,
        opts.backbone_weights,
        opts.detector_weights,
        opts.detector_config if (opts.detector_config or "").endswith((".yaml", ".yml")) else None,
    ]


def prepare(opts: ExtractOptions) -> Prepared:
    """Everything that can be wrong with the input is found here, before anything is written."""
    if opts.images is not None and opts.dataset != "demo":
        raise InputError("--images only applies to --dataset demo")
    out = location(opts.out) if opts.out else default_out(opts.dataset)
    check_output(out, STORE, _given_inputs(opts))  # refused before any work (the demo's included)
    is_demo = opts.dataset == "demo"
    kind, options = _region_options(opts)
    _check_detector_options(opts)
    clip_spec = opts.clip or ("imagenet:efficientnet_lite0" if is_demo else "ViT-B-32:openai")
    global_config = resolve_global_config(clip_spec)
    region_config = kind.resolve(options)

    def dataset_index():
        index = load_demo(opts.root, opts.images) if is_demo else load_dataset(opts.dataset, opts.root)
        index.select(opts.splits)
        return index

    request = DatasetRequest(opts.dataset, opts.root, opts.splits, dataset_index)
    index, imports = kind.index_and_imports(options, request)
    if not region_config.stored.imported or global_config.kind != "none":  # the images are read
        if index.image_root is None:
            raise InputError(
                f"--clip {clip_spec} needs the images, but {opts.dataset}'s Karpathy JSON was not "
                "found under --root to locate them; pass --clip none or --root"
            )
        check_image_folders(index)
    feature_dim, default_size = kind.facts(region_config, imports)
    if imports:
        region_config = region_config.model_copy(update={"imported_detections": imports.detections})
    config = ExtractorConfig(
        dataset=opts.dataset,
        dataset_sha256=index.sha256,
        splits=opts.splits,
        max_captions=index.max_captions,
        num_regions=opts.num_regions,
        feature_dim=feature_dim,
        image_size=opts.image_size or default_size or (256 if is_demo else 600),
        chunk_size=opts.chunk_size,
        regions=region_config,
        global_encoder=global_config,
    )
    check_output(out, STORE, [index.image_root])
    return Prepared(config, index, imports, out)


def _region_options(opts: ExtractOptions) -> tuple[RegionKind, RegionOptions]:
    """The kind `--regions` names (the dataset's default when not given) and the region options given,
    each refused unless that kind reads it; a location (`KIND:WHERE`) only and always where the kind
    takes one."""
    default = "boxes" if opts.dataset == "demo" else "butd"
    name, colon, source = (opts.regions or default).partition(":")
    kind = region_kind(name)
    options = RegionOptions(source or None, *(getattr(opts, f.name) for f in fields(RegionOptions)[1:]))
    for option in fields(RegionOptions)[1:]:
        if getattr(options, option.name) is not None and option.name not in kind.reads:
            readers = [k.name for k in KINDS.values() if option.name in k.reads]
            flag = "--" + option.name.replace("_", "-")
            raise InputError(f"{flag} does not apply to --regions {name} (only to {', '.join(readers)})")
    if kind.location and not source:
        raise InputError(f"--regions {name} needs a location: {name}:{kind.location}")
    if colon and not kind.location:
        raise InputError(f"--regions {name} takes no location (got {name}:{source})")
    return kind, options


def _check_detector_options(opts: ExtractOptions) -> None:
    """--min-regions and --device have values that work (a CUDA device on this machine, unless the
    workers are an existing scheduler's, which may have GPUs)."""
    if opts.min_regions is not None and not 0 < opts.min_regions <= opts.num_regions:
        raise InputError(f"--min-regions must be between 1 and --num-regions ({opts.num_regions})")
    if opts.device not in (None, "auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, not '{opts.device}'")
    if opts.device == "cuda" and opts.scheduler is None:
        import torch

        if not torch.cuda.is_available():
            raise InputError(
                "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is false)"
            )


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class ImageChunk:
    store: str
    split: str
    chunk: int
    start: int
    paths: tuple[str, ...]  # absolute image paths ("" when regions are imported and no global is needed)
    boxes: tuple  # annotated boxes per image, or None
    refs: tuple  # importer refs per image, or None


def extract_image_chunk(config_json: str, chunk: ImageChunk, plan: threads.Plan, device: str) -> int:
    with threads.sharing(plan):  # the worker's share of the cores, adapting per image
        return _extract_image_chunk(config_json, chunk, device)


def _extract_image_chunk(config_json: str, chunk: ImageChunk, device: str) -> int:
    config, extractor, encoder = extractor_models(config_json, device)
    n, r, d = len(chunk.paths), config.num_regions, config.feature_dim
    # Invalid images keep NaN everywhere; valid ones get zeros past num_regions (padding, by contract).
    regions = np.full((n, r, d), np.nan, np.float32)
    boxes = np.full((n, r, 4), np.nan, np.float32)
    num_regions = np.zeros(n, np.int16)
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    # detections: NaN confidences for invalid images, ids -1 and confidences 0 for padding
    detections = {
        name: np.full((n, r), -1 if dtype.startswith("int") else np.nan, dtype)
        for name, dtype in (DETECTION_ARRAYS.items() if config.regions.has_detections else ())
    }
    errors = [""] * n
    images: dict[int, Image.Image] = {}
    for i, path in enumerate(chunk.paths):
        threads.adjust()
        try:
            image = load_image(path) if (extractor or encoder) else None
            result = image_features(config, extractor, image, chunk.boxes[i], chunk.refs[i])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
            continue
        with np.errstate(over="ignore"):  # an overflow is what this looks for
            stored = result.features.astype(np.float16)  # as the store keeps them
        if not np.isfinite(stored).all():
            errors[i] = "ValueError: non-finite region features (NaN, inf, or beyond float16's range)"
            continue
        k = len(result.features)
        regions[i, k:], boxes[i, k:] = 0.0, 0.0
        regions[i, :k] = result.features
        if result.boxes is not None:
            boxes[i, :k] = result.boxes
        if result.detections is not None:
            for name, values in detections.items():
                values[i, k:] = -1 if values.dtype.kind == "i" else 0.0
                values[i, :k] = getattr(result.detections, name)
        num_regions[i], width[i], height[i] = k, result.width, result.height
        if image is not None:
            images[i] = image
    valid = np.array([not e for e in errors])

    columns = {
        "regions": regions.astype(np.float16),
        "boxes": boxes,
        "num_regions": num_regions,
        "width": width,
        "height": height,
        "valid": valid,
        "error": np.array(errors, dtype=object),
        **detections,
    }
    if encoder is not None:
        clip = np.full((n, config.global_encoder.image_dim), np.nan, np.float32)
        if images:
            clip[list(images)] = encoder.encode_images(list(images.values()))
        columns["clip_image"] = clip.astype(np.float16)
    _write_rows(chunk.store, chunk.split, chunk.start, columns, ("images_done", chunk.chunk))
    return n


def _write_rows(
    store: str, split: str, start: int, columns: dict[str, np.ndarray], done: tuple[str, int]
) -> None:
    """A task's rows of each array, then its done-flag: the chunk counts as done only once all is written.
    (Zarr writes each chunk file beside and renames it, so a chunk file is whole or absent.)"""
    group = zarr.open_group(zarr_store(store, read_only=False), mode="r+")[split]
    try:
        with every_chunk_written():
            for name, values in columns.items():
                group[name][start : start + len(values)] = values
            group[done[0]][done[1]] = True
    except OSError as exc:
        needed = sum(v.nbytes if v.dtype != object else 64 * len(v) for v in columns.values())
        raise disk_full(exc, Path(store) / split, needed) or exc from None


def embed_caption_chunk(
    config_json: str,
    store: str,
    split: str,
    chunk: int,
    start: int,
    texts: tuple[str, ...],
    plan: threads.Plan,
) -> int:
    with threads.sharing(plan):
        _, _, encoder = extractor_models(config_json)
        batches = []
        for i in range(0, len(texts), TEXT_BATCH):
            threads.adjust()
            batches.append(encoder.encode_texts(list(texts[i : i + TEXT_BATCH])))
    embeddings = np.concatenate(batches)
    _write_rows(store, split, start, {"clip_text": embeddings.astype(np.float16)}, ("captions_done", chunk))
    return len(texts)


# --------------------------------------------------------------------------- driver side


def _strip_paths(value):
    """Config content without local file locations: the same weights elsewhere are the same config."""
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items() if k not in ("path", "model_config_file")}
    return value


def same_content(a: ExtractorConfig, b: ExtractorConfig) -> bool:
    return _strip_paths(a.model_dump(mode="json")) == _strip_paths(b.model_dump(mode="json"))


# what the codecs saved on the smallest store measured (the demo: 48 of 92 KB per image): a store that does
# not fit even at this size is refused before any work
COMPRESSED_AT_MOST = 0.5


def open_or_create(
    prepared: Prepared, output: Output, overwrite: bool, console: Console
) -> tuple[zarr.Group, StoreAttrs, Path | str]:
    """The store to extract into (a new one, or one to resume, its damaged chunks marked to redo) and where
    it is being written: the output itself, or its `replacing()` when `--overwrite` replaces a store
    (swapped in at the end). A new store is created whole beside its name and renamed into place, so a
    kill never leaves a half-created store that is neither resumable nor replaceable. At a URL, where
    nothing can be renamed, it is created in place, its attributes first: a creation that was cut short is
    recognised as userpipe's and created again."""
    config, index, out = prepared.config, prepared.index, prepared.out
    if output.state == "own" and output.at_url and overwrite:
        raise InputError(
            f"--overwrite: {out} is at a URL, where a store cannot be replaced in one step (an object store "
            "has no rename); remove it first, or choose another --out"
        )
    if output.state == "own" and not overwrite:
        try:
            root, attrs = open_store(out, mode="r+")
        except InputError:
            if not output.at_url or _recorded_complete(out):
                raise
            root = None  # a creation at a URL cut short: made again below
        if root is not None:
            if not same_content(attrs.extractor, config):
                raise InputError(
                    f"{prepared.out} was extracted with another configuration; pass --overwrite to "
                    "replace it, or --out for a new store"
                )
            return root.group, _mark_damage(out, root.group, attrs, index, console), out
    attrs = _new_attrs(prepared)
    if output.at_url:
        return create_store(out, attrs, index), attrs, out
    work = output.replacing() if output.state == "own" else out
    if work != out and output.holds_own(work):  # an interrupted replacement: resume it if it fits
        root, found = open_store(work, mode="r+")
        if same_content(found.extractor, config):
            return root.group, _mark_damage(work, root.group, found, index, console), work
        shutil.rmtree(work)
    with output.built(int(store_bytes(attrs) * COMPRESSED_AT_MOST), into=work) as building:
        create_store(building, attrs, index)
    return zarr.open_group(zarr_store(work, read_only=False), mode="r+", zarr_format=3), attrs, work


def _new_attrs(prepared: Prepared) -> StoreAttrs:
    index = prepared.index
    splits = {
        s: SplitSummary(num_images=len(recs), num_captions=sum(len(r.captions) for r in recs))
        for s, recs in index.splits.items()
    }
    image_root = str(index.image_root.resolve()) if index.image_root else None
    return StoreAttrs(extractor=prepared.config, splits=splits, image_root=image_root, chunk_checksums=True)


def _recorded_complete(url: str) -> bool:
    """The attributes userpipe recorded at `url` say the store was finished."""
    meta = json.loads(read_bytes(f"{url.rstrip('/')}/zarr.json", "the store's metadata"))
    return bool(meta["attributes"][ATTRS_KEY].get("complete"))


def _mark_damage(
    path: Path, root: zarr.Group, attrs: StoreAttrs, index: DatasetIndex, console: Console
) -> StoreAttrs:
    """Find missing or damaged chunks (crc32c) and mark them to be extracted again: a task's chunk loses
    its done-flag (a damaged shard is removed), an index array is rewritten from the dataset index. The store
    is incomplete meanwhile."""
    problems = store_problems(root, attrs)
    if not problems:
        return attrs
    console.print(
        f"{path}: {len(problems)} missing or damaged chunk(s), e.g. {problems[0].array} chunk "
        f"{problems[0].chunk} ({problems[0].problem}); extracting them again"
    )
    attrs = attrs.model_copy(update={"complete": False})
    write_attrs(root, attrs)
    for problem in problems:
        split, name = problem.array.split("/")
        written_by = split_array_specs(attrs.extractor, 1, 1)[name].written_by
        if written_by == "index":
            write_index_arrays(root[split], index.splits[split])
        else:
            with every_chunk_written():
                root[split][f"{written_by}_done"][problem.chunk] = False
            if root[split][name].shards and problem.problem != "missing":
                # a shard is rewritten by merging into what is there, which a damaged one cannot give: removed
                remove_chunk(root[split][name], problem.chunk)
    return attrs


def _image_chunks(prepared: Prepared, root: zarr.Group, work: Path) -> list[ImageChunk]:
    config, index = prepared.config, prepared.index
    size = config.chunk_size
    chunks = []
    for split, records in index.splits.items():
        done = done_flags(root[split], "images_done", num_chunks(len(records), size))
        refs = prepared.imports.refs[split] if prepared.imports else [None] * len(records)
        for c in range(num_chunks(len(records), size)):
            if done[c]:
                continue
            part = slice(c * size, (c + 1) * size)
            # absolute, not resolved: resolving follows links, and a link loop is one invalid image,
            # not a crash
            paths = tuple(
                os.path.abspath(index.image_root / r.file) if r.file and index.image_root else ""
                for r in records[part]
            )
            chunks.append(
                ImageChunk(
                    str(work),
                    split,
                    c,
                    c * size,
                    paths,
                    tuple(r.boxes for r in records[part]),
                    tuple(refs[part]),
                )
            )
    return chunks


def _caption_chunks(prepared: Prepared, root: zarr.Group, work: Path) -> list[tuple]:
    if not prepared.config.global_encoder.text_dim:
        return []
    size = caption_chunk_size(prepared.config)
    chunks = []
    for split, records in prepared.index.splits.items():
        texts = [c for r in records for c in r.captions]
        done = done_flags(root[split], "captions_done", num_chunks(len(texts), size))
        chunks += [
            (str(work), split, c, c * size, tuple(texts[c * size : (c + 1) * size]))
            for c in range(num_chunks(len(texts), size))
            if not done[c]
        ]
    return chunks


def run_extract(opts: ExtractOptions, console: Console) -> tuple[Path, StoreAttrs]:
    """`userpipe extract`: check everything (`prepare`), then run (or resume) the extraction; returns the
    store and the final attributes written to it."""
    prepared = prepare(opts)
    with claim(prepared.out, STORE, _given_inputs(opts) + [prepared.index.image_root]) as output:
        return prepared.out, _extract(prepared, output, opts, console)


def _device_and_workers(config: ExtractorConfig, opts: ExtractOptions, console: Console) -> tuple[str, int]:
    """The butd-vg detector's device, and the local workers: on CUDA one per GPU (each holds the model and
    res5's activations for 300 proposals), so --workers above the GPU count is lowered to it."""
    if "device" not in region_kind(config.regions.kind).reads or opts.device == "cpu":
        return "cpu", opts.workers
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if opts.device in (None, "auto") and not gpus:
        return "cpu", opts.workers
    if opts.scheduler is not None:
        return "cuda", opts.workers
    if opts.workers > gpus:
        console.print(f"--device cuda: {gpus} GPU(s), so {gpus} local worker(s) instead of {opts.workers}")
    return GPU_PER_LOCAL_WORKER, min(opts.workers, gpus)


def _extract(prepared: Prepared, output: Output, opts: ExtractOptions, console: Console) -> StoreAttrs:
    root, attrs, work = open_or_create(prepared, output, opts.overwrite, console)
    for partial in work.rglob("*.partial") if isinstance(work, Path) else ():  # Zarr's, when a kill came
        partial.unlink()
    image_chunks = _image_chunks(prepared, root, work)
    caption_chunks = _caption_chunks(prepared, root, work)
    total_images = sum(s.num_images for s in attrs.splits.values())
    todo_images = sum(len(c.paths) for c in image_chunks)
    if todo_images < total_images:
        console.print(f"resuming {work}: {total_images - todo_images} of {total_images} images already done")
    config_json = prepared.config.model_dump_json()
    if image_chunks or caption_chunks:
        device, workers = _device_and_workers(prepared.config, opts, console)
        with dask_client(workers, opts.scheduler) as (client, plan):
            tasks = [
                ("images", len(c.paths), extract_image_chunk, (config_json, c, plan, device))
                for c in image_chunks
            ]
            tasks += [
                ("captions", len(c[4]), embed_caption_chunk, (config_json, *c, plan)) for c in caption_chunks
            ]
            run_tasks(client, tasks, console)
    final = collect_failures(root, attrs)
    write_attrs(root, final)
    validate_store(root)
    if work != prepared.out:
        output.swap_in(work)
    return final
