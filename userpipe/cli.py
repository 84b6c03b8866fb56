"""The `userpipe` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's own click
from typer.core import TyperGroup

from userpipe.pipeline.region_kinds import KINDS
from userpipe.schemas import threads
from userpipe.schemas.errors import InputError
from userpipe.schemas.sources import location
from userpipe.trainer.process import quiet_model_loading


class OneLineUsageErrors(TyperGroup):
    """Usage errors (a value of the wrong type, a missing or unknown option) as one line, exit 2, like every
    other bad input, instead of click's framed usage text."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:  # `userpipe` alone: the help
            return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
        except UsageError as exc:
            where = f"userpipe {exc.ctx.info_name}: " if exc.ctx and exc.ctx.parent else ""
            console.print(f"[red]error:[/red] {escape(where + ' '.join(exc.format_message().split()))}")
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:
            console.print("aborted")
            sys.exit(EXIT_FAILURES)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="USER image-text retrieval: extract features -> shard -> train -> eval, then index and search.",
)
console = Console(stderr=True, soft_wrap=True)  # long paths and errors stay on one line
EXIT_BAD_INPUT, EXIT_FAILURES, EXIT_INTERRUPTED = 2, 1, 130
SHOWN_FAILURES = 20


# OS errors that a user's paths and disks cause (not bugs in userpipe): reported in one line
USER_OS_ERRORS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENOSPC,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EBUSY,
    errno.EXDEV,
}


