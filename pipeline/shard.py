"""`userpipe shard` and `userpipe verify`: a store split -> WebDataset tar shards + manifest.

The plan (which image goes to which shard, in which order) is computed up front from the store's
metadata alone, seeded; one Dask task writes one shard, and a rerun keeps every shard that passes
`check_shard` against its record. How and why: docs/architecture.md, "`userpipe shard`".
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
import zarr
from pydantic import Field
from rich.console import Console
from rich.markup import escape

from userpipe.pipeline.cluster import dask_client, run_tasks
from userpipe.pipeline.shard_io import ShardDamage, check_shard, encode_sample, encoded_size
from userpipe.schemas.base import LocalWorkers, Options, Seed, file_sha256, read_model
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import (
    PLAN_NAME,
    SHARDS,
    Output,
    check_free_space,
    claim,
    remove_entry,
    write_text_atomic,
    written_whole,
)
from userpipe.schemas.shard import (
    MANIFEST_NAME,
    SIZES_NAME,
    SampleMeta,
    ShardError,
    ShardManifest,
    ShardPlanParams,
    ShardRecord,
    ShardSample,
    read_manifest,
)
from userpipe.schemas.sources import is_file, joined, location, resolved
from userpipe.schemas.store import caption_chunk_size
from userpipe.schemas.store_reader import REPAIR, open_store, store_problems, store_split, stored_rows

TAR_MTIME = 0  # fixed member times: the same plan gives byte-identical shards. An int: a float
# mtime makes tarfile add a pax header before every member, twice the headers a reader walks


@dataclass(frozen=True)
class ShardJob:
    store: str
    split: str
    out: str
    name: str
    indices: tuple[int, ...]  # store rows, in the order they go into the shard
    caption_starts: tuple[int, ...]  # per index: first caption row
    caption_counts: tuple[int, ...]
    encoded_bytes: int  # the plan's size of the shard (for a full disk's message)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def plan_shards(
    valid: np.ndarray, chunk: int, sizes: np.ndarray, seed: int, max_count: int, max_size: int
) -> list[np.ndarray]:
    """Seeded assignment of valid images to shards (docs/architecture.md, "`userpipe shard`")."""
    rng = np.random.default_rng(seed)
    n = len(valid)
    chunk_order = rng.permutation(-(-n // chunk))
    order = np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in chunk_order])
    order = order[valid[order]]
    shards, current, current_bytes = [], [], 0
    for index in order:
        if current and (len(current) >= max_count or current_bytes + sizes[index] > max_size):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += sizes[index]
    if current:
        shards.append(current)
    return [rng.permutation(np.array(s)) for s in shards]


def _record_path(out: Path | str, name: str) -> Path | str:
    return joined(out, f".{name}.json")


def write_shard(job: ShardJob) -> ShardRecord:
    group = open_store(location(job.store))[0][job.split]  # checked reads: damage is named, never read as NaN
    has_clip, has_text = "clip_image" in group, "clip_text" in group
    chunk = stored_rows(group["regions"])  # whole stored objects: one read each
    wanted = np.array(job.indices)
    samples: dict[int, ShardSample] = {}
    for c in np.unique(wanted // chunk):  # whole chunks, in order: sequential reads
        rows = slice(c * chunk, (c + 1) * chunk)
        block = {
            name: group[name][rows]
            for name in ("regions", "boxes", "num_regions", "image_id", "file", "width", "height")
        }
        if has_clip:
            block["clip_image"] = group["clip_image"][rows]
        mine = [i for i in range(len(job.indices)) if job.indices[i] // chunk == c]
        first = min(job.caption_starts[i] for i in mine)
        last = max(job.caption_starts[i] + job.caption_counts[i] for i in mine)
        texts = group["caption_text"][first:last]
        text_emb = group["clip_text"][first:last] if has_text else None
        for i in mine:
            index, local = job.indices[i], job.indices[i] - c * chunk
            k = int(block["num_regions"][local])
            caps = slice(job.caption_starts[i] - first, job.caption_starts[i] - first + job.caption_counts[i])
            samples[index] = ShardSample(
                meta=SampleMeta(
                    image_id=str(block["image_id"][local]),
                    split=job.split,
                    index=index,
                    file=str(block["file"][local]),
                    width=int(block["width"][local]),
                    height=int(block["height"][local]),
                    num_regions=k,
                    num_captions=job.caption_counts[i],
                ),
                regions=block["regions"][local, :k],
                boxes=block["boxes"][local, :k],
                captions=[str(t) for t in texts[caps]],
                clip_image=block["clip_image"][local] if has_clip else None,
                clip_text=text_emb[caps] if has_text else None,
            )
    out = location(job.out)
    # per process: two workers never share one (at a URL, a local temporary file)
    scratch = out / f".{job.name}.tmp-{os.getpid()}" if isinstance(out, Path) else None
    with written_whole(joined(out, job.name), job.encoded_bytes, scratch) as temporary:
        with open(temporary, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=TAR_MTIME, encoder=False)
            for index in job.indices:
                writer.write(encode_sample(samples[index]))
            writer.close()
        record = ShardRecord(
            name=job.name,
            samples=len(job.indices),
            captions=sum(job.caption_counts),
            bytes=temporary.stat().st_size,
            sha256=file_sha256(temporary),
        )
    write_text_atomic(_record_path(out, job.name), record.model_dump_json())  # last: marks the shard finished
    return record


def _finished(
    out: Path | str,
    name: str,
    recorded: dict[str, ShardRecord],
    fields: tuple[str, ...],
    feature_dim: int,
    console: Console,
) -> ShardRecord | None:
    """The shard's record (its own, or the manifest's of the same plan) if the shard passes `check_shard`
    against it, else None (it gets rewritten; a shard that differs from its record is named, as `userpipe
    verify` names it)."""
    path = _record_path(out, name)
    if is_file(path, "a shard record"):
        try:
            record = read_model(ShardRecord, path, "shard record")
        except InputError:  # damaged by the disk: the shard is checked again by rewriting it
            return None
    elif name in recorded:
        record = recorded[name]
    else:
        return None  # not written yet, or killed before its record: nothing to report
    try:
        check_shard(record, str(joined(out, name)), fields=fields, feature_dim=feature_dim)
    except ShardDamage as damage:
        console.print(f"{escape(name)}: {escape(damage.problem)}; writing it again", highlight=False)
        return None
    except ShardError as unread:  # at a URL, a missing shard cannot be read (locally: ShardDamage)
        console.print(f"{escape(name)}: {escape(str(unread))}; writing it again", highlight=False)
        return None
    return record


class ShardOptions(Options):
    store: str  # a folder or a URL (`location`)
    split: str
    out: str | None  # a folder or an object-store URL; None: STORE-shards/SPLIT beside the store
    max_count: int = Field(ge=1, le=10_000_000)
    max_size: int = Field(ge=1)  # bytes (the command line's float, when whole)
    seed: Seed
    workers: LocalWorkers
    scheduler: str | None
    overwrite: bool


def _caption_layout(group: zarr.Group, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(group["caption_image"][:], minlength=num_images)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]), counts


def run_shard(opts: ShardOptions, console: Console) -> tuple[Path, ShardManifest]:
    """`userpipe shard`: pack a store split into shards (resuming a killed run); returns the folder
    and manifest."""
    store = location(opts.store)
    if opts.out is None:
        if not isinstance(store, Path):
            raise InputError(f"--store {store} is a URL: name the shards' folder with --out")
        opts = opts.model_copy(update={"out": str(store.with_name(store.stem + "-shards") / opts.split)})
    root, attrs = open_store(store)
    if not attrs.complete:
        raise InputError(f"{opts.store} is incomplete; finish it with userpipe extract first")
    store_split(opts.store, root, attrs, opts.split)
    # a lost chunk file is refused before anything is written (a listing, no reads); damaged bytes
    # are found by the crc32c as the tasks read them, leaving a folder that a rerun resumes
    missing = [
        p for p in store_problems(root, attrs, check_bytes=False) if p.array.startswith(f"{opts.split}/")
    ]
    if missing:
        raise InputError(
            f"{opts.store}: chunk {missing[0].chunk} of array '{missing[0].array}' is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; {REPAIR}"
        )
    group = root[opts.split]
    valid = group["valid"][:]
    if not valid.any():
        raise InputError(f"split '{opts.split}' of {opts.store} has no valid images")
    params = ShardPlanParams(
        source_store=resolved(store),
        split=opts.split,
        store_config=attrs.extractor,
        seed=opts.seed,
        max_count=opts.max_count,
        max_size=opts.max_size,
    )
    out = location(opts.out)
    with claim(out, SHARDS, [opts.store]) as output:
        return out, _write_shards(opts, out, output, console, group, attrs, valid, params)


def _write_shards(
    opts: ShardOptions,
    out: Path | str,
    output: Output,
    console: Console,
    group,
    attrs,
    valid: np.ndarray,
    params: ShardPlanParams,
) -> ShardManifest:
    summary = attrs.splits[opts.split]
    starts, counts = _caption_layout(group, summary.num_images)
    text_bytes = _caption_bytes(group, starts, counts, caption_chunk_size(attrs.extractor))
    glob = attrs.extractor.global_encoder
    sizes = np.array(
        [
            encoded_size(
                int(k), attrs.extractor.feature_dim, int(n), glob.image_dim, bool(glob.text_dim), int(t)
            )
            for k, n, t in zip(group["num_regions"][:], counts, text_bytes, strict=True)
        ]
    )
    plan = plan_shards(valid, attrs.extractor.chunk_size, sizes, opts.seed, opts.max_count, opts.max_size)
    local = not output.at_url  # an object store has no free space to check, no scratch names to clear
    if local and output.state != "own":  # new shards: all of them must fit, known before the first is written
        check_free_space(out, int(sum(sizes[idx].sum() for idx in plan)))
    work = _work_folder(out, output, params, opts.overwrite)
    for leftover in work.glob(".*.tar.tmp-*") if local else ():  # being written when a writer was killed
        leftover.unlink()
    manifest_path = joined(work, MANIFEST_NAME)
    recorded = (
        {r.name: r for r in read_model(ShardManifest, manifest_path, "shard manifest").shards}
        if is_file(manifest_path, "the shard manifest") and _plan_of(work) == params
        else {}
    )
    jobs = [
        ShardJob(
            str(opts.store),
            opts.split,
            str(work),
            shard_name(opts.split, number),
            tuple(map(int, idx)),
            tuple(int(starts[i]) for i in idx),
            tuple(int(counts[i]) for i in idx),
            int(sizes[idx].sum()),
        )
        for number, idx in enumerate(plan)
    ]
    fields = (
        ("regions.npy", "boxes.npy", "captions.json", "meta.json")
        + (("clip_image.npy",) if glob.image_dim else ())
        + (("clip_text.npy",) if glob.text_dim else ())
    )
    feature_dim = attrs.extractor.feature_dim
    done = {
        job.name: record
        for job in jobs
        if (record := _finished(work, job.name, recorded, fields, feature_dim, console))
    }
    todo = [job for job in jobs if job.name not in done]
    if local:
        check_free_space(work, sum(job.encoded_bytes for job in todo))  # a resume: what is left to write
    if done:
        console.print(f"resuming {work}: {len(done)} of {len(jobs)} shards already written and verified")
    if todo:
        with dask_client(opts.workers, opts.scheduler) as (client, _):
            records = run_tasks(
                client,
                [("samples", len(j.indices), write_shard, (j,)) for j in todo],
                console,
                unit="samples",
            )
        done.update({r.name: r for r in records})

    shards = tuple(done[job.name] for job in jobs)
    manifest = ShardManifest(
        params=params,
        fields=fields,
        shards=shards,
        num_samples=sum(s.samples for s in shards),
        num_captions=sum(s.captions for s in shards),
        num_invalid_skipped=int((~valid).sum()),
    )
    write_text_atomic(joined(work, SIZES_NAME), json.dumps({s.name: s.samples for s in shards}, indent=1))
    write_text_atomic(joined(work, MANIFEST_NAME), manifest.model_dump_json(indent=1))
    for job in jobs:
        remove_entry(_record_path(work, job.name))
    remove_entry(joined(work, PLAN_NAME))
    if work != out:
        output.swap_in(work)
    return manifest


def _caption_bytes(group: zarr.Group, starts: np.ndarray, counts: np.ndarray, chunk: int) -> np.ndarray:
    """UTF-8 bytes of each image's captions, read a caption chunk at a time."""
    per_caption = np.concatenate(
        [
            [len(str(t).encode()) for t in group["caption_text"][i : i + chunk]]
            for i in range(0, group["caption_text"].shape[0], chunk)
        ]
    )
    sums = np.concatenate([[0], np.cumsum(per_caption)])
    return sums[starts + counts] - sums[starts]


