"""Audio that vanishes or breaks after its manifest was written: skipped with a warning,
counted, and fatal only past ``max_bad_audio_fraction``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fairseq2.device import CPU
from fairseq2.gang import create_fake_gangs

from tests.cli import last_record_per_step, read_jsonl, recipe_command, run_recipe_command
from tests.test_ssl_recipe import TINY_CPU_CONFIG, _write_synthetic_split
from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.data.audio_reading import AudioReadTracker, BadAudioBudgetError
from w2v_knnvq.data.manifest_dataset import whole_split_options
from w2v_knnvq.data.speech_dataset import SpeechManifestDataset, SpeechReadOptions
from w2v_knnvq.text import train_char_tokenizer
from w2v_knnvq.text.tokenizer import load_ctc_tokenizer

TRAIN_LENGTHS = [40_000, 36_000, 52_000, 33_000, 60_000, 45_000, 38_000, 50_000]


SHORT_LEN = 5_000


def _break(
    audio_dir: Path,
    manifest_file: Path,
    *,
    vanish: int | None = None,
    corrupt: int | None = None,
    shorten: int | None = None,
) -> list[Path]:
    """Deletes, truncates and/or rewrites shorter (:data:`SHORT_LEN` samples, a valid file)
    utterances of a written manifest; returns the broken files."""
    relative = [line.split("\t")[0] for line in manifest_file.read_text().splitlines()[1:]]

    broken = []

    if vanish is not None:
        (audio_dir / relative[vanish]).unlink()

        broken.append(audio_dir / relative[vanish])

    if corrupt is not None:
        path = audio_dir / relative[corrupt]

        path.write_bytes(path.read_bytes()[:200])

        broken.append(path)

    if shorten is not None:
        path = audio_dir / relative[shorten]

        soundfile.write(path, np.full(SHORT_LEN, 0.1, dtype=np.float32), 16_000)

        broken.append(path)

    return broken


@pytest.fixture
def broken_corpus(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A manifest directory whose training split lost one file, has a truncated one and
    one rewritten shorter than the crops, and whose validation split has a file rewritten
    at the wrong sample rate."""
    manifest_dir = tmp_path / "manifests"
    audio_dir = tmp_path / "audio"

    manifest_dir.mkdir()

    _write_synthetic_split(audio_dir, manifest_dir / "train.tsv", TRAIN_LENGTHS, seed=5)
    _write_synthetic_split(audio_dir, manifest_dir / "valid.tsv", [30_000, 40_000, 35_000], seed=6)

    broken = _break(audio_dir, manifest_dir / "train.tsv", vanish=2, corrupt=5, shorten=6)

    resampled = audio_dir / "valid/utt1.flac"

    soundfile.write(resampled, np.zeros(20_000, dtype=np.float32), 8_000)

    return manifest_dir, [*broken, resampled]


def test_tracker_allows_the_fraction_of_the_split_then_of_the_reads(caplog: pytest.LogCaptureFixture) -> None:
    tracker = AudioReadTracker(Path("train.tsv"), max_fraction=0.25, num_utterances=8)

    good = {"path": {"path": "a.flac", "waveform": torch.zeros(4)}}

    def bad(name: str) -> dict[str, dict[str, str]]:
        return {"path": {"path": name, "file": f"/audio/{name}", "error": "it does not exist"}}

    with caplog.at_level(logging.WARNING):
        kept, waveforms = tracker.sort_bucket([good, bad("b.flac"), good])

    assert len(kept) == 2 and len(waveforms) == 2
    assert "Skipped /audio/b.flac listed in train.tsv: it does not exist." in caplog.text

    # 2 skips of 8 utterances: 25% of the split, not more.
    tracker.sort_bucket([bad("c.flac")])

    assert tracker.take_num_skipped() == 2
    assert tracker.take_num_skipped() == 0

    # 16 reads allow 4 skips.
    tracker.sort_bucket([good] * 10)
    tracker.sort_bucket([bad("d.flac"), bad("e.flac")])

    with pytest.raises(BadAudioBudgetError) as error:
        tracker.sort_bucket([bad("f.flac")])

    message = str(error.value)

    assert "5 of the 17 utterances read from train.tsv could not be used" in message
    assert "`dataset.max_bad_audio_fraction` (0.25)" in message
    assert all(f"/audio/{name}.flac (it does not exist)" in message for name in "bcdef")