# the clients of object stores (through fsspec): their exceptions are the store's answer (no credentials, no
# endpoint, access denied), not userpipe's bug
OBJECT_STORE_CLIENTS = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp"}


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an expected failure; None for a bug, which keeps its traceback."""
    if isinstance(exc, InputError):
        return str(exc)
    if type(exc).__module__.split(".")[0] in OBJECT_STORE_CLIENTS:
        return f"the object store: {type(exc).__name__}: {' '.join(str(exc).split())}"
    if isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror}" if where else exc.strerror or str(exc)
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_option_rules(
    function, values: dict, excludes: tuple[tuple[str, ...], ...], requires: dict[str, str]
) -> None:
    """Refuse options given together that exclude each other, or one given without the option it
    qualifies. Given: another value than the option's default (so defaults that depend on the machine,
    like --workers, are None and resolved by the stage)."""
    parameters = inspect.signature(function).parameters
    defaults = {name: getattr(p.default, "default", p.default) for name, p in parameters.items()}
    for name, value in values.items():  # an empty text never means the default: a script's unset variable
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            is_argument = isinstance(parameters[name].default, typer.models.ArgumentInfo)
            raise InputError(f"{'the ' + name if is_argument else _flag(name)} is empty")
    given = {name for name, value in values.items() if name in defaults and value != defaults[name]}
    for group in excludes:
        both = [name for name in group if name in given]
        if len(both) > 1:
            raise InputError(f"{' and '.join(map(_flag, both))} exclude each other; give one of them")
    for name, needed in requires.items():
        if name in given and needed not in given:
            raise InputError(f"{_flag(name)} applies only with {_flag(needed)}")


def command(
    *args,
    resumable: bool = False,
    excludes: tuple[tuple[str, ...], ...] = (),
    requires: dict[str, str] | None = None,
    **kwargs,
):
    """Register a command behind the one error boundary: expected failures print `error: <line>` and
    exit 2; Ctrl-C exits 130 (with the resume hint for resumable stages); bugs keep their traceback.
    `excludes`: groups of options of which at most one may be given; `requires`: option -> the option it
    needs (tests/test_cli_contract.py generates a refusal for each)."""

    def register(function):
        function.option_rules = (excludes, requires or {})

        @functools.wraps(function)
        def bounded(*a, **k):
            sys.audit("userpipe.command", function.__name__, True)  # tests check its writes (conftest.py)
            try:
                check_option_rules(function, k, excludes, requires or {})
                with threads.sharing():  # the command's torch threads follow the free cores
                    return function(*a, **k)
            except KeyboardInterrupt:
                console.print("interrupted" + ("; rerun the same command to resume" if resumable else ""))
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except Exception as exc:  # noqa: BLE001 - user_error tells expected failures from bugs
                message = user_error(exc)
                if message is None:
                    raise
                console.print(f"[red]error:[/red] {escape(message)}", highlight=False)  # paths may hold [ ]
                raise typer.Exit(EXIT_BAD_INPUT) from None
            finally:
                sys.audit("userpipe.command", function.__name__, False)

        return app.command(*args, **kwargs)(bounded)

    return register


def _options(model, values: dict, **resolved):
    """A stage's options model from the command's parameters of the same names (`resolved`: those the
    command line gives in another form), validated: a value out of range is one line naming its flag."""
    return model.checked(**{name: resolved.get(name, values[name]) for name in model.model_fields})


def _read_by(option: str) -> str:
    """The region kinds that read an extract option, for its help (the registry says which)."""
    return ", ".join(kind.name for kind in KINDS.values() if option in kind.reads)


def print_whole(out: Console, table: Table) -> None:
    """A table with no cell cut short: off a terminal (a file or pipe, which has no width) at its own width
    rather than rich's guess of 80 columns; on a terminal narrower than it, long cells fold onto more lines
    instead of ending in an ellipsis."""
    for column in table.columns:
        column.overflow = "fold"
    if not out.is_terminal:
        natural = Measurement.get(out, out.options.update_width(10_000), table).maximum
        out = Console(soft_wrap=True, width=max(out.width, natural))
    out.print(table)


def _local_workers(workers: int | None) -> int:
    return os.cpu_count() or 1 if workers is None else workers


@command(resumable=True, excludes=(("scheduler", "workers"),))
def extract(
    dataset: str = typer.Option("demo", help="coco, f30k, demo, or a path to a Karpathy-format JSON"),
    root: Path = typer.Option(None, help="dataset folder (default data/DATASET)"),
    out: str = typer.Option(
        None,
        help="output store: a folder or an object-store URL such as s3://bucket/coco.zarr (default "
        "data/DATASET.zarr)",
    ),
    splits: str = typer.Option("train,val,test", help="comma-separated splits to extract"),
    regions: str = typer.Option(
        None,
        help=" | ".join(
            f"{kind.name}{':' + kind.location if kind.location else ''} ({kind.summary})"
            for kind in KINDS.values()
        )
        + " (default: boxes for demo, butd otherwise)",
    ),
    backbone: str = typer.Option(
        None, help=f"{_read_by('backbone')}: region feature backbone (default efficientnet_lite0)"
    ),
    backbone_weights: str = typer.Option(
        None,
        help=f"{_read_by('backbone_weights')}: backbone weights file (default: packaged or torchvision's)",
    ),
    detector_weights: str = typer.Option(
        None,
        help=f"{_read_by('detector_weights')}: detector weights (butd-vg: airsplay's .pkl or MILVLG's .pth; "
        "butd: a torchvision Faster R-CNN file)",
    ),
    detector_config: str = typer.Option(
        None,
        help=f"{_read_by('detector_config')}: a packaged config name or a detectron2 .yaml file "
        "(default butd_vg_r101_c4)",
    ),
    min_regions: int = typer.Option(
        None,
        help=f"{_read_by('min_regions')}: keep between this many and --num-regions boxes per image by "
        "confidence (the released adaptive mode is 10 to 100; default: exactly --num-regions)",
    ),
    device: str = typer.Option(
        None, help=f"{_read_by('device')}: auto (the default), cpu or cuda (one GPU per Dask worker)"
    ),
    clip: str = typer.Option(
        None,
        help="MODEL:PRETRAINED (open_clip tag or weights file), imagenet:BACKBONE, "
        "or none (default: imagenet:efficientnet_lite0 for demo, ViT-B-32:openai)",
    ),
    num_regions: int = typer.Option(36, help="regions per image (R)"),
    image_size: int = typer.Option(
        None, help="shorter image side for region features (default 600; demo 256)"
    ),
    chunk_size: int = typer.Option(64, help="images per Zarr chunk and per Dask task"),
    images: int = typer.Option(None, help="demo only: number of images to generate (default 3200)"),
    workers: int = typer.Option(
        None, help="local Dask worker processes (1: one worker in this process; default: the CPU count)"
    ),
    scheduler: str = typer.Option(None, help="address of an existing dask.distributed scheduler"),
    overwrite: bool = typer.Option(
        False, help="replace an existing store extracted with another configuration"
    ),
    allow_failures: bool = typer.Option(False, help="exit 0 even if some images could not be read"),
) -> None:
    """Compute region features and global embeddings into a Zarr store (resumable)."""
    from userpipe.pipeline.datasets import parse_splits
    from userpipe.pipeline.extract import ExtractOptions, run_extract

    opts = _options(ExtractOptions, locals(), splits=parse_splits(splits), workers=_local_workers(workers))
    out, attrs = run_extract(opts, console)
    for split, summary in attrs.splits.items():
        console.print(
            f"{split}: {summary.num_images} images, {summary.num_captions} captions, "
            f"{summary.num_invalid} invalid"
        )
    console.print(f"wrote {out}")
    if attrs.failures:
        console.print(f"[red]{len(attrs.failures)} image(s) could not be used:[/red]")
        for f in attrs.failures[:SHOWN_FAILURES]:
            console.print(f"  {f.split}[{f.index}] {f.image_id} {f.file}: {f.error}", highlight=False)
        if len(attrs.failures) > SHOWN_FAILURES:
            console.print(f"  ... {len(attrs.failures) - SHOWN_FAILURES} more (userpipe info {out} --json)")
        if not allow_failures:
            raise typer.Exit(EXIT_FAILURES)


@command()
def info(
    path: str = typer.Argument(..., help="a store written by userpipe extract (a folder or a URL)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Summarize a store: schema version, per-split counts, arrays, extractor configuration."""
    from userpipe.schemas.store_reader import store_summary

    summary = store_summary(location(path))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out = Console(soft_wrap=True)
    ext = summary["extractor"]
    out.print(
        f"[bold]{path}[/bold]  schema {summary['schema_version']}  "
        f"{'complete' if summary['complete'] else '[yellow]incomplete (rerun extract to resume)[/yellow]'}"
    )
    regions, glob = ext["regions"], ext["global_encoder"]
    region_model = regions.get("backbone") or regions.get("detector") or regions.get("source") or ""
    out.print(
        f"dataset {ext['dataset']}  regions {regions['kind']} {region_model}  R={ext['num_regions']} "
        f"D={ext['feature_dim']}  global {glob['kind']} {glob.get('model') or ''}",
        highlight=False,
    )
    # the schema's clip_* arrays hold whatever global encoder the store has: named after it
    kind = "" if glob["kind"] == "none" else f"\n({glob['kind']})"
    arrays = {"regions": "regions", "clip_image": f"global image{kind}", "clip_text": f"global text{kind}"}
    first = next(iter(summary["splits"].values()))["arrays"]
    table = Table("split", "images", "captions", "invalid")
    for name, label in arrays.items():
        table.add_column(f"{label}\n{first[name]['dtype']}" if name in first else label)
    for split, s in summary["splits"].items():
        shapes = [
            "x".join(map(str, s["arrays"][name]["shape"])) if name in s["arrays"] else "-" for name in arrays
        ]
        table.add_row(split, str(s["num_images"]), str(s["num_captions"]), str(s["num_invalid"]), *shapes)
    print_whole(out, table)
    if summary["failures"]:
        out.print(f"{len(summary['failures'])} invalid image(s); see --json for the list")
    if summary["missing_chunks"]:
        out.print(
            f"[red]damaged: {len(summary['missing_chunks'])} chunk file(s) missing[/red] "
            f"({', '.join(summary['missing_chunks'][:3])}); rerun userpipe extract to re-extract them"
        )


