"""`userpipe report`: what a run learned, on a store split, as markdown + PNG + JSON in the run folder.

report.md     the trained model next to the untrained one (the run's seeded start) and chance;
              the training curves; an ablation table when other runs are given; the query grid
report.json   the same numbers
queries.png   a few captions of the split as text queries with their top-5 images, matches marked, and
              where each caption's own image ranked
Training writes its own page beside the log: training.md, loss.png, val_rsum.png (write_training_summary).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from userpipe.retrieval.html import thumbnail
from userpipe.retrieval.zero_shot import zero_shot_embeddings, zero_shot_label
from userpipe.schemas.base import read_model
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import RUN, claim, write_text_atomic
from userpipe.schemas.run import RUN_RECORD_NAME, RunConfig, RunRecord
from userpipe.schemas.store_reader import open_store
from userpipe.trainer.checkpoint import CHECKPOINTS, initial_model, load_trained
from userpipe.trainer.encode import SplitEmbeddings, embedding_metrics, encode_split
from userpipe.trainer.evaluate import KS
from userpipe.trainer.run_dir import LOG_NAME, JsonLog
from userpipe.trainer.training_page import save_png, when_validated

GRID_QUERIES, GRID_TOP = 4, 5


def chance_metrics(caption_image: torch.Tensor, num_images: int) -> dict:
    """Expected R@K of a uniformly random ranking. t2i: 1 correct image among N, so K/N. i2t: an image
    with m of the C captions has none in its top K with probability C(C-m, K)/C(C, K) (hypergeometric)."""
    counts = torch.bincount(caption_image, minlength=num_images).double()
    c = len(caption_image)
    out = {"i2t": {}, "t2i": {}}
    for k in KS:
        none_in_top = torch.ones_like(counts)
        for j in range(min(k, c)):
            none_in_top *= ((c - counts - j) / (c - j)).clamp(min=0)
        out["i2t"][f"r{k}"] = 100.0 * (1 - none_in_top).mean().item()
        out["t2i"][f"r{k}"] = 100.0 * min(k, num_images) / num_images
    out["rsum"] = sum(out[side][f"r{k}"] for side in ("i2t", "t2i") for k in KS)
    return out


def run_label(config: RunConfig) -> str:
    """The names the USER paper's ablation uses, plus this tool's departures from the released code."""
    model = config.model
    if model.enhancement == "none" and not model.use_queue:
        name = "VSE∞-style baseline (no enhancement, no queue)"
    else:
        name = {"sge": "USER-SGE", "cge": "USER-CGE", "none": "USER without enhancement"}[model.enhancement]
        name = name if model.use_queue else f"{name} without queue"
    if model.mask_false_negatives:
        name += ", same-image negatives masked"
    if not model.keys_in_train_mode:
        name += ", key encoders in eval mode"
    if config.train.mu_start is not None:
        name += f", μ warm-up from {config.train.mu_start:g} over {config.train.mu_warmup_steps} steps"
    if model.gpo_init == "uniform":
        name += ", GPO from a uniform start"
    if config.train.align_start:
        name += ", sign-aligned start"
    if config.train.init_seed is not None:
        name += f", initialised from seed {config.train.init_seed}"
    return name


def _row(name: str, m: dict) -> str:
    cells = [m[side][f"r{k}"] for side in ("i2t", "t2i") for k in KS]
    return f"| {name} | " + " | ".join(f"{v:.1f}" for v in cells) + f" | {m['rsum']:.1f} |\n"


HEADER = "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |\n|---|---|---|---|---|---|---|---|\n"


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    return HEADER + "".join(_row(name, m) for name, m in rows)


METRIC_CELLS = [*((side, f"r{k}") for side in ("i2t", "t2i") for k in KS), (None, "rsum")]


def _metric(metrics: dict, side: str | None, name: str) -> float:
    return metrics[name] if side is None else metrics[side][name]


SEED_HEADER = (
    "| model | seeds | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | RSUM spread |\n"
    "|---|---|---|---|---|---|---|---|---|---|\n"
)


def seed_table(groups: list[dict]) -> str:
    """One row per group of `seed_groups`: each metric's mean ± std over its seeds (a single run: its value)
    and the spread (max − min) of RSUM."""
    rows = []
    for group in groups:
        several = len(group["seeds"]) > 1
        cells = [
            f"{_metric(group['mean'], side, name):.1f}"
            + (f" ± {_metric(group['std'], side, name):.1f}" if several else "")
            for side, name in METRIC_CELLS
        ]
        spread = f"{group['rsum_spread']:.1f}" if several else "—"
        seeds = ", ".join(map(str, group["seeds"]))
        rows.append(f"| {group['label']} | {seeds} | " + " | ".join(cells) + f" | {spread} |\n")
    return SEED_HEADER + "".join(rows)


def seed_groups(runs: list[tuple[str, Path, RunConfig, dict]]) -> list[dict]:
    """(label, run, its configuration, metrics) of runs -> groups of the runs that differ in train.seed alone
    (same configuration otherwise, same shards), in the order first met: label, runs, seeds, each metric's
    mean and std (n − 1; 0 for one run) and the spread (max − min) of RSUM."""
    found: dict[str, dict] = {}
    settings: dict[str, tuple[dict[str, str], str]] = {}  # key -> (its settings, flattened; its shards)
    for label, run, config, metrics in runs:
        tree = config.model_dump(mode="json")
        seed = tree["train"].pop("seed")
        shards = read_model(RunRecord, run / RUN_RECORD_NAME, "run record").data.shards_sha256
        key = json.dumps([tree, shards], sort_keys=True)
        group = found.setdefault(key, {"label": label, "runs": [], "seeds": [], "metrics": []})
        settings.setdefault(key, (_flattened(tree), shards))
        group["runs"].append(str(run))
        group["seeds"].append(seed)
        group["metrics"].append(metrics)
    _tell_apart([(group, *settings[key]) for key, group in found.items()])
    groups = []
    for group in found.values():
        every = group.pop("metrics")
        summary = {"mean": {"i2t": {}, "t2i": {}}, "std": {"i2t": {}, "t2i": {}}}
        for side, name in METRIC_CELLS:
            values = np.array([_metric(m, side, name) for m in every])
            for stat, value in (
                ("mean", values.mean()),
                ("std", values.std(ddof=1) if len(values) > 1 else 0.0),
            ):
                (summary[stat] if side is None else summary[stat][side])[name] = float(value)
        rsum = [m["rsum"] for m in every]
        groups.append({**group, **summary, "rsum_spread": float(max(rsum) - min(rsum))})
    return groups


def _flattened(tree: dict) -> dict[str, str]:
    """A configuration's settings as {"train.epochs": "6", ...}."""
    return {
        f"{section}.{name}": value if isinstance(value, str) else json.dumps(value)
        for section, fields in tree.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
    }


