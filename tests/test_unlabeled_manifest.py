"""Manifests of unlabeled audio: any folder tree, several extensions, a seeded validation draw,
the same audio checks as LibriSpeech, through the API and the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.cli import run_recipe_command
from w2v_knnvq.data.manifest import BadFilesError, ManifestError, read_manifest
from w2v_knnvq.data.unlabeled import UnlabeledManifestConfig, make_unlabeled_manifests

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_tree(root: Path) -> dict[str, int]:
    """Twenty files in nested folders, flac, wav and ogg; :returns: their lengths by path."""
    rng = np.random.default_rng(0)

    lengths = {}

    for index in range(20):
        extension = ("flac", "wav", "ogg")[index % 3]

        relative = f"speaker{index % 4}/session{index % 2}/utt{index}.{extension}"

        length = 8_000 + 100 * index

        (root / relative).parent.mkdir(parents=True, exist_ok=True)

        soundfile.write(root / relative, (0.1 * rng.standard_normal(length)).astype(np.float32), 16_000)

        lengths[relative] = length

    (root / "notes.txt").write_text("not audio")

    return lengths


def _config(root: Path, output_dir: Path, **overrides: object) -> UnlabeledManifestConfig:
    settings: dict[str, object] = {"extensions": ["flac", "wav", "ogg"], "valid_percent": 0.25, "show_progress": False}

    settings.update(overrides)

    return UnlabeledManifestConfig(audio_dir=root, output_dir=output_dir, **settings)  # type: ignore[arg-type]


def test_any_tree_splits_into_train_and_valid(tmp_path: Path) -> None:
    lengths = _write_tree(tmp_path / "audio")

    manifests = make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "out"))

    assert (manifests.num_train, manifests.num_valid) == (15, 5)
    assert manifests.valid_path is not None

    train_root, train = read_manifest(manifests.train_path)
    valid_root, valid = read_manifest(manifests.valid_path)

    assert train_root == valid_root == (tmp_path / "audio").resolve()

    # Every file once, with its true length (ogg included); nothing else.
    assert dict(train) | dict(valid) == lengths
    assert not set(dict(train)) & set(dict(valid))

    # The draw is seeded: the same seed gives the same split, another seed another one.
    again = make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "again"))
    assert again.valid_path is not None and read_manifest(again.valid_path)[1] == valid

    other = make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "other", seed=7))
    assert other.valid_path is not None and read_manifest(other.valid_path)[1] != valid

    only_flac = make_unlabeled_manifests(
        _config(tmp_path / "audio", tmp_path / "flac", extensions=["flac"], valid_percent=0.0)
    )
    assert only_flac.valid_path is None and only_flac.num_train == 7


def test_bad_files_are_refused_or_skipped(tmp_path: Path) -> None:
    _write_tree(tmp_path / "audio")

    soundfile.write(tmp_path / "audio" / "fast.wav", np.zeros(8000, dtype=np.float32), 22_050)
    (tmp_path / "audio" / "broken.flac").write_bytes(b"fLaC not really")

    with pytest.raises(BadFilesError) as error:
        make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "out"))

    message = str(error.value)
    assert "2 bad file(s), no manifest written" in message and "fast.wav" in message and "broken.flac" in message
    assert not (tmp_path / "out" / "train.tsv").exists()

    manifests = make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "out", skip_bad=True))
    assert manifests.num_train + manifests.num_valid == 20

    with pytest.raises(ManifestError, match=r"holds no file with the extension\(s\) \.mp3"):
        make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "out", extensions=["mp3"]))

    with pytest.raises(ManifestError, match=r"`valid_percent` must be in \[0, 1\), but is 1.5 instead"):
        make_unlabeled_manifests(_config(tmp_path / "audio", tmp_path / "out", valid_percent=1.5))

    with pytest.raises(ManifestError, match="does not exist"):
        make_unlabeled_manifests(_config(tmp_path / "missing", tmp_path / "out"))


def test_files_no_model_or_manifest_line_can_take_are_bad_files(tmp_path: Path) -> None:
    """Shorter than the CNN's receptive field, NaN or infinite samples in a float WAV (in its
    tail, or anywhere with a full decode), a tab or a line break in the name, not a regular
    file."""
    audio_dir = tmp_path / "audio"

    _write_tree(audio_dir)

    soundfile.write(audio_dir / "short.wav", np.full(300, 0.1, dtype=np.float32), 16_000)

    samples = np.full(20_000, 0.1, dtype=np.float32)
    samples[19_990] = np.inf
    soundfile.write(audio_dir / "inf_at_end.wav", samples, 16_000, subtype="FLOAT")

    samples = np.full(20_000, 0.1, dtype=np.float32)
    samples[100] = np.nan
    soundfile.write(audio_dir / "nan_at_start.wav", samples, 16_000, subtype="FLOAT")

    soundfile.write(audio_dir / "tab\tname.flac", np.full(8_000, 0.1, dtype=np.float32), 16_000)
    soundfile.write(audio_dir / "line\nbreak.flac", np.full(8_000, 0.1, dtype=np.float32), 16_000)

    # A FIFO stands in for a file on a hung mount: opening it would block for good.
    os.mkfifo(audio_dir / "stalled.flac")

    with pytest.raises(BadFilesError) as error:
        make_unlabeled_manifests(_config(audio_dir, tmp_path / "out"))

    message = str(error.value)

    assert "short.wav: has 300 samples, fewer than the 400 from which wav2vec 2.0's CNN makes one frame" in message
    assert "inf_at_end.wav: holds NaN or infinite samples" in message
    assert "nan_at_start.wav" not in message
    assert message.count("its path holds a tab or a line break, which a manifest line cannot hold") == 2
    assert "stalled.flac: is not a regular file (a FIFO, socket or device)" in message
    assert "5 bad file(s), no manifest written" in message

    with pytest.raises(BadFilesError) as error:
        make_unlabeled_manifests(_config(audio_dir, tmp_path / "out", full_decode=True))

    assert "nan_at_start.wav: holds NaN or infinite samples between samples 0 and 20000" in str(error.value)

    manifests = make_unlabeled_manifests(_config(audio_dir, tmp_path / "out", full_decode=True, skip_bad=True))

    train = read_manifest(manifests.train_path)[1]

    assert manifests.num_train + manifests.num_valid == 20
    assert all("\t" not in path and "\n" not in path for path, _ in train)


@pytest.mark.e2e
def test_command_line(tmp_path: Path) -> None:
    _write_tree(tmp_path / "audio")

    command = [sys.executable, str(REPO_ROOT / "tools" / "make_manifest.py"), str(tmp_path / "audio"), "--unlabeled"]

    completed = run_recipe_command(
        [*command, "--ext", "wav", "ogg", "--valid-percent", "0.1", "--output-dir", str(tmp_path / "out")]
    )

    assert "wrote 12 entries to" in completed.stderr and "and 1 to" in completed.stderr

    missing_splits = run_recipe_command(command[:3] + ["--output-dir", str(tmp_path / "x")], expected_returncode=2)
    assert "`--splits` must name at least one split folder" in missing_splits.stderr


def test_long_recordings_become_windows_that_are_read_alone(tmp_path: Path) -> None:
    """A 10-minute and a 20-second recording in 15 s windows (the last one kept only if at
    least 2 s long): a window reads the same samples as the whole file holds there, and the
    memory a read takes does not grow with the file's length."""
    import tracemalloc

    from w2v_knnvq.data.audio_reading import AudioLoader
    from w2v_knnvq.features.audio_input import read_audio

    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()

    rng = np.random.default_rng(3)

    long_samples = (0.1 * rng.standard_normal(600 * 16_000)).astype(np.float32)
    soundfile.write(audio_dir / "long.flac", long_samples, 16_000)
    soundfile.write(audio_dir / "short.flac", long_samples[: 20 * 16_000 + 8_000], 16_000)  # 20.5 s

    manifests = make_unlabeled_manifests(
        _config(audio_dir, tmp_path / "out", extensions=["flac"], valid_percent=0.0, segment_seconds=15.0)
    )

    root, entries = read_manifest(manifests.train_path)

    # 600 s: 40 windows; 20.5 s: one window of 15 s, the last 5.5 s kept (>= 2 s).
    assert len(entries) == 42
    assert entries[0] == ("long.flac:0:240000", 240_000)
    assert entries[-1] == ("short.flac:240000:88000", 88_000)

    loader = AudioLoader(root)

    def peak_bytes(entry: str) -> tuple[int, np.ndarray]:
        tracemalloc.start()

        try:
            loaded = loader(entry)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        return peak, loaded["waveform"].numpy()

    near_end = f"long.flac:{590 * 16_000}:{10 * 16_000}"

    long_peak, window = peak_bytes(near_end)
    short_peak, _ = peak_bytes(f"short.flac:{10 * 16_000}:{10 * 16_000}")

    np.testing.assert_allclose(window, long_samples[590 * 16_000 :], atol=1e-4)

    # Ten seconds are 640 kB of float32; the 10-minute file alone would be 38 MB.
    assert long_peak < 4 * 640_000
    assert long_peak < 2 * short_peak + 200_000

    waveform, sample_rate = read_audio(root / near_end)

    assert sample_rate == 16_000
    np.testing.assert_array_equal(waveform.numpy(), window)

    with pytest.raises(ManifestError, match=r"`min_segment_seconds` must be in \(0, `segment_seconds` \(1.0\)\]"):
        make_unlabeled_manifests(_config(audio_dir, tmp_path / "bad", segment_seconds=1.0, min_segment_seconds=2.0))
