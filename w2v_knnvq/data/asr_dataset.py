"""Transcribed speech from fairseq-style manifests, batched for CTC fine-tuning.

A split is a ``{split}.tsv`` manifest (see :mod:`w2v_knnvq.data.manifest_dataset`) and a
``{split}.wrd`` file with the transcript of each of its utterances, one per line, in the
same order. Unlike pretraining, utterances are never cropped (the transcript would no
longer match the audio): utterances longer than ``max_audio_len`` are dropped and counted
in the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, final

import torch
import torchaudio.functional
from torch import Tensor

from fairseq2.data.data_pipeline import Collater
from fairseq2.data.tokenizers import TokenEncoder, Tokenizer
from fairseq2.datasets import DataReader, DatasetError, Seq2SeqBatch
from fairseq2.gang import Gangs
from fairseq2.logging import log

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.data.audio_reading import AudioReadTracker, ReadEpoch, example_generator
from w2v_knnvq.data.manifest import ManifestError, read_manifest_transcripts
from w2v_knnvq.data.manifest_dataset import (
    ManifestReadOptions,
    bucket_by_num_samples,
    check_manifest_dir,
    collated_seq_lens,
    create_pipeline_reader,
    create_read_tracker,
    decode_audio,
    length_bucket_sizes,
    load_waveforms,
    read_examples,
    read_manifest_split,
)

ASR_MANIFEST_DATASET_FAMILY: Final = "asr_manifest"


@dataclass(frozen=True)
class AsrUtterance:
    """One transcribed utterance of a split."""

    index: int
    """The position of the utterance in its manifest."""

    path: str
    """The audio file, relative to the split's audio root directory."""

    num_samples: int

    transcript: str

    @property
    def utterance_id(self) -> str:
        """The file name without its extension (``SPEAKER-CHAPTER-NNNN`` for LibriSpeech)."""
        return Path(self.path).stem


@dataclass(frozen=True)
class AsrSplit:
    """A parsed ``{split}.tsv`` and ``{split}.wrd`` pair."""

    manifest_file: Path

    audio_dir: Path

    utterances: list[AsrUtterance]


@dataclass(kw_only=True)
class AsrReadOptions(ManifestReadOptions):
    """How a split is filtered, batched and read."""

    max_audio_len: int = 640_000
    """Utterances with more samples are dropped (and counted in the log)."""

    max_num_elements: int = 3_200_000
    """Upper bound on the number of audio samples in a batch, padding included (before speed
    perturbation, which lengthens an utterance by up to ``1 / min(speed_factors)``)."""

    speed_factors: tuple[float, ...] = ()
    """Speed perturbation: each utterance is played at a speed drawn uniformly from these
    factors, afresh in every epoch (resampled by :func:`torchaudio.functional.speed`, which
    changes tempo and pitch as Kaldi's speed perturbation does); empty leaves it as it is."""


@final
class AsrManifestDataset:
    """The transcribed splits of a manifest directory."""

    _manifest_dir: Path

    def __init__(self, manifest_dir: Path) -> None:
        check_manifest_dir(
            manifest_dir, "a `{split}.tsv` and a `{split}.wrd` file per split (tools/make_manifest.py writes both)"
        )

        self._manifest_dir = manifest_dir

    @property
    def manifest_dir(self) -> Path:
        return self._manifest_dir

    def transcript_file(self, split: str) -> Path:
        return self._manifest_dir / f"{split}.wrd"

    def read_split(self, split: str) -> AsrSplit:
        """:raises DatasetError: if a file is missing or malformed, or the split is empty."""
        manifest = read_manifest_split(self._manifest_dir / f"{split}.tsv")

        try:
            transcripts = read_manifest_transcripts(self.transcript_file(split), manifest_path=manifest.manifest_file)
        except ManifestError as ex:
            raise DatasetError(f"Transcripts of split `{split}` cannot be read: {ex}") from ex

        utterances = [
            AsrUtterance(index, entry.path, entry.num_samples, " ".join(transcript.split()))
            for index, (entry, transcript) in enumerate(zip(manifest.entries, transcripts, strict=True))
        ]

        return AsrSplit(manifest.manifest_file, manifest.audio_dir, utterances)

    def create_reader(
        self, split: str, tokenizer: Tokenizer, gangs: Gangs, options: AsrReadOptions
    ) -> DataReader[Seq2SeqBatch]:
        """Returns a reader of :class:`Seq2SeqBatch`, sharded over ``gangs.dp``.

        A batch holds float32 waveforms of shape ``(N, S_wav)`` as source, padded with
        zeros, and token ids of shape ``(N, S_tgt)`` as target, padded with the
        tokenizer's padding id. ``batch.example`` is a dict with the utterances' manifest
        ``indices``, ``ids`` and ``transcripts``.
        """
        check_speed_factors(options.speed_factors)

        asr_split = self.read_split(split)

        utterances = _filter_by_length(asr_split, options)

        bucket_sizes = length_bucket_sizes(
            max_num_elements=options.max_num_elements,
            max_audio_len=options.max_audio_len,
            min_audio_len=options.min_audio_len,
        )

        builder = read_examples(utterances, gangs, options)

        bucket_by_num_samples(builder, bucket_sizes, options.min_audio_len)

        if options.batch_shuffle_window != 1:
            builder.shuffle(options.batch_shuffle_window, options.seed + 1 + gangs.dp.rank)

        decode_audio(builder, asr_split.audio_dir, options.num_parallel_calls)

        tracker = create_read_tracker(asr_split.manifest_file, len(utterances), gangs, options)

        pad_idx = tokenizer.vocab_info.pad_idx

        if pad_idx is None:
            raise ValueError("The tokenizer must have a padding id to pad target batches.")

        epoch = ReadEpoch()

        # Every rank draws its own speeds.
        speed = _SpeedPerturbation(options.speed_factors, options.seed + 1 + gangs.dp.rank, epoch)

        builder.map(
            _AsrBatchCollater(
                asr_split.manifest_file, tracker, tokenizer.create_encoder(), pad_idx, options.normalize_audio, speed
            )
        )

        return create_pipeline_reader(builder, gangs, options, epoch)