@command(resumable=True, excludes=(("scheduler", "workers"),))
def shard(
    store: str = typer.Option(..., help="a store written by userpipe extract (a folder or a URL)"),
    split: str = typer.Option("train", help="the split to shard"),
    out: str = typer.Option(
        None, help="output folder or object-store URL (default: STORE-shards/SPLIT beside the store)"
    ),
    max_count: int = typer.Option(1000, help="samples (images) per shard at most"),
    max_size: float = typer.Option(1e9, help="bytes per shard at most (by the encoded sample sizes)"),
    seed: int = typer.Option(0, help="seed of the image-to-shard assignment and order"),
    workers: int = typer.Option(
        None, help="local Dask worker processes (1: one worker in this process; default: the CPU count)"
    ),
    scheduler: str = typer.Option(None, help="address of an existing dask.distributed scheduler"),
    overwrite: bool = typer.Option(False, help="replace shards of another plan in --out"),
) -> None:
    """Pack a store split into WebDataset tar shards with a manifest (resumable)."""
    from userpipe.pipeline.shard import ShardOptions, run_shard

    out, manifest = run_shard(
        _options(ShardOptions, locals(), workers=_local_workers(workers)),
        console,
    )
    console.print(
        f"wrote {len(manifest.shards)} shards to {out}: {manifest.num_samples} images, "
        f"{manifest.num_captions} captions, {manifest.num_invalid_skipped} invalid images left out"
    )


