"""Running recipes from a driver: start them, resume them, collect their JSON.

A :class:`Job` is one command line (a recipe or tool run), the output directory it writes and
the log file its output goes to. :func:`run_jobs` runs a list of jobs a given number at a time;
a rerun of a driver reruns only what is not finished:

- a job that exited with status 0 leaves a marker beside its log (``pretrain.log`` ->
  ``pretrain.done``) holding its command line and environment; while the marker matches the
  job (same command and environment, its result file there, written after the markers of the
  jobs it reads from), the job is finished and not started again;
- any other job is started again on its output directory, where the recipe resumes from its
  last checkpoint (a pretraining asked for more steps continues; an evaluation of a run that
  trained further is redone).

A job that fails is reported by :class:`JobError` with its exit status, its command line and the
last lines of its log; the jobs already running are let finish, no new one starts.
:func:`read_result` reads a finished job's JSON result (e.g. ``evaluation.json``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from w2v_knnvq.files import write_atomically
from w2v_knnvq.report import EVALUATION_FILE

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
"""The checkout the drivers run from (the bundled corpus and presets are found from here)."""

RECIPES_PACKAGE: Final = (__package__ or "recipes").rpartition(".")[0]
"""``recipes`` in a checkout, ``w2v_knnvq_recipes`` when installed."""

LOG_TAIL_LINES: Final = 20
"""The lines of a failed job's log that :class:`JobError` quotes."""


def recipe_module(name: str) -> str:
    """The module to run with ``python -m`` for the recipe ``name`` (e.g.
    ``"wav2vec2_knnvq.ssl"``), under the name the recipes are imported by here."""
    return f"{RECIPES_PACKAGE}.{name}"


@dataclass(frozen=True, kw_only=True)
class Job:
    """One recipe or tool run of a driver."""

    name: str
    """What progress lines and errors call the job, e.g. ``"Pretraining with simvq"``."""

    command: tuple[str, ...]

    output_dir: Path
    """The folder the job writes; a restarted job resumes from what it holds."""

    log_file: Path
    """Where the job's standard output and error go (overwritten when it starts)."""

    result_file: Path | None = None
    """The JSON file the job writes, read back by :func:`read_result`; a job without it is
    not finished."""

    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Set in the job's environment on top of the driver's."""

    after: tuple[Job, ...] = ()
    """The jobs whose output this job reads: it is not finished when one of them finished
    after it (e.g. an evaluation of a run that trained further since)."""

    @property
    def done_file(self) -> Path:
        """The marker of a job that exited with status 0, beside its log."""
        return self.log_file.with_suffix(".done")

    def _marker(self) -> dict[str, Any]:
        return {"command": list(self.command), "env": dict(self.env)}

    def is_finished(self) -> bool:
        """Whether a run of this job with this command and environment exited with status 0,
        wrote its result file and came after the jobs it reads from finished."""
        try:
            marker = json.loads(self.done_file.read_text(encoding="utf-8"))

            finished_ns = self.done_file.stat().st_mtime_ns
        except (OSError, ValueError):
            return False

        if marker != self._marker():
            return False

        if self.result_file is not None and not self.result_file.is_file():
            return False

        for job in self.after:
            try:
                if not job.is_finished() or job.done_file.stat().st_mtime_ns > finished_ns:
                    return False
            except OSError:
                return False

        return True

    def mark_finished(self) -> None:
        """Writes the marker that :meth:`is_finished` checks."""
        text = json.dumps(self._marker(), indent=2) + "\n"

        write_atomically(self.done_file, lambda tmp_path: tmp_path.write_text(text, encoding="utf-8"))


class JobError(RuntimeError):
    """Jobs failed, or a job wrote no readable result: the message names each job, its exit
    status, its command line and its log, and quotes the log's last lines."""


