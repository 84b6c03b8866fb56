"""Approximate indexes (retrieval/ann.py): plans from the gallery's size and the memory budget, tuning to
the recall target against exact search, the recall measure itself, and `index --kind` / `search` end to
end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kit import run_cli

from userpipe.retrieval import ann
from userpipe.schemas.errors import InputError


def normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gallery_and_queries(n: int, d: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """n vectors around 50 centres, and queries near some of them (a caption near its image)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, d))
    gallery = normalized(centres[rng.integers(50, size=n)] + 0.5 * rng.standard_normal((n, d)))
    near = gallery[rng.choice(n, queries, replace=False)]
    return gallery, normalized(near + 0.05 * rng.standard_normal(near.shape))


def test_recall_at_k_is_the_share_of_the_exact_top_k_found():
    exact = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    found = np.array([[0, 2, 1, 3, 4, 10, 11, 12, 13, 14], [8, 9, 7, 6, 5, 4, 3, 2, 1, 0]])
    # query 1: top1 hit, top5 {0,1,2,3,4} all, top10 5 of 10; query 2: top1 miss, then all
    assert ann.recall_at(found, exact) == {"r1": 0.5, "r5": 1.0, "r10": 0.75}


@pytest.mark.parametrize(
    ("n", "kind", "factory"),
    [
        (100_000, "flat", "Flat"),
        (100_000, "ivf", "IVF512,Flat"),  # a power of two near 2·sqrt(n)
        (1_000_000, "ivf", "IVF2048,Flat"),
        (100, "ivf", "IVF2,Flat"),  # at least 39 training points per list
        (1000, "ivf", "IVF25,Flat"),
        (100_000, "hnsw", "HNSW32,Flat"),
        (100_000, "ivfpq", "IVF512,PQ64"),  # d/16 bytes per vector without a budget
    ],
)
def test_plans_follow_the_gallery_size(n, kind, factory):
    assert ann.plan(kind, n, 1024, None).factory == factory


def test_the_search_knob_can_probe_every_list():
    assert ann.plan("ivf", 1000, 32, None).knob_values == (1, 2, 4, 8, 16, 25)


def test_recall_is_measured_on_queries_the_tuning_did_not_see():
    queries = np.arange(10, dtype=np.float32)[:, None]
    tuning, measuring = ann.held_out_queries(queries)
    assert tuning.ravel().tolist() == [0, 2, 4, 6, 8] and measuring.ravel().tolist() == [1, 3, 5, 7, 9]
    one = queries[:1]
    assert all(part.tolist() == one.tolist() for part in ann.held_out_queries(one))


def test_a_memory_budget_chooses_the_code_or_is_refused_in_one_line():
    budget = ann.parse_size("50MB")
    chosen = ann.plan("ivfpq", 1_000_000, 1024, budget)
    code = int(chosen.factory.split("PQ")[1])
    assert chosen.bytes <= budget < ann.plan("ivfpq", 1_000_000, 1024, None).bytes
    fixed = chosen.bytes - 1_000_000 * (code + 16)  # lists and codebooks; per vector: code, id, direct map
    assert fixed > 0 and 1_000_000 * (2 * code + 16) + fixed > budget  # the next code would not fit
    with pytest.raises(
        InputError, match=r"^--max-memory: a hnsw index of 1,000,000 1024-d .*share 50.0 MB.*ivfpq"
    ):
        ann.plan("hnsw", 1_000_000, 1024, budget)
    with pytest.raises(InputError, match="smallest ivfpq index"):
        ann.plan("ivfpq", 1_000_000, 1024, ann.parse_size("1MB"))
    with pytest.raises(InputError, match="too small to train 256 codes"):
        ann.plan("ivfpq", 100, 64, None)


