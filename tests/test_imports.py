"""The package graph of docs/architecture.md, enforced: imports go one way, userpipe.schemas <-
userpipe.pipeline <- userpipe.trainer (the library) <- userpipe.retrieval (the commands that use a trained
model) <- the command line (userpipe.cli), no library module imports a stage driver, the training loop or
the command line, and the graph has no circle. Every import counts,
also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the installed package userpipe.X is the folder FOLDERS[X] (pyproject.toml's package-dir)
FOLDERS = {
    "schemas": "schemas",
    "pipeline": "pipeline",
    "trainer": "trainer",
    "retrieval": "retrieval",
    "cli": "userpipe",
}
# the library (schemas, pipeline, trainer), then the commands that use a trained model, then the command line
LAYERS = {"schemas": 0, "pipeline": 1, "trainer": 2, "retrieval": 3, "cli": 4}
# the trainer uses the pipeline only to read shards (shard_io: the loader reads the bytes the sharder
# writes, and checks them as verify does); search embeds an image file as extract embeds a store row, from
# the retrieval layer, above both
TRAINER_USES_OF_PIPELINE = {"userpipe.pipeline.shard_io"}
DRIVERS = {
    "userpipe.pipeline.extract",
    "userpipe.pipeline.shard",
    "userpipe.trainer.train",
}  # stage entry points: only the command line imports them


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join(("userpipe", *(() if package == "cli" else (package,)), *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> str:
    """The layer of a userpipe module: schemas, pipeline, trainer, retrieval, or cli (the command line)."""
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS and part != "cli" else "cli"


def first_party_imports(path: Path) -> set[str]:
    """Every first-party module `path` imports, at any depth of its code."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from userpipe.trainer import checkpoint` imports the module userpipe.trainer.checkpoint
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        imported |= {name for name in names if name.split(".")[0] == "userpipe"}
    return imported & set(modules())


GRAPH = {name: first_party_imports(path) for name, path in modules().items()}


def test_the_graph_is_read():
    assert "userpipe.schemas.store_reader" in GRAPH["userpipe.trainer.encode"]
    assert "userpipe.pipeline.features" in GRAPH["userpipe.retrieval.search"]
    assert "userpipe.trainer.train" in GRAPH["userpipe.cli"]


def violations(module: str, imports: set[str]) -> list[str]:
    found = []
    for target in sorted(imports):
        if LAYERS[layer(target)] > LAYERS[layer(module)]:
            found.append(f"{module} imports {target}, of a higher layer")
        elif (layer(module), layer(target)) == (
            "trainer",
            "pipeline",
        ) and target not in TRAINER_USES_OF_PIPELINE:
            found.append(f"{module} reaches into {target}, a pipeline internal")
        if target in DRIVERS and layer(module) != "cli":
            found.append(f"{module} imports the stage driver {target}; only the command line may")
    return found


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way(module):
    assert violations(module, GRAPH[module]) == []


def test_a_module_that_breaks_the_rules_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from userpipe.trainer.train import train\n"
        "    from userpipe.pipeline.datasets import load_dataset\n    import userpipe.cli\n"
    )
    found = violations("userpipe.trainer.encode", first_party_imports(bad))
    assert found == [
        "userpipe.trainer.encode imports userpipe.cli, of a higher layer",
        "userpipe.trainer.encode reaches into userpipe.pipeline.datasets, a pipeline internal",
        "userpipe.trainer.encode imports the stage driver userpipe.trainer.train; only the command line may",
    ]


@pytest.mark.slow
def test_the_wheel_installs_one_namespace_importable_from_anywhere(tmp_path):
    """pip puts userpipe.pipeline, userpipe.trainer and userpipe.schemas (with the presets) under one
    `userpipe` package, and no generic top-level names beside other projects' modules."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools writes build/ beside the sources it builds
    shutil.copytree(ROOT, source, ignore=sources_only)
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("userpipe-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"userpipe"}
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib.resources as r, userpipe.schemas.errors, userpipe.trainer, userpipe.pipeline\n"
        "print(userpipe.schemas.errors.__file__)\n"
        "print((r.files('userpipe.trainer') / 'configs' / 'coco.yaml').is_file())"
    )
    found = subprocess.run([python, "-c", probe], cwd=elsewhere, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    where, preset = found.stdout.split()
    assert where.startswith(str(tmp_path / "venv")) and where.endswith("userpipe/schemas/errors.py")
    assert preset == "True"


def sources_only(folder: str, names: list[str]) -> list[str]:
    """What a copy of the checkout leaves out to build the wheel: all but the packaging files and the
    package folders at the top, caches below."""
    if Path(folder) == ROOT:
        return [name for name in names if name not in ("pyproject.toml", "README.md", *FOLDERS.values())]
    return [name for name in names if name == "__pycache__"]


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Each circle of imports found by a depth-first walk, as 'a -> b -> a'."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module] - {module}):
            if state.get(target) == "open":
                found.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_package_graph_has_no_circle():
    """Every import counts, those inside functions too (the region kinds used to make one: regions <->
    butd_vg); the walk itself finds a planted circle."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert circles(GRAPH) == []


def test_benchmarks_start_their_child_processes_as_modules():
    """`python -m bench.NAME` is how benchmarks run (the README, the Justfile); a child started as a
    script (`python bench/NAME.py`, i.e. `__file__`) has bench/ itself on sys.path, where `from bench
    import report` fails. `__file__` may only locate files (`Path(__file__)`)."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        located = {
            id(node.args[0])
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Path" and node.args
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "__file__":
                assert id(node) in located, f"{path.name}:{node.lineno}: __file__ outside Path(__file__)"