def check_speed_factors(factors: Sequence[float], name: str = "speed_factors") -> None:
    """:raises ValueError: unless every factor lies in [0.5, 2]; ``name`` is the option's."""
    for factor in factors:
        if not 0.5 <= factor <= 2.0:
            raise ValueError(f"Every factor of `{name}` must be in [0.5, 2], but one is {factor} instead.")


@final
class _SpeedPerturbation:
    """Plays each utterance at a speed drawn from the seed, the data epoch and the
    utterance's path, so that a resumed run draws what the uninterrupted one does."""

    def __init__(self, factors: Sequence[float], seed: int, epoch: ReadEpoch) -> None:
        self._factors = tuple(factors)
        self._seed = seed
        self._epoch = epoch

    def __call__(self, waveform: Tensor, path: str) -> Tensor:
        if not self._factors:
            return waveform

        generator = example_generator(self._seed, self._epoch, path)

        factor = self._factors[int(torch.randint(len(self._factors), (), generator=generator))]

        if factor == 1.0:
            return waveform

        perturbed, _ = torchaudio.functional.speed(waveform, SAMPLE_RATE, factor)

        return perturbed


def _filter_by_length(asr_split: AsrSplit, options: AsrReadOptions) -> list[dict[str, Any]]:
    kept = [
        {
            "index": utterance.index,
            "path": utterance.path,
            "num_samples": utterance.num_samples,
            "transcript": utterance.transcript,
        }
        for utterance in asr_split.utterances
        if options.min_audio_len <= utterance.num_samples <= options.max_audio_len
    ]

    num_dropped = len(asr_split.utterances) - len(kept)

    if num_dropped > 0:
        log.info(
            "Dropped {} of {} utterances in {} with fewer than {} or more than {} samples (`min_audio_len`, `max_audio_len`).",
            num_dropped,
            len(asr_split.utterances),
            asr_split.manifest_file,
            options.min_audio_len,
            options.max_audio_len,
        )

    if not kept:
        raise DatasetError(
            f"All {len(asr_split.utterances)} utterances in {asr_split.manifest_file} lie outside "
            f"[{options.min_audio_len}, {options.max_audio_len}] samples; widen `min_audio_len`/`max_audio_len`."
        )

    return kept


@final
class _AsrBatchCollater:
    """Turns a bucket of decoded examples into a :class:`Seq2SeqBatch`, or ``None`` if
    none of its utterances can be used."""

    def __init__(
        self,
        manifest_file: Path,
        tracker: AudioReadTracker,
        encoder: TokenEncoder,
        pad_idx: int,
        normalize_audio: bool,
        speed: _SpeedPerturbation,
    ) -> None:
        self._manifest_file = manifest_file
        self._tracker = tracker
        self._encoder = encoder
        self._normalize_audio = normalize_audio
        self._speed = speed
        self._audio_collater = Collater(pad_value=0)
        self._target_collater = Collater(pad_value=pad_idx)

    def __call__(self, bucket: Sequence[dict[str, Any]]) -> Seq2SeqBatch | None:
        bucket, waveforms = load_waveforms(bucket, self._tracker, normalize=self._normalize_audio)

        if not bucket:
            return None

        paths = [str(example["path"]["path"]) for example in bucket]

        waveforms = [self._speed(waveform, path) for waveform, path in zip(waveforms, paths, strict=True)]

        targets = [self._encode(example) for example in bucket]

        sources = self._audio_collater(waveforms)
        target_batch = self._target_collater(targets)

        example = {
            "indices": [int(example["index"]) for example in bucket],
            "ids": [Path(path).stem for path in paths],
            "transcripts": [str(example["transcript"]) for example in bucket],
            "num_skipped": self._tracker.take_num_skipped(),
        }

        return Seq2SeqBatch(
            sources["seqs"],
            collated_seq_lens(sources),
            target_batch["seqs"],
            collated_seq_lens(target_batch),
            example=example,
        )

    def _encode(self, example: dict[str, Any]) -> Tensor:
        target = self._encoder(example["transcript"])

        if target.numel() == 0:
            raise DatasetError(
                f"The transcript of {example['path']['path']} in {self._manifest_file} encodes to no token; check its `.wrd` line."
            )

        return target


@dataclass(kw_only=True)
class AsrManifestDatasetConfig:
    manifest_dir: Path = field(default_factory=Path)
    """The directory holding a ``{split}.tsv`` and a ``{split}.wrd`` per split."""


def open_asr_manifest_dataset(config: AsrManifestDatasetConfig) -> AsrManifestDataset:
    return AsrManifestDataset(config.manifest_dir.expanduser().resolve())