@command()
def verify(
    path: str = typer.Argument(
        ...,
        help="a store written by userpipe extract, or shards written by userpipe shard (a folder or a URL)",
    ),
) -> None:
    """Check every chunk of a store (crc32c) or every shard (sha256, samples) against what was recorded;
    exit 1 if any is missing, truncated or altered."""
    from userpipe.schemas.store_reader import REPAIR, is_store, verify_store

    path = location(path)
    if is_store(path):
        attrs, problems = verify_store(path)
        for problem in problems:
            console.print(
                f"[red]{problem.array}[/red] chunk {problem.chunk}: {problem.problem}", highlight=False
            )
        if problems:
            console.print(f"{len(problems)} chunk(s) of {path} failed verification; {REPAIR}")
            raise typer.Exit(EXIT_FAILURES)
        state = "complete" if attrs.complete else "incomplete (rerun extract to finish it)"
        checked = (
            "crc32c of every chunk"
            if attrs.chunk_checksums
            else "every chunk decoded (no checksums: an older store)"
        )
        console.print(f"{path} OK, {state}: {checked}")
        return
    from userpipe.pipeline.shard import verify_shards

    manifest, problems = verify_shards(path)
    for problem in problems:
        console.print(f"[red]{problem.name}[/red]: {problem.problem}", highlight=False)
    if problems:
        console.print(f"{len(problems)} of {len(manifest.shards)} shards failed verification")
        raise typer.Exit(EXIT_FAILURES)
    console.print(f"{len(manifest.shards)} shards OK ({manifest.num_samples} samples)")


@command()
def export(
    store: str = typer.Option(..., help="a complete store written by userpipe extract (a folder or a URL)"),
    split: str = typer.Option(..., help="the split to export"),
    format: str = typer.Option(..., "--format", help="npz (bottom-up-attention.pytorch) or tsv (LXMERT)"),
    out: Path = typer.Option(..., help="a new folder (npz) or file (tsv)"),
) -> None:
    """Write a store split's regions, boxes and detections in the interchange formats the importers
    (--regions npz:DIR, tsv:GLOB) read back."""
    from rich.progress import Progress

    from userpipe.pipeline.export import export_split

    with Progress(console=console, transient=True) as progress:
        count = export_split(location(store), split, format, out, progress)
    console.print(f"wrote {count} images to {out}")


@command(resumable=True, requires={"allow_change": "resume"})
def train(
    shards: str = typer.Option(
        None, help="shard folder (or a brace pattern) written by userpipe shard (on --resume: the run's)"
    ),
    val_store: str = typer.Option(
        None, help="store (a folder or a URL) whose 'val' split selects the model (on --resume: the run's)"
    ),
    config: str = typer.Option(
        None, help="coco, f30k, demo, or a YAML file (default demo; on --resume: the run's)"
    ),
    out: Path = typer.Option(..., help="run directory"),
    set_: list[str] = typer.Option(
        [], "--set", help="override, e.g. --set train.lr=1e-4 --set model.enhancement=none"
    ),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    allow_change: bool = typer.Option(
        False,
        help="on --resume: accept a recipe or data different from the run's "
        "(e.g. more epochs), recorded in run.json and the log",
    ),
    deterministic: bool = typer.Option(
        False,
        help="bit-exact resume on the CPU at some speed (= --set train.deterministic=true; "
        "bench/results/train_throughput.md)",
    ),
    report_to: str = typer.Option(
        None,
        help="also report log.jsonl's records to tensorboard and/or wandb (comma-separated; RUN/tensorboard, "
        "RUN/wandb); give it again on --resume",
    ),
    seeds: str = typer.Option(
        None,
        help="comma-separated seeds (e.g. 1,2,3,4,5): one run per seed in OUT/seed-N, train.seed=N; "
        "compare them with userpipe report --compare OUT (mean ± std)",
    ),
) -> None:
    """Train USER on streamed shards, validating and checkpointing every epoch."""
    from userpipe.trainer.evaluate import format_table
    from userpipe.trainer.train import TrainRequest, parse_seeds, train_command
    from userpipe.trainer.training_page import TRAINING_PAGE

    overrides = [*set_, "train.deterministic=true"] if deterministic else set_
    val = location(val_store) if val_store is not None else None
    request = TrainRequest(
        shards, val, config, tuple(overrides), resume, allow_change, report_to, parse_seeds(seeds)
    )
    for run, best in train_command(out, request, console):  # [] on ranks other than 0: rank 0 reports
        print(format_table(best, f"best validation ({run})"))
        console.print(f"training curves and tables: {run / TRAINING_PAGE}")


