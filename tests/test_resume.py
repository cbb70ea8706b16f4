"""A pretraining run killed at any point and restarted reproduces the uninterrupted run."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import REPO_ROOT, last_record_per_step, read_jsonl, recipe_command, recipe_env, run_recipe_command
from tests.test_ssl_recipe import TINY_CPU_CONFIG, _write_synthetic_split

pytestmark = pytest.mark.e2e

NUM_STEPS = 12

CHECKPOINT_EVERY = 4


@pytest.fixture(scope="module")
def small_manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight training utterances: four batches of two per epoch, so that twelve steps cross
    two epoch boundaries; most are longer than the 2 s crop, so crops are drawn."""
    manifest_dir = tmp_path_factory.mktemp("manifests")

    audio_dir = tmp_path_factory.mktemp("audio")

    lengths = [40_000, 36_000, 52_000, 33_000, 60_000, 45_000, 38_000, 50_000]

    _write_synthetic_split(audio_dir, manifest_dir / "train.tsv", lengths, seed=3)
    _write_synthetic_split(audio_dir, manifest_dir / "valid.tsv", [30_000, 40_000], seed=4)

    return manifest_dir


def _command(output_dir: Path, manifest_dir: Path) -> list[str]:
    overrides = [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        "model.arch=tiny_2x320",
        "model.config_overrides.quantizer.method=softmax-knn-ce",
        "dataset.min_audio_len=16000",
        "dataset.max_audio_len=32000",
        "dataset.max_num_elements=64000",
        f"regime.num_steps={NUM_STEPS}",
        f"regime.validate_every_n_steps={CHECKPOINT_EVERY}",
        f"regime.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
        "regime.publish_metrics_every_n_steps=1",
        "regime.keep_last_n_checkpoints=null",
        "lr_scheduler.config.num_warmup_steps=2",
    ]

    return recipe_command("recipes.wav2vec2_knnvq.ssl", output_dir, overrides, config_file=TINY_CPU_CONFIG)


def _kill_after_first_checkpoint(command: list[str], checkpoints_dir: Path) -> None:
    """Starts ``command`` and kills it with SIGKILL as soon as a checkpoint is complete."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    try:
        deadline = time.monotonic() + 120

        while not (checkpoints_dir / f"step_{CHECKPOINT_EVERY}").is_dir():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within two minutes"

            time.sleep(0.01)

        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)

    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def _leave_interrupted_save(checkpoints_dir: Path) -> int:
    """Makes the next checkpoint look as a kill in the middle of its save leaves it:
    fairseq2 writes ``step_N.tmp`` and renames it when complete.

    :returns: The last complete step, from which the run must resume.
    """
    steps = sorted(int(path.name.removeprefix("step_")) for path in checkpoints_dir.glob("step_*") if path.is_dir() and path.suffix != ".tmp")  # fmt: skip

    last_step = steps[-1]

    if last_step + CHECKPOINT_EVERY <= NUM_STEPS:
        partial = checkpoints_dir / f"step_{last_step + CHECKPOINT_EVERY}.tmp"

        shutil.copytree(checkpoints_dir / f"step_{last_step}", partial, dirs_exist_ok=True)

        for file in partial.rglob("*.pt"):
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return last_step


def test_killed_run_resumes_with_the_losses_of_the_uninterrupted_run(small_manifest_dir: Path, tmp_path: Path) -> None:
    reference_dir = tmp_path / "uninterrupted"

    run_recipe_command(_command(reference_dir, small_manifest_dir))

    reference = last_record_per_step(reference_dir / "metrics/train.jsonl")

    assert sorted(reference) == list(range(1, NUM_STEPS + 1))

    # Two epochs end within the run: the resumed run must also draw the crops of later epochs.
    assert reference[NUM_STEPS]["Data Epoch"] == 3

    output_dir = tmp_path / "killed"

    _kill_after_first_checkpoint(_command(output_dir, small_manifest_dir), output_dir / "checkpoints")

    resume_step = _leave_interrupted_save(output_dir / "checkpoints")

    # fairseq2 saves a step before it validates it: as a kill between the two leaves it.
    valid_file = output_dir / "metrics/valid.jsonl"

    if valid_file.exists():
        kept = [line for line in valid_file.read_text().splitlines(keepends=True) if json.loads(line)["Step"] != resume_step]  # fmt: skip

        valid_file.write_text("".join(kept))

    result = run_recipe_command(_command(output_dir, small_manifest_dir))

    log = result.stdout + result.stderr

    assert f"Restoring training from the last checkpoint at step {resume_step}." in log
    assert f"Step {resume_step} was saved but not validated (the run stopped in between); validating it before training resumes." in log  # fmt: skip

    resumed = last_record_per_step(output_dir / "metrics/train.jsonl")

    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))

    for step in range(resume_step + 1, NUM_STEPS + 1):
        for name in ("Loss", "Contrastive Loss", "Quantizer Loss", "Gradient Norm"):
            assert math.isclose(resumed[step][name], reference[step][name], rel_tol=1e-5, abs_tol=1e-6), (step, name)

    # The restored step is validated as the uninterrupted run validated it, once.
    reference_valid = {record["Step"]: record for record in read_jsonl(reference_dir / "metrics/valid.jsonl")}
    resumed_valid = [record["Step"] for record in read_jsonl(valid_file)]

    assert sorted(resumed_valid) == sorted(reference_valid) == list(range(CHECKPOINT_EVERY, NUM_STEPS + 1, CHECKPOINT_EVERY))  # fmt: skip

    for record in read_jsonl(valid_file):
        for name in ("Loss", "Accuracy", "Codebook Usage", "Code Perplexity"):
            assert record[name] == pytest.approx(reference_valid[record["Step"]][name], rel=1e-5), (
                record["Step"],
                name,
            )

    assert (output_dir / f"checkpoints/step_{NUM_STEPS}").is_dir()

    assert not list((output_dir / "checkpoints").glob("*.tmp"))