def test_speech_reader_skips_and_counts_unusable_files(broken_corpus: tuple[Path, list[Path]]) -> None:
    manifest_dir, _ = broken_corpus

    dataset = SpeechManifestDataset(manifest_dir)

    options = whole_split_options(
        SpeechReadOptions(min_audio_len=16_000, max_audio_len=None, max_num_elements=60_000, max_bad_audio_fraction=0.4)
    )

    paths, num_skipped = [], 0

    for batches in dataset.create_reader("train", create_fake_gangs(CPU), options):
        for batch in batches:
            paths.extend(batch.example["paths"])

            num_skipped += batch.example["num_skipped"]

    expected = [entry.path for entry in dataset.read_split("train").entries if not entry.path.endswith(("utt2.flac", "utt5.flac", "utt6.flac"))]  # fmt: skip

    assert paths == expected
    assert num_skipped == 3


def test_asr_reader_keeps_transcripts_aligned_when_skipping(tmp_path: Path) -> None:
    manifest_dir, audio_dir = tmp_path / "manifests", tmp_path / "audio"

    manifest_dir.mkdir()

    _write_synthetic_split(audio_dir, manifest_dir / "train.tsv", TRAIN_LENGTHS, seed=7)

    transcripts = [
        f"utterance number {word}" for word in ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    ]

    (manifest_dir / "train.wrd").write_text("\n".join(transcripts) + "\n")

    _break(audio_dir, manifest_dir / "train.tsv", vanish=0, corrupt=3)

    tokenizer = load_ctc_tokenizer(train_char_tokenizer(transcripts, tmp_path / "tokenizer", "chars"))

    options = whole_split_options(
        AsrReadOptions(min_audio_len=1, max_audio_len=80_000, max_num_elements=120_000, max_bad_audio_fraction=0.25)
    )

    reader = AsrManifestDataset(manifest_dir).create_reader("train", tokenizer, create_fake_gangs(CPU), options)

    seen, num_skipped = {}, 0

    decoder = tokenizer.create_decoder()

    for batches in reader:
        for batch in batches:
            num_skipped += batch.example["num_skipped"]

            for row, (index, transcript) in enumerate(zip(batch.example["indices"], batch.example["transcripts"], strict=True)):  # fmt: skip
                target = batch.target_seqs[row, : batch.target_seq_lens[row]]

                assert decoder(target) == transcript

                seen[index] = transcript

    assert seen == {index: transcripts[index] for index in (1, 2, 4, 5, 6, 7)}
    assert num_skipped == 2


def _ssl_command(output_dir: Path, manifest_dir: Path, *overrides: str) -> list[str]:
    return recipe_command(
        "recipes.wav2vec2_knnvq.ssl",
        output_dir,
        [
            f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.min_audio_len=16000",
            "dataset.max_audio_len=32000",
            "dataset.max_num_elements=64000",
            "regime.num_steps=6",
            "regime.validate_every_n_steps=6",
            "regime.checkpoint_every_n_steps=6",
            "regime.publish_metrics_every_n_steps=1",
            "lr_scheduler.config.num_warmup_steps=1",
            *overrides,
        ],
        config_file=TINY_CPU_CONFIG,
    )