def threads_per_job(num_jobs: int, parallel: int) -> int:
    """The CPU threads each of ``num_jobs`` jobs gets when ``parallel`` run at a time."""
    return max(1, (os.cpu_count() or 2) // max(1, min(parallel, num_jobs)))


def run_jobs(
    jobs: Sequence[Job],
    *,
    parallel: int = 1,
    cwd: Path = REPO_ROOT,
    echo: Callable[[str], None] | None = None,
) -> list[Job]:
    """Runs the jobs of ``jobs`` that are not finished, ``parallel`` at a time, in order.

    :param cwd: The folder the commands run in.
    :param echo: Takes the progress lines, from the jobs' threads (default: print them).
    :returns: The jobs that ran (the others were finished).
    :raises JobError: if a job exits with a status other than 0, after the jobs already
        running have ended; no other job starts after a failure.
    """
    if parallel < 1:
        raise ValueError(f"`parallel` must be at least 1, but is {parallel} instead.")

    say = echo if echo is not None else _print

    pending = []

    for job in jobs:
        if job.is_finished():
            say(f"== {job.name} -> {job.output_dir} (finished before, not rerun)")
        else:
            pending.append(job)

    stop = threading.Event()

    with ThreadPoolExecutor(max_workers=parallel) as executor:
        futures: list[Future[str | None]] = [executor.submit(_run_job, job, cwd, say, stop) for job in pending]

        try:
            failures = [failure for future in as_completed(futures) if (failure := future.result()) is not None]
        except BaseException:
            # Interrupted (Ctrl-C reaches the running jobs too): no queued job starts.
            stop.set()

            raise

    if failures:
        raise JobError("\n\n".join(failures))

    return pending


def _run_job(job: Job, cwd: Path, say: Callable[[str], None], stop: threading.Event) -> str | None:
    """Runs ``job`` unless ``stop`` is set (a job failed, or the driver was interrupted);
    returns its failure message, if it fails, and sets ``stop``."""
    if stop.is_set():
        return None

    job.output_dir.mkdir(parents=True, exist_ok=True)
    job.log_file.parent.mkdir(parents=True, exist_ok=True)
    job.done_file.unlink(missing_ok=True)

    say(f"== {job.name} -> {job.output_dir}")

    start = time.monotonic()

    with job.log_file.open("w", encoding="utf-8") as log:
        returncode = subprocess.run(
            job.command, cwd=cwd, env={**os.environ, **job.env}, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode

    if returncode != 0:
        stop.set()

        return (
            f"{job.name} failed with exit status {returncode}.\n"
            f"Command: {shlex.join(job.command)}\n"
            f"The last lines of its log {job.log_file}:\n{log_tail(job.log_file)}"
        )

    job.mark_finished()

    say(f"   {job.name}: done in {time.monotonic() - start:.0f} s")

    return None


def log_tail(log_file: Path, num_lines: int = LOG_TAIL_LINES) -> str:
    """The last ``num_lines`` lines of ``log_file``, indented; a note if it cannot be read."""
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as ex:
        return f"    (the log cannot be read: {ex})"

    return "\n".join(f"    {line}" for line in lines[-num_lines:]) or "    (the log is empty)"


def read_result(job: Job) -> dict[str, Any]:
    """The JSON object of ``job.result_file``.

    :raises JobError: if the job has no result file, or it is missing or no JSON object.
    """
    if job.result_file is None:
        raise JobError(f"{job.name} has no result file.")

    try:
        record = json.loads(job.result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise JobError(
            f"{job.name} wrote no readable result {job.result_file} ({ex}); see its log {job.log_file}."
        ) from None

    if not isinstance(record, dict):
        raise JobError(
            f"{job.result_file} of {job.name} must hold a JSON object, but holds a {type(record).__name__} instead."
        )

    return record


def evaluation_job(run: Job, recipe: str, overrides: Sequence[str], *, name: str, options: Sequence[str] = ()) -> Job:
    """The evaluation of ``run`` by the evaluation recipe ``recipe`` (e.g.
    ``"wav2vec2_knnvq.ssl.eval"``) into ``{run}/eval``, logged to ``{run}/eval.log``; its
    result is the evaluation's ``evaluation.json``, out of date once ``run`` trains further.

    :param overrides: ``--config`` overrides besides ``run.run_dir``.
    :param options: Options of the recipe's command before ``--config``.
    """
    eval_dir = run.output_dir / "eval"

    command = (
        sys.executable, "-m", recipe_module(recipe), "--no-rich", *options,
        "--config", f"run.run_dir={run.output_dir}", *overrides, "--", str(eval_dir),
    )  # fmt: skip

    return Job(
        name=name,
        command=command,
        output_dir=eval_dir,
        log_file=run.output_dir / "eval.log",
        result_file=eval_dir / EVALUATION_FILE,
        after=(run,),
    )


def read_split_records(job: Job, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The records of ``splits`` in the ``evaluation.json`` of the evaluation ``job``.

    :raises JobError: if the result cannot be read or holds no record of a split.
    """
    records = read_result(job).get("splits")

    by_split = {
        record["split"]: record
        for record in (records if isinstance(records, list) else [])
        if isinstance(record, dict) and "split" in record
    }

    for split in splits:
        if split not in by_split:
            raise JobError(
                f"{job.result_file} of {job.name} holds no record of the split '{split}'; see {job.log_file}."
            )

    return {split: by_split[split] for split in splits}


_PRINT_LOCK: Final = threading.Lock()


def _print(line: str) -> None:
    """Prints one progress line whole, whichever job's thread calls it."""
    with _PRINT_LOCK:
        print(line, file=sys.stdout, flush=True)