def _tell_apart(groups: list[tuple[dict, dict[str, str], str]]) -> None:
    """(group, its settings, its shards): groups whose labels are the same (the paper's names do not cover
    every setting: epochs, lr) get the settings in which they differ appended, e.g. ", train.epochs=6", and
    ", shards <sha256 prefix>" when their shards differ."""
    by_label: dict[str, list] = {}
    for entry in groups:
        by_label.setdefault(entry[0]["label"], []).append(entry)
    for same in (entries for entries in by_label.values() if len(entries) > 1):
        differ = [k for k in same[0][1] if len({settings.get(k) for _, settings, _ in same}) > 1]
        other_shards = len({shards for _, _, shards in same}) > 1
        for group, settings, shards in same:
            told = [f"{k}={settings[k]}" for k in differ] + ([f"shards {shards[:8]}"] if other_shards else [])
            group["label"] += ", " + ", ".join(told)


def runs_in(path: Path) -> list[Path]:
    """A run, or the runs of `train --seeds` in a folder (its seed-N runs, by seed)."""
    if RUN.recognise(path):
        return [path]
    seeds = sorted(
        (p for p in path.glob("seed-*") if p.name[5:].isdigit() and RUN.recognise(p)),
        key=lambda p: int(p.name[5:]),
    )
    if not seeds:
        raise InputError(f"--compare {path} is neither a run nor a folder of seed runs (train --seeds)")
    return seeds


def true_rank(scores: torch.Tensor, truth: int) -> int:
    """The 1-based rank of image `truth` among a query's scores, as eval ranks (evaluate.positive_ranks:
    the images scoring higher, and those tied with it at a larger index)."""
    own = scores[truth]
    return 1 + int((scores > own).sum()) + int((scores[truth + 1 :] == own).sum())


def query_grid(emb: SplitEmbeddings, files: list[Path | None], out: Path) -> list[dict]:
    """GRID_QUERIES captions spread over the split, each with its top-5 images (green = its own image) and
    the rank of its own image over the whole split, which a top-5 alone does not show when it is lower."""
    from matplotlib.figure import Figure

    picks = np.linspace(0, len(emb.captions) - 1, GRID_QUERIES).round().astype(int)
    sims = emb.captions[picks] @ emb.images.T
    scores, top = sims.topk(min(GRID_TOP, len(emb.images)), dim=1)
    queries = []
    rows, cols = len(picks), top.shape[1]
    fig = Figure(figsize=(2.0 * cols, 2.2 * rows))  # laid out by hand: each row a query line over its images
    for q, caption in enumerate(picks):
        truth = int(emb.caption_image[caption])
        hits = [
            {"image_id": emb.image_ids[i], "score": float(s), "correct": int(i) == truth}
            for s, i in zip(scores[q], top[q], strict=True)
        ]
        rank = true_rank(sims[q], truth)
        queries.append(
            {"text": emb.caption_texts[caption], "image_id": emb.image_ids[truth], "rank": rank, "top": hits}
        )
        row_top = 1 - q / rows
        title = f"“{emb.caption_texts[caption]}”  (true image at rank {rank} of {len(emb.images)})"
        fig.text(0.01, row_top - 0.04 / rows, title, fontsize=10, va="top")
        for col, (hit, i) in enumerate(zip(hits, top[q], strict=True)):
            ax = fig.add_axes((col / cols + 0.03 / cols, row_top - 0.78 / rows, 0.94 / cols, 0.6 / rows))
            image = thumbnail(files[int(i)])
            ax.imshow(image if image is not None else np.full((120, 160, 3), 230, np.uint8))
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("#22aa22" if hit["correct"] else "#bbbbbb")
                spine.set_linewidth(5 if hit["correct"] else 1)
            ax.set_xlabel(f"#{col + 1} {hit['image_id']}  {hit['score']:.3f}", fontsize=8)
    save_png(fig, out, dpi=110)
    return queries


