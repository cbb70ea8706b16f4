"""The drivers' job runner on tiny shell commands (no recipe runs): jobs run N at a time, a
finished job is not rerun, an unfinished one is restarted on its output directory, and a
failure names the job, its exit status, its command and its log."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from recipes.studies.jobs import Job, JobError, read_result, run_jobs


def shell_job(
    tmp_path: Path, name: str, script: str, *, result_file: str | None = None, after: tuple[Job, ...] = ()
) -> Job:
    """A job running ``script`` with ``sh`` in ``tmp_path/name`` (``$OUT``; ``$ROOT`` is
    ``tmp_path``)."""
    output_dir = tmp_path / name

    return Job(
        name=f"job {name}",
        command=("sh", "-c", script),
        output_dir=output_dir,
        log_file=output_dir / "job.log",
        result_file=None if result_file is None else output_dir / result_file,
        env={"OUT": str(output_dir), "ROOT": str(tmp_path)},
        after=after,
    )


def rendezvous(me: str, other: str) -> str:
    """Marks the start of ``me``, then waits up to 20 s for the start of ``other``: both
    succeed only if they run at the same time."""
    return (
        f'touch "$ROOT/{me}.started"; '
        f'for _ in $(seq 200); do [ -e "$ROOT/{other}.started" ] && exit 0; sleep 0.1; done; exit 1'
    )


def test_jobs_run_n_at_a_time(tmp_path: Path) -> None:
    jobs = [
        shell_job(tmp_path, "a", f'echo a >> "$ROOT/ran"; {rendezvous("a", "b")}'),
        shell_job(tmp_path, "b", f'echo b >> "$ROOT/ran"; {rendezvous("b", "a")}'),
        shell_job(tmp_path, "c", 'echo c >> "$ROOT/ran"'),
    ]

    lines: list[str] = []

    assert run_jobs(jobs, parallel=2, cwd=tmp_path, echo=lines.append) == jobs

    assert sorted((tmp_path / "ran").read_text().split()) == ["a", "b", "c"]
    assert all(job.is_finished() for job in jobs)
    assert f"== job a -> {tmp_path / 'a'}" in lines


def test_a_finished_job_is_not_rerun(tmp_path: Path) -> None:
    script = 'echo ran >> "$ROOT/count"; echo \'{"value": 3}\' > "$OUT/result.json"'

    job = shell_job(tmp_path, "a", script, result_file="result.json")

    assert run_jobs([job], cwd=tmp_path, echo=print) == [job]

    lines: list[str] = []

    assert run_jobs([job], cwd=tmp_path, echo=lines.append) == []
    assert lines == [f"== job a -> {tmp_path / 'a'} (finished before, not rerun)"]
    assert (tmp_path / "count").read_text() == "ran\n"
    assert read_result(job) == {"value": 3}

    # Another command line (e.g. more steps) is not finished; neither is a lost result.
    other = replace(job, command=(*job.command, "more"))
    assert not other.is_finished()

    job.result_file.unlink()
    assert not job.is_finished()


def test_a_job_is_rerun_when_a_job_it_reads_from_finished_after_it(tmp_path: Path) -> None:
    train = shell_job(tmp_path, "train", 'echo step >> "$ROOT/trained"')
    evaluate = shell_job(tmp_path, "eval", 'cat "$ROOT/trained" > "$OUT/seen"', after=(train,))

    run_jobs([train], cwd=tmp_path, echo=print)
    run_jobs([evaluate], cwd=tmp_path, echo=print)

    assert evaluate.is_finished()

    # The training ran again (say, to more steps): the evaluation is out of date.
    train.done_file.unlink()
    run_jobs([train], cwd=tmp_path, echo=print)

    assert not evaluate.is_finished()
    assert run_jobs([evaluate], cwd=tmp_path, echo=print) == [evaluate]
    assert (tmp_path / "eval" / "seen").read_text().count("\n") == 2


def test_a_failed_job_is_named_with_its_log_and_resumes_on_a_rerun(tmp_path: Path) -> None:
    # The first start leaves a "checkpoint" in its output directory and fails; the restart
    # finds it there, as a recipe resumes from its last checkpoint.
    script = (
        'if [ -e "$OUT/checkpoint" ]; then echo resumed; else touch "$OUT/checkpoint"; echo "bad batch"; exit 3; fi'
    )

    failing = shell_job(tmp_path, "a", script)
    after_failure = shell_job(tmp_path, "b", 'echo ran > "$OUT/ran"')

    with pytest.raises(JobError) as raised:
        run_jobs([failing, after_failure], cwd=tmp_path, echo=print)

    message = str(raised.value)

    assert "job a failed with exit status 3" in message
    assert f"The last lines of its log {tmp_path / 'a' / 'job.log'}:\n    bad batch" in message
    assert "Command: sh -c 'if [ -e" in message

    # No job starts after a failure; the failed one is not finished.
    assert not (tmp_path / "b" / "ran").exists()
    assert not failing.is_finished()

    assert run_jobs([failing, after_failure], cwd=tmp_path, echo=print) == [failing, after_failure]
    assert failing.log_file.read_text() == "resumed\n"


def test_a_missing_or_bad_result_names_the_file_and_the_log(tmp_path: Path) -> None:
    job = shell_job(tmp_path, "a", "true", result_file="evaluation.json")

    with pytest.raises(JobError, match=r"job a wrote no readable result .*evaluation.json .*see its log .*job.log"):
        read_result(job)

    job.result_file.parent.mkdir()
    job.result_file.write_text(json.dumps([1]))

    with pytest.raises(JobError, match=r"must hold a JSON object, but holds a list instead"):
        read_result(job)
