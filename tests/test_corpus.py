from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from tests.cli import run_recipe_command

REPO_ROOT = Path(__file__).resolve().parents[1]

CORPUS_DIR = REPO_ROOT / "tests" / "data" / "minispeech"

SPLIT_SIZES = {"train": 84, "dev": 16, "test": 16}

TOOL = REPO_ROOT / "tools" / "synthesize_corpus.py"

ENGINE_EXECUTABLES = ("espeak-ng", "flite", "text2wave", "bible")


def _transcripts(split_dir: Path) -> dict[Path, str]:
    """Maps the audio path each trans.txt line names to its transcript."""
    transcripts = {}

    for trans_path in split_dir.glob("*/*/*.trans.txt"):
        speaker, chapter = trans_path.parent.parent.name, trans_path.parent.name

        assert trans_path.name == f"{speaker}-{chapter}.trans.txt"

        for line in trans_path.read_text(encoding="utf-8").splitlines():
            utterance_id, transcript = line.split(" ", 1)

            assert re.fullmatch(rf"{speaker}-{chapter}-\d{{4}}", utterance_id)

            transcripts[trans_path.parent / f"{utterance_id}.flac"] = transcript

    return transcripts


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_bundled_corpus_is_16khz_mono_flac_with_transcripts(split: str) -> None:
    split_dir = CORPUS_DIR / split

    audio_paths = sorted(split_dir.glob("*/*/*.flac"))

    assert len(audio_paths) == SPLIT_SIZES[split]

    transcripts = _transcripts(split_dir)

    assert set(transcripts) == set(audio_paths)

    for path in audio_paths:
        info = soundfile.info(str(path))

        assert (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert (info.samplerate, info.channels) == (16_000, 1)
        assert 1.5 <= info.duration <= 5.0

        # LibriSpeech style: uppercase words and apostrophes, numbers spelled out.
        assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", transcripts[path])


def test_bundled_corpus_is_small_with_disjoint_speakers() -> None:
    total_bytes = sum(path.stat().st_size for path in CORPUS_DIR.rglob("*") if path.is_file())

    assert total_bytes <= 5_300_000

    speakers = {split: {p.name for p in (CORPUS_DIR / split).iterdir()} for split in SPLIT_SIZES}

    assert [len(speakers[split]) for split in ("train", "dev", "test")] == [12, 2, 2]
    assert speakers["train"].isdisjoint(speakers["dev"] | speakers["test"])
    assert speakers["dev"].isdisjoint(speakers["test"])

    transcripts = [t for split in SPLIT_SIZES for t in _transcripts(CORPUS_DIR / split).values()]

    assert len(set(transcripts)) == len(transcripts)


def _run_tool(*args: str, expected_returncode: int = 0, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {} if path is None else {"PATH": path}

    return run_recipe_command([sys.executable, str(TOOL), *args], expected_returncode=expected_returncode, env=env)


@pytest.mark.e2e
def test_synthesizer_names_missing_packages(tmp_path: Path) -> None:
    result = _run_tool("--output-dir", str(tmp_path / "corpus"), expected_returncode=1, path=str(tmp_path))

    assert "missing TTS packages: bible-kjv espeak-ng festival flite" in result.stderr
    assert "apt-get install" in result.stderr
    assert not (tmp_path / "corpus").exists()


@pytest.mark.skipif(
    any(shutil.which(executable) is None for executable in ENGINE_EXECUTABLES),
    reason="TTS engines not installed (see tools/synthesize_corpus.py)",
)
@pytest.mark.e2e
def test_synthesizer_is_deterministic_and_builds_librispeech_layout(tmp_path: Path) -> None:
    sizes = ["--train-utterances", "12", "--dev-utterances", "2", "--test-utterances", "2"]

    for name, num_jobs in (("a", "2"), ("b", "1")):
        result = _run_tool("--output-dir", str(tmp_path / name), "--seed", "3", "--num-jobs", num_jobs, *sizes)

        assert "synthesizing utterances: 100%" in result.stderr and "16/16" in result.stderr

    files_a, files_b = (
        sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        for name in ("a", "b")
    )

    assert files_a == files_b
    assert len([p for p in files_a if p.suffix == ".flac"]) == 16

    for rel_path in files_a:
        assert (tmp_path / "a" / rel_path).read_bytes() == (tmp_path / "b" / rel_path).read_bytes()

    for split, size in (("train", 12), ("dev", 2), ("test", 2)):
        transcripts = _transcripts(tmp_path / "a" / split)

        assert len(transcripts) == size
        assert all(path.is_file() for path in transcripts)

    again = _run_tool("--output-dir", str(tmp_path / "a"), *sizes, expected_returncode=1)

    assert "already exist" in again.stderr