def _evaluate(run: Path, store: Path, split: str):
    model, config, tokenizer = load_trained(run / CHECKPOINTS / "best")
    return model, config, tokenizer, encode_split(model, store, split, tokenizer)


def write_run_report(
    run: Path, store: Path, split: str, compare: list[Path], zero_shot: str | None = None
) -> dict:
    """report.md, report.json and queries.png, added to the run (its own output: claimed as train does);
    `zero_shot`: the store's open_clip model (MODEL:PRETRAINED), whose zero-shot row joins the table."""
    with claim(run, RUN, [store], option="--run", own_only=True):
        # the baseline first: a spec the store does not fit is refused before the run's model loads
        baseline = zero_shot_embeddings(zero_shot, store, split) if zero_shot else None
        return _write_run_report(run, store, split, compare, zero_shot, baseline)


def _write_run_report(
    run: Path,
    store: Path,
    split: str,
    compare: list[Path],
    zero_shot: str | None,
    baseline: SplitEmbeddings | None,
) -> dict:
    model, config, tokenizer, trained = _evaluate(run, store, split)
    records = JsonLog(run / LOG_NAME).records()
    untrained_model = initial_model(config).to(next(model.parameters()).device)
    if any(r.get("text_negated") for r in records):  # the run's start, as train.align_start left it
        untrained_model.negate_text_projection()
    metrics = {
        "trained": embedding_metrics([trained]),
        "untrained": embedding_metrics([encode_split(untrained_model, store, split, tokenizer)]),
        "chance": chance_metrics(trained.caption_image, len(trained.images)),
    }
    if baseline is not None:
        metrics["zero_shot"] = {"label": zero_shot_label(zero_shot), **embedding_metrics([baseline])}
    validations = [r for r in records if "val" in r and r["step"] > 0]  # those a best checkpoint is of
    best_at = (
        when_validated(records, max(validations, key=lambda r: r["val"]["rsum"])) if validations else "?"
    )
    ablation = [(run_label(config), run, config, metrics["trained"])]
    seen = {run.resolve()}
    for other in (found for given in compare for found in runs_in(given)):
        if other.resolve() in seen:  # the run itself, or a run named twice
            continue
        seen.add(other.resolve())
        _, other_config, _, embeddings = _evaluate(other, store, split)
        ablation.append((run_label(other_config), other, other_config, embedding_metrics([embeddings])))
    groups = seed_groups(ablation)
    root, attrs = open_store(store)
    relative = root[split]["file"][:]
    files = [
        Path(attrs.image_root) / str(relative[row]) if attrs.image_root else None
        for row in trained.image_rows
    ]
    queries = query_grid(trained, files, run / "queries.png")
    n, c = len(trained.images), len(trained.captions)
    main_table = comparison_table(
        [
            ("chance", metrics["chance"]),
            ("untrained (the run's start)", metrics["untrained"]),
            (f"trained (best validation: {best_at})", metrics["trained"]),
            *([(metrics["zero_shot"]["label"], metrics["zero_shot"])] if baseline is not None else []),
        ]
    )
    text = (
        f"# {run.name}: {run_label(config)} on {store.name} [{split}]\n\n"
        f"{n} images, {c} captions; full-split ranking (R@K in %).\n\n{main_table}\n"
        "## Training\n\n![loss](loss.png)\n\n![validation RSUM](val_rsum.png)\n\n"
        "The run's validation tables: [training.md](training.md).\n\n"
    )
    if compare:
        text += (
            "## Ablation\n\nEach row a run of its own, evaluated the same way.\n\n"
            + comparison_table([(f"{label} (`{path}`)", m) for label, path, _, m in ablation])
            + "\n"
        )
    if any(len(g["runs"]) > 1 for g in groups):
        text += (
            "## Over seeds\n\nRuns that differ in `train.seed` alone, together: mean ± std (n − 1) of each "
            "metric, and the spread (max − min) of RSUM.\n\n" + seed_table(groups) + "\n"
        )
    text += (
        "## Text queries\n\nCaptions of the split as queries; their top-5 images, the caption's own image "
        "framed green, and the rank of that image over the split in each query's title.\n\n"
        "![queries](queries.png)\n"
    )
    write_text_atomic(run / "report.md", text)
    result = {
        "run": str(run),
        "store": str(store),
        "split": split,
        "num_images": n,
        "num_captions": c,
        **metrics,
        "ablation": [{"label": label, "run": str(path), **m} for label, path, _, m in ablation],
        "seeds": groups,
        "queries": queries,
    }
    write_text_atomic(run / "report.json", json.dumps(result, indent=1))
    return result