@pytest.mark.parametrize(
    ("text", "size"), [("2GB", 2e9), ("512MiB", 512 * 2**20), ("1.5g", 1.5e9), ("4096", 4096)]
)
def test_sizes(text, size):
    assert ann.parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["", "x", "-1GB", "inf", "2XB", "0"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(InputError, match="--max-memory"):
        ann.parse_size(text)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tuning_reaches_the_target_with_the_smallest_knob(kind):
    """The recorded recall is what the setting gives; the setting before it (if any) falls short."""
    vectors, queries = gallery_and_queries(20_000, 32, 300)
    chosen = ann.plan(kind, len(vectors), 32, None)
    index = ann.build(vectors, chosen)
    exact = ann.exact_top(vectors, queries, 10)
    setting, recall = ann.tune(index, chosen, queries, exact)
    assert recall["r10"] >= ann.RECALL_TARGET
    assert ann.recall_at(index.search(queries, 10)[1], exact) == recall  # left set on the index
    value = int(setting.split("=")[1])
    if value > chosen.knob_values[0]:
        ann.set_search(index, f"{chosen.knob}={chosen.knob_values[chosen.knob_values.index(value) - 1]}")
        assert ann.recall_at(index.search(queries, 10)[1], exact)["r10"] < ann.RECALL_TARGET


def test_tuning_stops_where_the_codes_limit_recall():
    """ivfpq with tiny codes never reaches the target: the tuning ends when doubling nprobe stops helping,
    and reports what it measured."""
    vectors, queries = gallery_and_queries(5_000, 32, 200)
    chosen = ann.plan("ivfpq", len(vectors), 32, None)  # 2 bytes per vector
    index = ann.build(vectors, chosen)
    exact = ann.exact_top(vectors, queries, 10)
    setting, recall = ann.tune(index, chosen, queries, exact)
    assert recall["r10"] < ann.RECALL_TARGET and setting != f"nprobe={chosen.knob_values[-1]}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_index_records_its_recall_and_search_says_which_it_used(runner, trained, tmp_path, kind):
    out = tmp_path / "index"
    built = run_cli(
        runner, "index", "--run", trained.run, "--store", trained.gallery, "--out", out, "--kind", kind
    )
    assert built.exit_code == 0, built.output
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["schema_version"] == "1.2" and manifest["kind"] == kind
    images = manifest["galleries"]["images"]
    # measured on half the captions, the tuning having seen the other half
    assert images["queries"] == manifest["num_captions"] // 2 and 0 <= images["recall"]["r10"] <= 1
    assert f"images: {kind} (" in built.output and "recall@1/5/10" in built.output
    found = run_cli(runner, "search", "caption 0 of image 2", "--index", out, "--run", trained.run, "--json")
    assert found.exit_code == 0, found.output
    exact = run_cli(
        runner, "search", "caption 0 of image 2", "--index", trained.index, "--run", trained.run, "--json"
    )
    assert f"images index: {kind} (" in " ".join(found.output.split())
    assert "images index: flat (exact)" in " ".join(exact.output.split())
    by_id = run_cli(runner, "search", "img4", "--captions", "--index", out, "--run", trained.run, "--json")
    assert by_id.exit_code == 0, by_id.output  # an indexed image's own vector, looked up by id


@pytest.mark.slow
def test_index_refuses_a_budget_it_cannot_meet_before_embedding(runner, trained, tmp_path):
    out = tmp_path / "index"
    args = ("index", "--run", trained.run, "--store", trained.gallery, "--out", out)
    refused = run_cli(runner, *args, "--kind", "hnsw", "--max-memory", "1KB")
    assert refused.exit_code == 2 and "--max-memory" in refused.output and not out.exists()
    small = run_cli(runner, *args, "--kind", "ivfpq")
    assert small.exit_code == 2 and "too small" in small.output and not out.exists()


@pytest.mark.slow
def test_hits_leave_out_what_an_approximate_index_pads_with(trained):
    """IVF returns row -1 (score -FLT_MAX) where the lists it probed hold fewer than k vectors: no hit."""
    from userpipe.retrieval.search import SearchIndex

    searcher = SearchIndex(trained.index)
    hits = searcher._hits(np.array([0.9, -3.4e38]), np.array([2, -1]), "images", lambda row: None)
    assert [(h.rank, h.row) for h in hits] == [(1, 2)]
