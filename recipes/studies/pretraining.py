"""Pretraining runs of a preset, one per quantizer method (and K), their evaluation on the
validation split, and the table of the main job; what the demo and the study share.

Each run is a :class:`~.jobs.Job` of the pretraining recipe in ``OUTPUT_DIR/{name}`` (log
``pretrain.log``) and its evaluation a job of the evaluation recipe in
``OUTPUT_DIR/{name}/eval`` (log ``eval.log``);
a rerun resumes unfinished runs and redoes only the evaluations of runs that trained further.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from w2v_knnvq.data.manifest import ManifestConfig, make_manifest

from .jobs import REPO_ROOT, Job, evaluation_job, read_split_records, recipe_module, run_jobs, threads_per_job

CORPUS_DIR: Final = REPO_ROOT / "tests" / "data" / "minispeech"
"""The bundled corpus (LibriSpeech layout, ``train`` and ``dev``)."""

PRESET: Final = Path(__file__).resolve().parents[1] / "wav2vec2_knnvq" / "ssl" / "configs" / "tiny_cpu.yaml"
"""The pretraining recipe's preset of the tiny 2 x 320 model on the bundled corpus."""

PARALLEL_RUNS: Final = 2
"""Pretraining runs (and evaluations) at a time, the CPU threads split between them."""

VALID_SPLIT: Final = "valid"


def write_manifests(manifest_dir: Path) -> None:
    """The manifests ``train`` and ``valid`` (the ``dev`` split) of the bundled corpus."""
    for split, name in (("train", "train"), ("dev", VALID_SPLIT)):
        make_manifest(
            ManifestConfig(
                corpus_dir=CORPUS_DIR, splits=[split], name=name, output_dir=manifest_dir, show_progress=False
            )
        )


def pretrain_command(
    method: str,
    output_dir: Path,
    num_steps: int,
    num_threads: int,
    extra_overrides: Sequence[str] = (),
    *,
    preset: Path = PRESET,
) -> tuple[str, ...]:
    """The pretraining recipe on ``preset`` with ``method``, ``num_steps`` steps (validated
    and saved at the last) and ``num_threads`` CPU threads."""
    # The preset's schedule (20 warm-up steps, metrics every 10) shrinks with short runs.
    num_warmup_steps = min(20, num_steps // 2)
    publish_every = 10 if num_steps % 10 == 0 else 1

    return (
        sys.executable,
        "-m",
        recipe_module("wav2vec2_knnvq.ssl"),
        "--no-rich",
        "--config-file",
        str(preset),
        "--config",
        f"model.config_overrides.quantizer.method={method}",
        f"regime.num_steps={num_steps}",
        f"regime.validate_every_n_steps={num_steps}",
        f"regime.checkpoint_every_n_steps={num_steps}",
        f"regime.publish_metrics_every_n_steps={publish_every}",
        f"lr_scheduler.config.num_warmup_steps={num_warmup_steps}",
        f"common.torch.num_threads={num_threads}",
        *extra_overrides,
        "--",
        str(output_dir),
    )


@dataclass(frozen=True, kw_only=True)
class PretrainingRun:
    """One run of the preset: its folder name under the output directory, its method and any
    other overrides (e.g. K)."""

    name: str

    method: str

    overrides: tuple[str, ...] = ()


def pretraining_job(
    run: PretrainingRun, output_dir: Path, num_steps: int, num_threads: int, *, preset: Path, env: Mapping[str, str]
) -> Job:
    run_dir = output_dir / run.name

    return Job(
        name=f"Pretraining with {run.name} ({num_steps} steps)",
        command=pretrain_command(run.method, run_dir, num_steps, num_threads, run.overrides, preset=preset),
        output_dir=run_dir,
        log_file=run_dir / "pretrain.log",
        env=env,
    )


def pretrain_all(
    runs: Sequence[PretrainingRun | str], output_dir: Path, manifest_dir: Path, num_steps: int, *, preset: Path = PRESET
) -> list[Job]:
    """Runs ``PARALLEL_RUNS`` at a time, each in ``output_dir/{name}`` (log ``pretrain.log``).

    :param runs: Runs, or method names for runs of the preset as it is.
    :returns: The jobs, finished.
    :raises JobError: if a run fails.
    """
    preset_runs = [run if isinstance(run, PretrainingRun) else PretrainingRun(name=run, method=run) for run in runs]

    num_threads = threads_per_job(len(preset_runs), PARALLEL_RUNS)

    env = {"MINISPEECH_MANIFEST_DIR": str(manifest_dir)}

    jobs = [pretraining_job(run, output_dir, num_steps, num_threads, preset=preset, env=env) for run in preset_runs]

    run_jobs(jobs, parallel=PARALLEL_RUNS)

    return jobs


def evaluate_all(pretraining: Sequence[Job], manifest_dir: Path) -> list[dict[str, Any]]:
    """Evaluates the last checkpoint of each run on the whole validation split with the
    pretraining evaluation recipe, two at a time, into ``{run}/eval`` (``evaluation.json``,
    Figure 2's histograms, ``summary.md``; log ``{run}/eval.log``).

    :returns: The validation split's evaluation record of each run, in order.
    :raises JobError: if an evaluation fails.
    """
    num_threads = threads_per_job(len(pretraining), PARALLEL_RUNS)

    overrides = (
        "run.checkpoint=last", f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"dataset.splits=[{VALID_SPLIT}]", f"common.torch.num_threads={num_threads}",
    )  # fmt: skip

    jobs = [
        evaluation_job(run, "wav2vec2_knnvq.ssl.eval", overrides, name=f"Evaluating {run.output_dir.name}")
        for run in pretraining
    ]

    run_jobs(jobs, parallel=PARALLEL_RUNS)

    return [read_split_records(job, [VALID_SPLIT])[VALID_SPLIT] for job in jobs]


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def result_table(records: Sequence[Mapping[str, Any]], num_steps: int) -> str:
    """Table 3's layout (usage per codebook) with the tightness and per-utterance usage, one
    row per evaluation record of :func:`evaluate_all`."""
    num_codebooks = len(records[0]["codebook_usage"])

    header = ["method", "K", *(f"codebook {g + 1} usage" for g in range(num_codebooks))]
    header += ["mean usage per utterance", "mean individual perplexity", "99th pct. individual perplexity"]

    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]

    for record in records:
        usage = [_percent(value) for value in record["codebook_usage"]]

        per_utterance = _percent(_mean(record["mean_utterance_codebook_usage"]))

        mean_perplexity = record.get("individual_perplexity")

        percentiles = record.get("perplexity_percentiles")

        if isinstance(mean_perplexity, list) and percentiles:
            tightness = [f"{_mean(mean_perplexity):.1f}", f"{_mean([row[2] for row in percentiles]):.1f}"]
        else:
            tightness = ["1 (hard)", "1 (hard)"]

        knn_k = record.get("knn_k")

        k = "—" if knn_k is None else str(knn_k)

        lines.append("| " + " | ".join([record["method"], k, *usage, per_utterance, *tightness]) + " |")

    return (
        f"After {num_steps} steps, on the whole validation split ({records[0]['num_utterances']} "
        "utterances): the fraction of each codebook's 320 entries used (Table 3), the mean fraction used within "
        "an utterance, and the individual perplexity exp(-sum_m p_m log p_m) of the smoothed quantizers "
        "(Table 2: 1 is onehot, 320 uniform; lower is tighter), averaged over codebooks.\n\n" + "\n".join(lines)
    )