def _plan_of(folder: Path | str) -> ShardPlanParams | None:
    """The plan a folder of userpipe shards was (or is being) written for."""
    plan, manifest = joined(folder, PLAN_NAME), joined(folder, MANIFEST_NAME)
    if is_file(plan, "the shard plan"):
        return read_model(ShardPlanParams, plan, "shard plan")
    if is_file(manifest, "the shard manifest"):
        return read_model(ShardManifest, manifest, "shard manifest").params
    return None


def _work_folder(out: Path | str, output: Output, params: ShardPlanParams, overwrite: bool) -> Path | str:
    """The folder to write shards of this plan into: `out` (new, or holding part of the same plan) or,
    when `--overwrite` replaces shards of another plan, its `replacing()`, swapped in at the end."""
    work = out
    if output.state == "own" and _plan_of(out) != params:
        if not overwrite:
            raise InputError(
                f"{out} holds shards of another plan; pass --overwrite to replace them, or another --out"
            )
        if output.at_url:  # no rename there: the old shards could not stay whole until the new ones are
            raise InputError(f"--overwrite cannot replace shards at a URL ({out}); choose another --out")
        work = output.replacing()
        if output.holds_own(work) and _plan_of(work) != params:
            shutil.rmtree(work)
    if output.at_url:  # the plan first: what makes the URL recognisable as userpipe's to a rerun
        if output.state == "new" or not is_file(joined(out, PLAN_NAME), "the shard plan"):
            write_text_atomic(joined(out, PLAN_NAME), params.model_dump_json())
    elif not output.holds_own(work):
        output.create({PLAN_NAME: params.model_dump_json()}, at=work)
    elif not (work / PLAN_NAME).is_file():
        write_text_atomic(work / PLAN_NAME, params.model_dump_json())
    return work


