"""Unlabeled speech from fairseq-style manifests, batched for wav2vec 2.0 pretraining.

A split is a ``{split}.tsv`` manifest (see :mod:`w2v_knnvq.data.manifest_dataset`).
Utterances longer than ``max_audio_len`` are cropped, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, cast, final

import torch
from torch import Tensor

from fairseq2.data.data_pipeline import Collater, DataPipelineBuilder
from fairseq2.datasets import DataReader, DatasetError, SequenceBatch
from fairseq2.gang import Gangs
from fairseq2.logging import log

from w2v_knnvq.data.audio_reading import AudioReadTracker, ReadEpoch, example_generator
from w2v_knnvq.data.manifest_dataset import (
    ManifestReadOptions,
    ManifestSplit,
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

SPEECH_MANIFEST_DATASET_FAMILY: Final = "speech_manifest"

CropMode = Literal["random", "start"]


@dataclass(kw_only=True)
class SpeechReadOptions(ManifestReadOptions):
    """How a split is cropped, batched and read."""

    min_audio_len: int = 32_000

    max_audio_len: int | None = 250_000
    """Longer utterances are cropped to this many samples, never dropped. ``None`` reads
    every utterance whole (``max_num_elements`` then grows to the longest if needed)."""

    max_num_elements: int = 1_500_000
    """Upper bound on the number of audio samples in a batch, padding included."""

    num_seqs_multiple_of: int = 1
    """Batch sizes are rounded down to a multiple of this value where possible."""

    crop: CropMode = "random"
    """``random``: a uniformly drawn window (training). ``start``: the first
    ``max_audio_len`` samples, so that repeated reads see the same audio (validation)."""

    crop_to_batch_shortest: bool = True
    """Crop every utterance of a batch to the batch's shortest one, as wav2vec 2.0
    does, so batches carry no padding. If ``False``, batches are padded instead."""


@final
class SpeechManifestDataset:
    """The splits of a manifest directory."""

    _manifest_dir: Path

    def __init__(self, manifest_dir: Path) -> None:
        check_manifest_dir(manifest_dir, "one `{split}.tsv` file per split")

        self._manifest_dir = manifest_dir

    def manifest_file(self, split: str) -> Path:
        return self._manifest_dir / f"{split}.tsv"

    def read_split(self, split: str) -> ManifestSplit:
        return read_manifest_split(self.manifest_file(split))

    def create_reader(self, split: str, gangs: Gangs, options: SpeechReadOptions) -> DataReader[SequenceBatch]:
        """Returns a reader of :class:`SequenceBatch` holding float32 waveforms of
        shape ``(N, S)``, sharded over the data-parallel gang ``gangs.dp``.

        ``batch.example`` holds the ``paths`` of the utterances and ``num_skipped``, the
        utterances skipped since the previous batch because their audio could not be used.
        """
        manifest = self.read_split(split)

        builder, options, max_audio_len, num_examples = self._bucketed_examples(manifest, gangs, options)

        # Every rank crops differently.
        seed = options.seed + 1 + gangs.dp.rank

        if options.batch_shuffle_window != 1:
            builder.shuffle(options.batch_shuffle_window, seed)

        decode_audio(builder, manifest.audio_dir, options.num_parallel_calls)

        tracker = create_read_tracker(manifest.manifest_file, num_examples, gangs, options)

        epoch = ReadEpoch()

        builder.map(_WaveformCropper(tracker, options, max_audio_len, seed, epoch))

        return create_pipeline_reader(builder, gangs, options, epoch)

    def batch_sizes(self, split: str, gangs: Gangs, options: SpeechReadOptions) -> list[int]:
        """The number of utterances in each batch of one epoch of this rank, as
        :meth:`create_reader` makes them, without reading any audio."""
        builder, _, _, _ = self._bucketed_examples(self.read_split(split), gangs, options)

        return [len(bucket) for bucket in builder.and_return()]

    @staticmethod
    def _bucketed_examples(
        manifest: ManifestSplit, gangs: Gangs, options: SpeechReadOptions
    ) -> tuple[DataPipelineBuilder, SpeechReadOptions, int, int]:
        """Shuffles, shards and buckets the manifest's entries.

        :returns: The pipeline, ``options`` with their final ``max_num_elements``, the
            crop length, and the number of entries long enough to be read.
        """
        entries = _drop_short(manifest, options.min_audio_len)

        max_audio_len = options.max_audio_len

        if max_audio_len is None:
            max_audio_len = max(int(entry["num_samples"]) for entry in entries)

            options = replace(options, max_num_elements=max(options.max_num_elements, max_audio_len))

        bucket_sizes = length_bucket_sizes(
            max_num_elements=options.max_num_elements,
            max_audio_len=max_audio_len,
            min_audio_len=options.min_audio_len,
            num_seqs_multiple_of=options.num_seqs_multiple_of,
        )

        builder = read_examples(entries, gangs, options)

        _bucket_at_cropped_len(builder, bucket_sizes, options.min_audio_len, max_audio_len)

        return builder, options, max_audio_len, len(entries)


def _drop_short(manifest: ManifestSplit, min_audio_len: int) -> list[dict[str, Any]]:
    entries = []

    num_dropped = 0

    for entry in manifest.entries:
        if entry.num_samples < min_audio_len:
            num_dropped += 1
        else:
            entries.append({"path": entry.path, "num_samples": entry.num_samples})

    if num_dropped > 0:
        log.info(
            "Dropped {} of {} utterances in {} with fewer than {} samples (`min_audio_len`).",
            num_dropped,
            len(manifest.entries),
            manifest.manifest_file,
            min_audio_len,
        )

    if not entries:
        raise DatasetError(
            f"All {len(manifest.entries)} utterances in {manifest.manifest_file} are shorter "
            f"than `min_audio_len` ({min_audio_len} samples); lower it."
        )

    return entries


def _bucket_at_cropped_len(
    builder: DataPipelineBuilder, bucket_sizes: list[tuple[int, int]], min_audio_len: int, max_audio_len: int
) -> None:
    # Long utterances are bucketed at their cropped length, so none is dropped.
    def use_cropped_len(example: dict[str, Any]) -> dict[str, Any]:
        num_samples = int(example["num_samples"])

        return {**example, "num_samples": min(num_samples, max_audio_len), "manifest_num_samples": num_samples}

    builder.map(use_cropped_len)

    bucket_by_num_samples(builder, bucket_sizes, min_audio_len)


def crop_to_start(batch: SequenceBatch, max_audio_len: int, *, min_audio_len: int = 0) -> SequenceBatch | None:
    """Cuts each utterance of ``batch`` to its first ``max_audio_len`` samples: the
    reproducible crop of validation (``crop="start"``) and of the loss an evaluation reports.

    :param batch: ``(N, S_wav)`` zero-padded waveforms and their lengths.
    :param min_audio_len: Utterances shorter than this are left out.
    :returns: ``(N', S')`` with ``S'`` the longest cropped length; ``None`` if no utterance
        is long enough. The result carries no ``example``.
    """
    seq_lens = batch.seq_lens

    rows = [row for row, seq_len in enumerate(seq_lens) if seq_len >= min_audio_len]
    if not rows:
        return None

    cropped_lens = [min(seq_lens[row], max_audio_len) for row in rows]

    seqs = batch.seqs[rows, : max(cropped_lens)]

    return SequenceBatch(seqs, cropped_lens)


@final
class _WaveformCropper:
    """Turns a bucket of decoded examples into a :class:`SequenceBatch`, or ``None`` if
    none of its utterances can be used.

    A random crop is drawn from the seed, the data epoch and the utterance's path, so that
    it does not depend on how far the pipeline ran ahead of the trainer.
    """

    def __init__(
        self, tracker: AudioReadTracker, options: SpeechReadOptions, max_audio_len: int, seed: int, epoch: ReadEpoch
    ) -> None:
        self._tracker = tracker
        self._options = options
        self._max_audio_len = max_audio_len
        self._seed = seed
        self._epoch = epoch
        self._collater = Collater(pad_value=0)

    def __call__(self, bucket: list[dict[str, Any]]) -> SequenceBatch | None:
        kept, waveforms = load_waveforms(bucket, self._tracker, normalize=self._options.normalize_audio)

        if not kept:
            return None

        paths = [str(example["path"]["path"]) for example in kept]

        crop_len = self._max_audio_len

        if self._options.crop_to_batch_shortest:
            crop_len = min(crop_len, min(len(w) for w in waveforms))

        if self._options.crop == "random":
            waveforms = [self._crop_randomly(w, crop_len, path) for w, path in zip(waveforms, paths, strict=True)]

        collated = self._collater(waveforms)

        seqs: Tensor = collated["seqs"]

        batch = SequenceBatch(seqs, collated_seq_lens(collated))

        if self._options.crop == "start":
            # Every utterance is kept (no `min_audio_len`), so the batch is never `None`.
            batch = cast(SequenceBatch, crop_to_start(batch, crop_len))

        example = {"paths": paths, "num_skipped": self._tracker.take_num_skipped()}

        return SequenceBatch(batch.seqs, list(batch.seq_lens), example=example)

    def _crop_randomly(self, waveform: Tensor, crop_len: int, path: str) -> Tensor:
        excess = len(waveform) - crop_len
        if excess <= 0:
            return waveform

        generator = example_generator(self._seed, self._epoch, path)

        start = int(torch.randint(0, excess + 1, (), generator=generator))

        return waveform[start : start + crop_len]


@dataclass(kw_only=True)
class SpeechManifestDatasetConfig:
    manifest_dir: Path = field(default_factory=Path)
    """The directory holding one ``{split}.tsv`` manifest per split."""


def open_speech_manifest_dataset(config: SpeechManifestDatasetConfig) -> SpeechManifestDataset:
    return SpeechManifestDataset(config.manifest_dir.expanduser().resolve())
