from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.cli import run_recipe_command
from w2v_knnvq.data.manifest import (
    BadFilesError,
    CorpusScan,
    CorpusUtterance,
    ManifestConfig,
    ManifestError,
    make_manifest,
    read_manifest,
    read_manifest_transcripts,
    scan_corpus,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

CORPUS_DIR = REPO_ROOT / "tests" / "data" / "minispeech"

SPLIT_SIZES = {"train": 84, "dev": 16, "test": 16}


def _config(output_dir: Path, splits: list[str], **kwargs: Any) -> ManifestConfig:
    return ManifestConfig(corpus_dir=CORPUS_DIR, splits=splits, output_dir=output_dir, show_progress=False, **kwargs)


def _trans_lines(split_dir: Path) -> list[tuple[str, str]]:
    """(utterance id, transcript) pairs of every trans.txt, in path order."""
    pairs = []

    for trans_path in sorted(split_dir.glob("*/*/*.trans.txt")):
        for line in trans_path.read_text(encoding="utf-8").splitlines():
            utterance_id, transcript = line.split(" ", 1)

            pairs.append((utterance_id, transcript))

    return pairs


def _run_tool(*args: str, expected_returncode: int) -> subprocess.CompletedProcess[str]:
    return run_recipe_command(
        [sys.executable, str(REPO_ROOT / "tools" / "make_manifest.py"), *args], expected_returncode=expected_returncode
    )


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_single_split_manifest_matches_corpus(tmp_path: Path, split: str) -> None:
    files = make_manifest(_config(tmp_path, [split]))

    assert files.tsv_path == tmp_path / f"{split}.tsv"
    assert files.num_entries == SPLIT_SIZES[split]

    root, entries = read_manifest(files.tsv_path)

    assert root == (CORPUS_DIR / split).resolve()
    assert root.is_absolute()

    rel_paths = [rel_path for rel_path, _ in entries]

    assert rel_paths == sorted(rel_paths)
    assert len(entries) == SPLIT_SIZES[split]

    for rel_path, num_samples in entries:
        assert num_samples == soundfile.info(str(root / rel_path)).frames

    expected_total = sum(soundfile.info(str(path)).frames for path in (CORPUS_DIR / split).glob("*/*/*.flac"))

    assert sum(num_samples for _, num_samples in entries) == expected_total

    trans = _trans_lines(CORPUS_DIR / split)

    assert [Path(rel_path).stem for rel_path in rel_paths] == [utt for utt, _ in trans]
    assert read_manifest_transcripts(files.wrd_path) == [transcript for _, transcript in trans]


def test_combined_splits_prefix_paths_with_split(tmp_path: Path) -> None:
    files = make_manifest(_config(tmp_path, ["train", "dev", "test"], name="all"))

    root, entries = read_manifest(files.tsv_path)

    assert root == CORPUS_DIR.resolve()
    assert len(entries) == sum(SPLIT_SIZES.values())

    for split, size in SPLIT_SIZES.items():
        split_entries = [entry for entry in entries if entry[0].startswith(f"{split}/")]

        assert len(split_entries) == size

        split_manifest = make_manifest(_config(tmp_path / split, [split]))

        _, single_entries = read_manifest(split_manifest.tsv_path)

        assert split_entries == [(f"{split}/{rel}", n) for rel, n in single_entries]

    transcripts = read_manifest_transcripts(files.wrd_path)

    # Sorted order puts dev before test before train.
    expected = [transcript for split in ("dev", "test", "train") for _, transcript in _trans_lines(CORPUS_DIR / split)]

    assert transcripts == expected


def test_combined_splits_need_a_name(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="give the manifest a name"):
        make_manifest(_config(tmp_path, ["train", "dev"]))

    with pytest.raises(ManifestError, match="appear more than once instead"):
        make_manifest(_config(tmp_path, ["dev", "dev"], name="x"))


@pytest.fixture
def damaged_corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the dev split with one file of each kind of damage.

    Returns the corpus folder and, per damaged file name, a fragment of the expected reason.
    """
    corpus_dir = tmp_path / "corpus"

    split_dir = corpus_dir / "dev"

    shutil.copytree(CORPUS_DIR / "dev", split_dir)

    flacs = sorted(split_dir.glob("*/*/*.flac"))

    corrupt, low_rate, stereo, untranscribed = flacs[1], flacs[4], flacs[7], flacs[10]

    corrupt.write_bytes(b"fLaC" + np.random.default_rng(0).bytes(3000))

    audio, sample_rate = soundfile.read(low_rate, dtype="float32")
    soundfile.write(low_rate, audio[::2], sample_rate // 2, subtype="PCM_16", format="FLAC")

    audio, sample_rate = soundfile.read(stereo, dtype="float32")
    soundfile.write(stereo, np.stack([audio, audio], axis=1), sample_rate, format="FLAC")

    chapter_dir = untranscribed.parent
    trans_path = chapter_dir / f"{chapter_dir.parent.name}-{chapter_dir.name}.trans.txt"
    kept = [
        line
        for line in trans_path.read_text(encoding="utf-8").splitlines()
        if not line.startswith(f"{untranscribed.stem} ")
    ]
    trans_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    reasons = {
        corrupt.name: "unreadable by soundfile",
        low_rate.name: "sample rate is 8000 Hz, expected 16000 Hz",
        stereo.name: "has 2 channels, expected mono",
        untranscribed.name: "no transcript line",
    }

    return corpus_dir, reasons


def test_bad_files_are_refused_by_name_and_reason(tmp_path: Path, damaged_corpus: tuple[Path, dict[str, str]]) -> None:
    corpus_dir, reasons = damaged_corpus

    output_dir = tmp_path / "manifests"

    config = ManifestConfig(corpus_dir=corpus_dir, splits=["dev"], output_dir=output_dir, show_progress=False)

    with pytest.raises(BadFilesError) as error:
        make_manifest(config)

    reported = {bad.path.name: bad.reason for bad in error.value.bad_files}

    assert reported.keys() == reasons.keys()

    for name, fragment in reasons.items():
        assert fragment in reported[name]
        assert name in str(error.value)

    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.e2e
def test_bad_files_are_skipped_with_flag(tmp_path: Path, damaged_corpus: tuple[Path, dict[str, str]]) -> None:
    corpus_dir, reasons = damaged_corpus

    output_dir = tmp_path / "manifests"

    refused = _run_tool(str(corpus_dir), "--splits", "dev", "--output-dir", str(output_dir), expected_returncode=1)

    assert "no manifest written" in refused.stderr
    assert "checking audio: 100%" in refused.stderr and "16/16" in refused.stderr
    assert all(name in refused.stderr for name in reasons)
    assert not (output_dir / "dev.tsv").exists()
    assert not (output_dir / "dev.wrd").exists()

    skipped = _run_tool(
        str(corpus_dir), "--splits", "dev", "--output-dir", str(output_dir), "--skip-bad", expected_returncode=0
    )

    assert "Skipping 4 bad file(s)" in skipped.stderr
    assert all(name in skipped.stderr for name in reasons)

    _, entries = read_manifest(output_dir / "dev.tsv")

    names = {Path(rel_path).name for rel_path, _ in entries}

    assert len(entries) == SPLIT_SIZES["dev"] - len(reasons)
    assert names.isdisjoint(reasons)
    assert len(read_manifest_transcripts(output_dir / "dev.wrd")) == len(entries)
    # Only the manifest pair is left behind, no temporary file.
    assert sorted(path.name for path in output_dir.iterdir()) == ["dev.tsv", "dev.wrd"]


def test_transcript_without_audio_is_bad(tmp_path: Path) -> None:
    split_dir = tmp_path / "dev"

    shutil.copytree(CORPUS_DIR / "dev", split_dir)

    missing = sorted(split_dir.glob("*/*/*.flac"))[0]
    missing.unlink()

    scan = scan_corpus(tmp_path, ["dev"], show_progress=False)

    assert [(bad.path, "audio file is missing" in bad.reason) for bad in scan.bad_files] == [(missing, True)]
    assert len(scan.entries) == SPLIT_SIZES["dev"] - 1


@pytest.mark.e2e
def test_missing_or_empty_directories_are_named(tmp_path: Path) -> None:
    missing_corpus = tmp_path / "no-such-corpus"

    missing_message = re.escape(f"Corpus directory {missing_corpus} does not exist")

    with pytest.raises(ManifestError, match=missing_message):
        scan_corpus(missing_corpus, ["dev"], show_progress=False)

    with pytest.raises(ManifestError, match=r"Split directory .*dev-clean does not exist"):
        scan_corpus(CORPUS_DIR, ["dev-clean"], show_progress=False)

    (tmp_path / "empty").mkdir()

    with pytest.raises(ManifestError, match=r"Split directory .*empty is empty"):
        scan_corpus(tmp_path, ["empty"], show_progress=False)

    result = _run_tool(str(missing_corpus), "--splits", "dev", "--output-dir", str(tmp_path), expected_returncode=2)

    assert str(missing_corpus) in result.stderr


def test_reader_round_trip(tmp_path: Path) -> None:
    scan = CorpusScan(
        audio_root=Path("/corpus/train"),
        entries=[
            CorpusUtterance(rel_path="1/10/1-10-0000.flac", num_samples=16000, transcript="IN THE"),
            CorpusUtterance(rel_path="1/10/1-10-0001.flac", num_samples=24321, transcript="IT'S"),
        ],
        bad_files=[],
    )

    files = write_manifest(scan, tmp_path / "out", "train")

    assert files.tsv_path.read_text(encoding="utf-8") == (
        "/corpus/train\n1/10/1-10-0000.flac\t16000\n1/10/1-10-0001.flac\t24321\n"
    )

    root, entries = read_manifest(files.tsv_path)

    assert root == Path("/corpus/train")
    assert entries == [("1/10/1-10-0000.flac", 16000), ("1/10/1-10-0001.flac", 24321)]
    assert read_manifest_transcripts(files.wrd_path) == ["IN THE", "IT'S"]


@pytest.mark.parametrize("bad_line", ["a.flac 16000", "a.flac\t0", "a.flac\t-3", "a.flac\tmany", "\t100", "a\t1\t2"])
def test_read_manifest_rejects_malformed_lines(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "m.tsv"

    path.write_text(f"/root\nok.flac\t10\n{bad_line}\n", encoding="utf-8")

    expected_message = re.escape(f"{path}:3: the line must be 'RELATIVE_PATH<TAB>NUM_SAMPLES'")

    with pytest.raises(ManifestError, match=expected_message):
        read_manifest(path)


def test_readers_name_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=re.escape(f"{tmp_path / 'none.tsv'} does not exist")):
        read_manifest(tmp_path / "none.tsv")

    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")

    with pytest.raises(ManifestError, match="the first line must be the audio root directory"):
        read_manifest(tmp_path / "empty.tsv")

    (tmp_path / "m.tsv").write_text("/root\na.flac\t10\nb.flac\t20\n", encoding="utf-8")
    (tmp_path / "m.wrd").write_text("ONE\n", encoding="utf-8")

    with pytest.raises(ManifestError, match=r"1 transcript line.* but .*m.tsv has 2 entries"):
        read_manifest_transcripts(tmp_path / "m.wrd")

    (tmp_path / "m.wrd").write_text("ONE\n\n", encoding="utf-8")

    with pytest.raises(ManifestError, match=r"m.wrd:2: the transcript is empty"):
        read_manifest_transcripts(tmp_path / "m.wrd")

    (tmp_path / "other.wrd").write_text("ONE\nTWO\n", encoding="utf-8")

    with pytest.raises(ManifestError, match=r"other.tsv does not exist"):
        read_manifest_transcripts(tmp_path / "other.wrd")

    assert read_manifest_transcripts(tmp_path / "other.wrd", manifest_path=tmp_path / "m.tsv") == [
        "ONE",
        "TWO",
    ]
