"""The wheel's package list names every package of the source trees."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed_under_its_wheel_name() -> None:
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

    package_dirs = {"w2v_knnvq": "w2v_knnvq", **setuptools["package-dir"]}

    found = set()

    for name, folder in package_dirs.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO_ROOT / folder).parts

            found.add(".".join((name, *parts)))

    assert set(setuptools["packages"]) == found
    assert "recipes" not in setuptools["packages"]
