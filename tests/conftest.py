"""The suite's tiers: a test that starts processes (recipe, tool or driver runs, torchrun,
several gloo processes) is marked ``e2e``, one that takes seconds in this process
(``torch.compile``, the FID network) ``slow``; ``make test-fast`` runs the rest.

The fixture below keeps the marks honest: an unmarked test that starts a Python process fails
with the sentence to fix it. torch.compile's own compile workers are allowed anywhere.
"""

from __future__ import annotations

import getpass
import multiprocessing.process
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

E2E = "e2e"

# Under pytest-xdist each worker (and the recipe runs it starts) compiles into a cache of its
# own: two compilers writing one cache race on its precompiled headers. Two workers, each
# with a recipe run of two threads, share two cores: OpenMP threads that wait sleep instead
# of spinning (about a fifth faster here).
if (_worker := os.environ.get("PYTEST_XDIST_WORKER")) is not None:
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{_worker}")
    )

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch  # after OMP_WAIT_POLICY, which OpenMP reads when torch starts it

    # The in-process tests of a worker: one thread each, one worker per core.
    torch.set_num_threads(1)


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
