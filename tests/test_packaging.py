"""pyproject.toml declares every package folder: one left out is missing from the wheel, or (a folder of
data files) makes setuptools print its "Package would be ignored" banner at every install."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {}  # every folder of code or presets under the mapped folders, by its package name
    for package, top in config["package-dir"].items():
        for path in [ROOT / top, *(ROOT / top).rglob("*")]:
            if path.is_dir() and any(f.suffix in (".py", ".yaml") for f in path.iterdir()):
                folder_of[".".join([package, *path.relative_to(ROOT / top).parts])] = path
    assert set(config["packages"]) == set(folder_of)
    for package, patterns in config["package-data"].items():
        assert all(any(folder_of[package].glob(pattern)) for pattern in patterns), package
