"""Speed perturbation of the fine-tuning reader: torchaudio's resampling at a factor drawn per
utterance and epoch, reproducible, on the training split only."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile
import torch
import torchaudio.functional

from fairseq2.device import CPU
from fairseq2.gang import create_fake_gangs

from recipes.wav2vec2_knnvq.asr.dataset import AsrDatasetSection
from tests.test_ssl_recipe import _write_synthetic_split
from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.data.manifest_dataset import whole_split_options
from w2v_knnvq.text import train_char_tokenizer
from w2v_knnvq.text.tokenizer import load_ctc_tokenizer

LENGTHS = [40_000, 36_000, 52_000, 33_000, 60_000, 45_000, 38_000, 50_000]

FACTORS = (0.9, 1.1)

NAMES = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The manifest directory, the audio directory and the tokenizer file."""
    root = tmp_path_factory.mktemp("speed")

    manifest_dir, audio_dir = root / "manifests", root / "audio"

    manifest_dir.mkdir()

    _write_synthetic_split(audio_dir, manifest_dir / "train.tsv", LENGTHS, seed=3)

    transcripts = [f"utterance {name}" for name in NAMES]

    (manifest_dir / "train.wrd").write_text("\n".join(transcripts) + "\n")

    return manifest_dir, audio_dir, train_char_tokenizer(transcripts, root / "tokenizer", "chars")


def _read_epochs(
    corpus: tuple[Path, Path, Path], factors: tuple[float, ...], num_epochs: int
) -> list[dict[int, torch.Tensor]]:
    """``{manifest index: unpadded waveform}`` of each epoch, transcripts checked."""
    manifest_dir, _, tokenizer_file = corpus

    tokenizer = load_ctc_tokenizer(tokenizer_file)

    options = whole_split_options(
        AsrReadOptions(min_audio_len=1, max_audio_len=80_000, max_num_elements=160_000, speed_factors=factors)
    )

    reader = AsrManifestDataset(manifest_dir).create_reader("train", tokenizer, create_fake_gangs(CPU), options)

    decoder = tokenizer.create_decoder()

    epochs = []

    for _ in range(num_epochs):
        waveforms = {}

        for batches in reader:
            for batch in batches:
                for row, index in enumerate(batch.example["indices"]):
                    target = batch.target_seqs[row, : batch.target_seq_lens[row]]

                    assert decoder(target) == f"utterance {NAMES[index]}"

                    waveforms[index] = batch.source_seqs[row, : batch.source_seq_lens[row]].clone()

        epochs.append(waveforms)

        reader.reset()

    return epochs


def test_each_utterance_is_resampled_at_one_of_the_factors(corpus: tuple[Path, Path, Path]) -> None:
    _, audio_dir, _ = corpus

    (epoch,) = _read_epochs(corpus, FACTORS, 1)

    assert sorted(epoch) == list(range(len(LENGTHS)))

    chosen = []

    for index, waveform in epoch.items():
        original, _ = soundfile.read(audio_dir / f"train/utt{index}.flac", dtype="float32")

        candidates = {
            factor: torchaudio.functional.speed(torch.from_numpy(original), 16_000, factor)[0] for factor in FACTORS
        }

        matches = [factor for factor, expected in candidates.items() if expected.shape == waveform.shape and torch.allclose(expected, waveform, atol=1e-5)]  # fmt: skip

        assert len(matches) == 1, index

        chosen.append(matches[0])

        # 0.9 plays slower: more samples.
        assert abs(len(waveform) - len(original) / matches[0]) <= 2

    assert set(chosen) == set(FACTORS)


def test_draws_repeat_for_a_reader_anew_and_change_with_the_epoch(corpus: tuple[Path, Path, Path]) -> None:
    first = _read_epochs(corpus, FACTORS, 2)

    again = _read_epochs(corpus, FACTORS, 1)

    assert all(torch.equal(first[0][index], again[0][index]) for index in first[0])

    lengths = [{index: len(waveform) for index, waveform in epoch.items()} for epoch in first]

    assert lengths[0] != lengths[1]


def test_without_factors_the_audio_is_read_unchanged(corpus: tuple[Path, Path, Path]) -> None:
    _, audio_dir, _ = corpus

    (epoch,) = _read_epochs(corpus, (), 1)

    for index, waveform in epoch.items():
        original, _ = soundfile.read(audio_dir / f"train/utt{index}.flac", dtype="float32")

        assert torch.equal(waveform, torch.from_numpy(original))


def test_factors_outside_half_to_double_speed_are_refused() -> None:
    def section(factors: list[float]) -> AsrDatasetSection:
        return AsrDatasetSection(speed_perturbation=factors)

    assert not section([0.9, 1.0, 1.1]).validate().has_error()

    result = section([0.9, 3.0]).validate()

    assert "Every factor of `dataset.speed_perturbation` must be in [0.5, 2], but one is 3.0 instead." in str(result)
