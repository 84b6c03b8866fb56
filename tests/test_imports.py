"""The package graph of docs/architecture.md, enforced: imports go one way, schemas <- pipeline <- trainer
<- userpipe, and no library module imports a stage driver, the training loop or the command line.
Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"schemas": 0, "pipeline": 1, "trainer": 2, "userpipe": 3}
# what a module of a lower layer may use of a higher one's neighbour: the trainer uses the pipeline only
# as the extractor library (an image-file query is embedded as extract embeds a store row)
TRAINER_USES_OF_PIPELINE = {"pipeline.features"}
DRIVERS = {
    "pipeline.extract",
    "pipeline.shard",
    "trainer.train",
}  # stage entry points: only the CLI imports them


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def first_party_imports(path: Path) -> set[str]:
    """Every first-party module `path` imports, at any depth of its code."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from trainer import checkpoint` imports the module trainer.checkpoint
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        imported |= {name for name in names if name.split(".")[0] in LAYERS}
    return imported & set(modules())


GRAPH = {name: first_party_imports(path) for name, path in modules().items()}


def test_the_graph_is_read():
    assert "schemas.store_reader" in GRAPH["trainer.encode"]
    assert "pipeline.features" in GRAPH["trainer.search"]
    assert "trainer.train" in GRAPH["userpipe.cli"]


def violations(module: str, imports: set[str]) -> list[str]:
    layer, found = module.split(".")[0], []
    for target in sorted(imports):
        target_layer = target.split(".")[0]
        if LAYERS[target_layer] > LAYERS[layer]:
            found.append(f"{module} imports {target}, of a higher layer")
        elif layer == "trainer" and target_layer == "pipeline" and target not in TRAINER_USES_OF_PIPELINE:
            found.append(f"{module} reaches into {target}, a pipeline internal")
        if target in DRIVERS and layer != "userpipe":
            found.append(f"{module} imports the stage driver {target}; only the command line may")
    return found


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way(module):
    assert violations(module, GRAPH[module]) == []


def test_a_module_that_breaks_the_rules_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from trainer.train import train\n    from pipeline.datasets import load_dataset\n"
        "    import userpipe.cli\n"
    )
    found = violations("trainer.encode", first_party_imports(bad))
    assert found == [
        "trainer.encode reaches into pipeline.datasets, a pipeline internal",
        "trainer.encode imports the stage driver trainer.train; only the command line may",
        "trainer.encode imports userpipe.cli, of a higher layer",
    ]
