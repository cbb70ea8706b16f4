"""Running the recipes through their command line in the tests: one process or several
under ``torchrun`` (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def recipe_env(**extra: str) -> dict[str, str]:
    """The environment of a recipe run from the repository root, so that ``recipes`` imports
    and the extension's errors surface."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    return dict(os.environ, PYTHONPATH=python_path, FAIRSEQ2_EXTENSION_TRACE="1", **extra)


def recipe_command(
    module: str,
    output_dir: Path,
    overrides: Sequence[str],
    *,
    config_file: Path | None = None,
    num_processes: int = 1,
) -> list[str]:
    """The command line of ``python -m module``, or of ``torchrun`` with ``num_processes``
    processes on this machine."""
    if num_processes == 1:
        launcher = [sys.executable, "-m", module]
    else:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(num_processes),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", module,
        ]  # fmt: skip

    config = ["--config-file", str(config_file)] if config_file is not None else []

    return [*launcher, "--no-rich", *config, "--config", *overrides, "--", str(output_dir)]


def run_recipe_command(
    command: Sequence[str],
    *,
    expected_returncode: int = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Runs a recipe's or a tool's ``command`` from the repository root (environment:
    :func:`recipe_env` updated with ``env``) and asserts its exit status.

    The timeout guards against a hung run, not a slow one: a loaded 2-core machine can take
    minutes for a run that takes seconds alone.
    """
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=recipe_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )

    assert result.returncode == expected_returncode, result.stdout[-4000:] + result.stderr[-4000:]

    return result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_record_per_step(path: Path) -> dict[int, dict[str, Any]]:
    """The metric records of a ``metrics/*.jsonl`` file by step; a step logged twice (by a
    run killed after logging it and by its resumption) keeps its last record."""
    return {int(record["Step"]): record for record in read_jsonl(path)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))

        port: int = sock.getsockname()[1]

        return port
