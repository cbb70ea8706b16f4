"""The suite's tiers: a test that starts processes (recipe, tool or driver runs, torchrun,
several gloo processes) is marked ``e2e``; ``make test-fast`` runs the rest.

The fixture below keeps the marks honest: an unmarked test that starts a Python process fails
with the sentence to fix it. torch.compile's own compile workers are allowed anywhere.
"""

from __future__ import annotations

import multiprocessing.process
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

E2E = "e2e"


def _is_python_process(args: object) -> bool:
    if isinstance(args, (str, bytes)):
        argv: Sequence[object] = [args]
    elif isinstance(args, Sequence):
        argv = args
    else:
        argv = [args]

    if not argv:
        return False

    words = [str(word) for word in argv]

    # Inductor compiles in a pool of worker processes of its own.
    if any("_inductor" in word for word in words):
        return False

    program = words[0]

    return program == sys.executable or program.endswith(("python", "python3", "torchrun"))


@pytest.fixture(autouse=True)
def _processes_only_in_e2e_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker(E2E) is not None:
        yield

        return

    name = request.node.nodeid

    def refuse() -> None:
        raise RuntimeError(
            f"{name} starts a process, but is not marked e2e. Mark it `@pytest.mark.e2e` (or the module "
            "with `pytestmark = pytest.mark.e2e`) so that `make test-fast` leaves it out."
        )

    popen_init = subprocess.Popen.__init__

    def checked_popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if _is_python_process(args):
            refuse()

        popen_init(self, args, *rest, **kwargs)

    def checked_start(self: multiprocessing.process.BaseProcess) -> None:
        refuse()

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen_init)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", checked_start)

    yield