@dataclass(frozen=True)
class ShardProblem:
    name: str
    problem: str


def verify_shards(directory: Path | str) -> tuple[ShardManifest, list[ShardProblem]]:
    """The manifest's totals, and every shard by `check_shard` (the loader's and a rerun's check)."""
    path, manifest = read_manifest(directory)
    folder = path.parent if isinstance(path, Path) else path.rsplit("/", 1)[0]
    problems = []
    totals = (sum(s.samples for s in manifest.shards), sum(s.captions for s in manifest.shards))
    if totals != (manifest.num_samples, manifest.num_captions):
        problems.append(
            ShardProblem(
                MANIFEST_NAME,
                f"its shards add up to {totals[0]} samples and {totals[1]} "
                f"captions, its totals say {manifest.num_samples} and "
                f"{manifest.num_captions}",
            )
        )
    feature_dim = manifest.params.store_config.feature_dim
    for record in manifest.shards:
        try:
            check_shard(
                record,
                str(joined(folder, record.name)),
                fields=manifest.fields,
                feature_dim=feature_dim,
            )
        except ShardDamage as damage:
            problems.append(ShardProblem(record.name, damage.problem))
        except ShardError as unread:  # at a URL: a missing shard cannot be read
            problems.append(ShardProblem(record.name, str(unread)))
    return manifest, problems