@command(
    "eval",
    excludes=(("run", "checkpoint", "ensemble", "zero_shot"),),
    requires={"cxc": "coco_captions", "coco_captions": "cxc"},
)
def evaluate(
    store: str = typer.Option(..., help="store to evaluate on (a folder or a URL)"),
    run: Path = typer.Option(None, help="run directory (uses its best checkpoint)"),
    checkpoint: Path = typer.Option(None, help="a checkpoint directory instead of --run"),
    ensemble: str = typer.Option(
        None, help="comma-separated run directories whose similarities are averaged"
    ),
    split: str = typer.Option("test", help="split of the store"),
    protocol: str = typer.Option(
        "full", help="coco1k (5-fold mean), coco5k, f30k, full, or cxc (Crisscrossed Captions on COCO 5K)"
    ),
    cxc: Path = typer.Option(None, help="for cxc: the folder with CxC's sits_test.csv"),
    coco_captions: Path = typer.Option(None, help="for cxc: COCO's captions_val2014.json"),
    zero_shot: str = typer.Option(
        None,
        help="the baseline instead of a run: the store's CLIP image globals against captions embedded by the "
        "same open_clip model's text tower (MODEL:PRETRAINED, as extract's --clip)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """R@1/5/10, medr, meanr and RSUM on the standard protocols."""
    from userpipe.retrieval.evaluate import evaluate_split, evaluation_embedder
    from userpipe.retrieval.zero_shot import zero_shot_label
    from userpipe.trainer.evaluate import format_table

    runs = tuple(Path(r) for r in ensemble.split(",")) if ensemble else ()
    store = location(store)
    embed = evaluation_embedder(store, split, run, checkpoint, runs, zero_shot)
    metrics = evaluate_split(store, split, protocol, embed, cxc, coco_captions)
    if as_json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "folds"}, indent=2))
    else:
        what = f"{zero_shot_label(zero_shot)}: " if zero_shot else ""
        print(format_table(metrics, f"{what}{protocol} on {store} [{split}]"))


@command(excludes=(("run", "checkpoint"),))
def index(
    store: str = typer.Option(..., help="store holding the gallery (a folder or a URL)"),
    out: Path = typer.Option(..., help="index folder to write (an existing index there is replaced)"),
    run: Path = typer.Option(None, help="run directory (uses its best checkpoint)"),
    checkpoint: Path = typer.Option(None, help="a checkpoint directory instead of --run"),
    split: str = typer.Option("test", help="split of the store to index"),
    image_root: Path = typer.Option(
        None, help="folder the store's image files are relative to (default: where extract found them)"
    ),
    kind: str = typer.Option(
        "flat",
        help="flat (exact), ivf, hnsw or ivfpq (approximate: recall against exact measured and recorded)",
    ),
    max_memory: str = typer.Option(
        None, help="memory for both indexes, e.g. 2GB: the parameters are chosen to fit it, or it is refused"
    ),
) -> None:
    """Embed a store split's images and captions into faiss indexes: exact, or approximate with its recall."""
    from userpipe.retrieval.index import IndexRequest, index_command, index_summary

    request = IndexRequest(location(store), split, out, image_root, kind, max_memory)
    manifest = index_command(request, run, checkpoint)
    console.print(
        f"wrote {out}: {manifest.num_images} images, {manifest.num_captions} captions, "
        f"{manifest.embed_dim}-d, model {manifest.model.sha256[:12]}"
    )
    for gallery, built in manifest.galleries.items():
        console.print(f"  {gallery}: {index_summary(manifest.kind, built)}", highlight=False)


def _shown(path: Path | None, fallback: str) -> str:
    """A path as short as it can be said: relative to the working directory when it is below it."""
    if path is None:
        return fallback
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@command(excludes=(("run", "checkpoint"),))
def search(
    query: str = typer.Argument(
        ..., help="a text (gallery --images), or an image id or file (gallery --captions)"
    ),
    index: Path = typer.Option(..., help="folder written by userpipe index"),
    run: Path = typer.Option(
        None, help="the run the index was built with (default: the checkpoint the index records)"
    ),
    checkpoint: Path = typer.Option(None, help="a checkpoint directory instead of --run"),
    k: int = typer.Option(5, "-k", "--top-k", help="results to show"),
    images: bool = typer.Option(
        True, "--images/--captions", help="gallery: images (text query) or captions (image query)"
    ),
    html_out: Path = typer.Option(None, "--html", help="also write an HTML page with thumbnails"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Text -> image (or image -> text) search in an index, with the model that built it."""
    from userpipe.api import Index, check_query
    from userpipe.retrieval.html import write_html
    from userpipe.retrieval.index import index_summary
    from userpipe.schemas.outputs import HTML, check_output
    from userpipe.trainer.checkpoint import checkpoint_dir

    check_query(query, k)  # before the index and the model are read
    if html_out:
        check_output(html_out, HTML, [index], "--html")
    found = Index(index, checkpoint_dir(run, checkpoint) if run or checkpoint else None)
    hits = found.search(query, k) if images else found.search_image(query, k)
    searcher = found.searcher
    gallery, manifest = "images" if images else "captions", searcher.manifest
    built = (manifest.galleries or {}).get(gallery)  # None before schema 1.2: exact
    console.print(f"{gallery} index: {index_summary(manifest.kind, built)}", highlight=False)
    # a free text or a new image file has no ground truth: no match column rather than an empty one
    known = any(h.correct is not None for h in hits)
    if as_json:  # a caption's image by id too, beside its row number
        print(
            json.dumps(
                [
                    {
                        "rank": h.rank,
                        "score": h.score,
                        **h.item,
                        **({} if images else {"image_id": h.image_id}),
                        **({"correct": h.correct} if known else {}),
                    }
                    for h in hits
                ],
                indent=1,
            )
        )
    else:
        if images:
            table = Table("rank", "score", "image id", "file", title=f"{query!r}")
            rows = [[h.item["id"], _shown(searcher.file(h.row), h.item["file"])] for h in hits]
        else:
            table = Table("rank", "score", "caption", "its image", title=f"captions for {query}")
            rows = [[h.item["text"], h.image_id] for h in hits]
        if known:
            table.add_column("match")
        for h, row in zip(hits, rows, strict=True):
            match = ["[green]yes[/green]" if h.correct else "no"] if known else []
            table.add_row(str(h.rank), f"{h.score:.3f}", *row, *match)
        print_whole(Console(soft_wrap=True), table)
    if html_out:
        write_html(html_out, searcher, query, "images" if images else "captions", hits)
        console.print(f"wrote {html_out}")


@command()
def report(
    run: Path = typer.Option(..., help="run directory"),
    store: str = typer.Option(..., help="store to evaluate on (a folder or a URL)"),
    split: str = typer.Option("test", help="split of the store"),
    compare: list[Path] = typer.Option(
        [],
        help="another run for the ablation table, or a folder of train --seeds runs (repeatable); runs that "
        "differ in train.seed alone are also shown as mean ± std",
    ),
    zero_shot: str = typer.Option(
        None, help="add the zero-shot row of the store's open_clip model (MODEL:PRETRAINED; see eval)"
    ),
) -> None:
    """Report of a run: trained vs untrained vs chance, curves, ablation, query grid (RUN/report.md)."""
    from userpipe.retrieval.report import comparison_table, seed_table, write_run_report

    result = write_run_report(run, location(store), split, compare, zero_shot)
    rows = [("chance", result["chance"]), ("untrained", result["untrained"]), ("trained", result["trained"])]
    if zero_shot:
        rows.append((result["zero_shot"]["label"], result["zero_shot"]))
    print(f"{run} on {store} [{split}]: {result['num_images']} images, {result['num_captions']} captions\n")
    print(comparison_table(rows))
    if compare:
        print(comparison_table([(a["label"], a) for a in result["ablation"]]))
    if any(len(group["runs"]) > 1 for group in result["seeds"]):
        print(seed_table(result["seeds"]))
    console.print(f"report: {run / 'report.md'}")


def main() -> None:
    quiet_model_loading()
    try:
        app()
    except BrokenPipeError:  # `userpipe info --json | head`
        sys.exit(0)
