"""The batch calibration tool counts the batches of an epoch as the pretraining reader makes them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fairseq2.device import CPU
from fairseq2.gang import create_fake_gangs

from tests.cli import run_recipe_command
from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.data.speech_dataset import SpeechManifestDataset, SpeechReadOptions

REPO_ROOT = Path(__file__).resolve().parents[1]

TOOL = REPO_ROOT / "tools" / "calibrate_batches.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibrate_batches", TOOL)
    assert spec is not None and spec.loader is not None

    module = importlib.util.module_from_spec(spec)

    # Its dataclasses look their module up by name.
    sys.modules[spec.name] = module

    spec.loader.exec_module(module)

    return module


@pytest.mark.parametrize("max_num_elements", [48_000, 144_000, 480_000])
def test_calibration_counts_the_readers_batches(tmp_path: Path, max_num_elements: int) -> None:
    corpus = REPO_ROOT / "tests" / "data" / "minispeech"

    files = make_manifest(ManifestConfig(corpus_dir=corpus, splits=["train"], output_dir=tmp_path, show_progress=False))

    options = SpeechReadOptions(
        min_audio_len=16_000, max_audio_len=48_000, max_num_elements=max_num_elements, num_parallel_calls=1
    )

    reader = SpeechManifestDataset(tmp_path).create_reader("train", create_fake_gangs(CPU), options)

    batches = [batch for batch_list in reader for batch in batch_list]

    calibration = _tool().calibrate(
        files.tsv_path, max_num_elements, max_audio_len=48_000, min_audio_len=16_000, ranks=1, grad_accumulation=1
    )

    assert calibration.batches_per_rank == len(batches)

    # Two ranks share the utterances: about half the batches each.
    two_ranks = _tool().calibrate(
        files.tsv_path, max_num_elements, max_audio_len=48_000, min_audio_len=16_000, ranks=2, grad_accumulation=1
    )
    assert two_ranks.batches_per_rank == pytest.approx(len(batches) / 2, abs=2)
    assert calibration.utterances_per_step == pytest.approx(sum(batch.num_examples for batch in batches) / len(batches))


@pytest.mark.e2e
def test_command_line_recommends_a_setting(tmp_path: Path) -> None:
    files = make_manifest(
        ManifestConfig(
            corpus_dir=REPO_ROOT / "tests" / "data" / "minispeech",
            splits=["train"],
            output_dir=tmp_path,
            show_progress=False,
        )
    )

    command = [sys.executable, str(TOOL), str(files.tsv_path), "--utterances-per-step", "8", "--ranks", "2"]

    completed = run_recipe_command([*command, "--max-audio-len", "48000", "--min-audio-len", "16000", "--epochs", "10"])

    assert "dataset.max_num_elements=" in completed.stdout and "regime.num_steps=" in completed.stdout

    missing = run_recipe_command([*command[:2], str(tmp_path / "none.tsv"), *command[3:]], expected_returncode=2)
    assert "none.tsv" in missing.stderr