@pytest.mark.e2e
def test_pretraining_survives_bad_files_and_reports_them(
    broken_corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    manifest_dir, broken = broken_corpus

    output_dir = tmp_path / "run"

    result = run_recipe_command(_ssl_command(output_dir, manifest_dir, "dataset.max_bad_audio_fraction=0.4"))

    log = result.stdout + result.stderr

    for path in broken:
        assert f"Skipped {path} listed in" in log

    assert "cannot be decoded as audio" in log
    assert "it does not exist" in log
    assert "sampled at 8000 Hz" in log
    assert f"it has {SHORT_LEN} samples, the manifest says {TRAIN_LENGTHS[6]}; the model needs at least 16000" in log

    train = last_record_per_step(output_dir / "metrics/train.jsonl")

    # Six steps of 2 utterances read 12 of them: each bad training file at least once.
    assert sum(record["Skipped Utterances"] for record in train.values()) >= 3

    (valid,) = read_jsonl(output_dir / "metrics/valid.jsonl")

    assert valid["Skipped Utterances"] == 1


@pytest.mark.e2e
def test_too_many_bad_files_stop_the_run_with_their_names(
    broken_corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    manifest_dir, broken = broken_corpus

    result = run_recipe_command(_ssl_command(tmp_path / "run", manifest_dir), expected_returncode=1)

    log = result.stdout + result.stderr

    assert "Too many unusable audio files." in log
    assert "`dataset.max_bad_audio_fraction` (0.001)" in log
    assert any(str(path) in log for path in broken[:2])
    assert "bug report" not in log
    assert "Traceback" not in log


def test_bad_audio_fraction_must_be_a_fraction() -> None:
    from recipes.wav2vec2_knnvq.asr.eval.config import AsrEvalDatasetSection
    from w2v_knnvq.data.manifest_dataset import ManifestDatasetSection

    def manifest_section(fraction: float) -> ManifestDatasetSection:
        return ManifestDatasetSection(
            family="speech_manifest",
            min_audio_len=1,
            max_audio_len=16_000,
            max_num_elements=16_000,
            max_bad_audio_fraction=fraction,
        )

    for fraction in (0.0, 0.5, 1.0):
        assert not manifest_section(fraction).validate().has_error()
        assert not AsrEvalDatasetSection(max_bad_audio_fraction=fraction).validate().has_error()

    for section in (manifest_section(1.5), AsrEvalDatasetSection(max_bad_audio_fraction=-0.1)):
        result = section.validate()

        assert result.has_error()
        assert "`max_bad_audio_fraction` must be between 0 and 1, but is" in str(result)


def test_a_fifo_is_skipped_at_once_and_a_stalled_read_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO (or a device) would block the reader for good; a read that stalls on a hung
    mount is named by the watchdog while it waits."""
    import os
    import threading
    import time

    from w2v_knnvq.data.audio_reading import AudioLoader, ReadWatchdog

    os.mkfifo(tmp_path / "stalled.flac")

    result: dict[str, object] = {}

    reader = threading.Thread(target=lambda: result.update(AudioLoader(tmp_path)("stalled.flac")), daemon=True)

    reader.start()
    reader.join(timeout=30)

    assert not reader.is_alive(), "the loader blocked on a FIFO"
    assert result == {"path": "stalled.flac", "file": str(tmp_path / "stalled.flac"), "error": "it is not a regular file (a FIFO, socket or device)"}  # fmt: skip

    watchdog = ReadWatchdog(threshold_s=0.2)

    with caplog.at_level(logging.WARNING), watchdog.reading("/mnt/hung/utt1.flac"):
        time.sleep(1.0)

    assert "Reading /mnt/hung/utt1.flac has taken 0 s so far" in caplog.text or "Reading /mnt/hung/utt1.flac has taken 1 s so far" in caplog.text  # fmt: skip
    assert "the file system may be stalled (a hung network mount?)" in caplog.text

    caplog.clear()

    with caplog.at_level(logging.WARNING), watchdog.reading("/data/fast.flac"):
        pass

    time.sleep(0.5)

    assert "fast.flac" not in caplog.text
