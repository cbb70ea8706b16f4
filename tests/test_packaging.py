"""The wheel: its package list names every package of the source trees, and installed on
its own it provides every command."""

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


@pytest.mark.e2e
def test_the_wheel_alone_installs_every_command(tmp_path: Path) -> None:
    """Built as a wheel and installed into a scratch directory (no checkout on the path), every
    command of ``[project.scripts]`` exists and answers ``--help``; the tools ``--version``."""
    import subprocess
    import sys

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    scripts = project["scripts"]

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(REPO_ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    assert built.returncode == 0, built.stderr[-3000:]

    (wheel,) = (tmp_path / "dist").glob("w2v_knnvq-*.whl")

    target = tmp_path / "site"

    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    assert installed.returncode == 0, installed.stderr[-3000:]

    assert sorted(path.name for path in (target / "bin").iterdir()) == sorted(scripts)

    # One process calls every entry point, as its console script would, from outside the checkout.
    probe = f"""
import importlib, sys
from importlib.metadata import distribution
assert distribution("w2v-knnvq").locate_file("").resolve() == __import__("pathlib").Path({str(target)!r}).resolve()
for name, value in {scripts!r}.items():
    module, function = value.split(":")
    imported = importlib.import_module(module)
    assert imported.__file__.startswith({str(target)!r}), imported.__file__
    for flag in ("--help", "--version") if "w2v_knnvq_tools" in module else ("--help",):
        sys.argv = [name, flag]
        try:
            getattr(imported, function)()
        except SystemExit as ex:
            assert ex.code in (0, None), (name, flag, ex.code)
        else:
            raise AssertionError(f"{{name}} {{flag}} did not exit")
print("probed", len({scripts!r}))
"""

    env = {key: value for key, value in __import__("os").environ.items() if key != "PYTHONPATH"}

    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**env, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=600
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"probed {len(scripts)}" in result.stdout
    assert f"w2v-knnvq {project['version']}" in result.stdout


@pytest.mark.e2e
def test_the_set_up_stops_on_an_unsupported_python_and_says_what_to_install(tmp_path: Path) -> None:
    """fairseq2n 0.8.1 has no wheel for Python 3.13 (Debian 13's default): the set-up stops
    before it touches anything, with a sentence saying what to install."""
    import subprocess

    python = tmp_path / "python3.13"

    python.write_text('#!/bin/sh\ncase "$1" in --version) echo "Python 3.13.1";; *) exit 1;; esac\n')
    python.chmod(0o755)

    result = subprocess.run(
        ["bash", str(REPO_ROOT / "tools/bootstrap.sh")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "VENV": str(tmp_path / "venv")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 1
    assert "Python 3.10, 3.11 or 3.12 is required" in result.stderr
    assert "is Python 3.13.1. Install Python 3.12" in result.stderr
    assert "make PYTHON=python3.12" in result.stderr
    assert not (tmp_path / "venv").exists()
