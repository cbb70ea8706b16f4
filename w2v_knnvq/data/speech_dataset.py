"""Unlabeled speech from fairseq-style manifests, batched for wav2vec 2.0 pretraining.

A split ``{split}.tsv`` holds the audio root directory on its first line (absolute, or
relative to the manifest's own directory), then one ``relative/path.flac<TAB>num_samples``
line per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, final

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq2.data.audio import AudioDecoder
from fairseq2.data.data_pipeline import (
    Collater,
    DataPipelineBuilder,
    FileMapper,
    create_bucket_sizes,
    read_sequence,
)
from fairseq2.datasets import DataPipelineReader, DataReader, DatasetError, SequenceBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.logging import log

from w2v_knnvq.data.manifest import ManifestError, read_manifest

SPEECH_MANIFEST_DATASET_FAMILY: Final = "speech_manifest"

SAMPLE_RATE: Final = 16_000

CropMode = Literal["random", "start"]


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance of a manifest."""

    path: str
    """The audio file, relative to the split's audio root directory."""

    num_samples: int


@dataclass(frozen=True)
class ManifestSplit:
    """A parsed ``{split}.tsv`` file."""

    manifest_file: Path

    audio_dir: Path

    entries: list[ManifestEntry]


def read_manifest_split(manifest_file: Path) -> ManifestSplit:
    """Parses ``manifest_file``; a relative audio root is taken relative to the file.

    :raises DatasetError: if the file is missing or malformed, its audio root does not
        exist, or it lists no utterance; the message names the file.
    """
    try:
        audio_dir, rows = read_manifest(manifest_file)
    except ManifestError as ex:
        raise DatasetError(f"Manifest {manifest_file} cannot be read: {ex}") from ex

    if not audio_dir.is_absolute():
        audio_dir = manifest_file.parent / audio_dir

    if not audio_dir.is_dir():
        raise DatasetError(
            f"Audio root directory {audio_dir} named on line 1 of {manifest_file} does not exist."
        )

    if not rows:
        raise DatasetError(f"Manifest {manifest_file} lists no utterances; the split is empty.")

    entries = [ManifestEntry(path, num_samples) for path, num_samples in rows]

    return ManifestSplit(manifest_file, audio_dir, entries)


@dataclass(kw_only=True)
class SpeechReadOptions:
    """How a split is cropped, batched and read."""

    min_audio_len: int = 32_000
    """Utterances with fewer samples are dropped (and counted in the log)."""

    max_audio_len: int = 250_000
    """Longer utterances are cropped to this many samples, never dropped."""

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

    normalize_audio: bool = False
    """Standardize each utterance to zero mean and unit variance before cropping."""

    shuffle_window: int = 0
    """Window of the utterance shuffle; 0 shuffles the whole split, 1 keeps its order."""

    batch_shuffle_window: int = 1
    """Window of the batch shuffle; 0 shuffles all batches, 1 keeps their order."""

    num_parallel_calls: int = 4

    num_prefetch: int = 4

    num_accumulate: int = 1

    sync_mode: SyncMode = SyncMode.UNTIL_FIRST

    max_num_batches: int | None = None

    seed: int = 2


@final
class SpeechManifestDataset:
    """The splits of a manifest directory."""

    _manifest_dir: Path

    def __init__(self, manifest_dir: Path) -> None:
        if not manifest_dir.is_dir():
            raise DatasetError(
                f"Manifest directory {manifest_dir} does not exist; it must hold one `{{split}}.tsv` file per split."
            )

        self._manifest_dir = manifest_dir

    def manifest_file(self, split: str) -> Path:
        return self._manifest_dir / f"{split}.tsv"

    def read_split(self, split: str) -> ManifestSplit:
        return read_manifest_split(self.manifest_file(split))

    def create_reader(
        self, split: str, gangs: Gangs, options: SpeechReadOptions
    ) -> DataReader[SequenceBatch]:
        """Returns a reader of :class:`SequenceBatch` holding float32 waveforms of
        shape ``(N, S)``, sharded over the data-parallel gang ``gangs.dp``."""
        manifest = self.read_split(split)

        entries = _drop_short(manifest, options.min_audio_len)

        builder = read_sequence(entries)

        if options.shuffle_window != 1:
            builder.shuffle(options.shuffle_window, options.seed)

        if gangs.dp.size > 1:
            builder.shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)

        # Every rank crops differently.
        seed = options.seed + 1 + gangs.dp.rank

        _add_length_batching(builder, options)

        if options.batch_shuffle_window != 1:
            builder.shuffle(options.batch_shuffle_window, seed)

        file_mapper = FileMapper(manifest.audio_dir, cached_fd_count=100)

        builder.map(file_mapper, selector="[*].path")

        decoder = AudioDecoder(dtype=torch.float32)

        builder.map(
            decoder, selector="[*].path.data", num_parallel_calls=options.num_parallel_calls
        )

        builder.map(_WaveformCropper(manifest.manifest_file, options, seed))

        if options.max_num_batches is not None:
            builder.take(options.max_num_batches)

        builder.prefetch(options.num_prefetch)

        pipeline = builder.and_return()

        return DataPipelineReader[SequenceBatch](
            pipeline,
            gangs,
            num_accumulate=options.num_accumulate,
            sync_mode=options.sync_mode,
        )


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
            num_dropped, len(manifest.entries), manifest.manifest_file, min_audio_len,  # fmt: skip
        )

    if not entries:
        raise DatasetError(
            f"All {len(manifest.entries)} utterances in {manifest.manifest_file} are shorter "
            f"than `min_audio_len` ({min_audio_len} samples); lower it."
        )

    return entries


def _add_length_batching(builder: DataPipelineBuilder, options: SpeechReadOptions) -> None:
    max_audio_len = options.max_audio_len

    if options.max_num_elements < max_audio_len:
        raise ValueError(
            f"`max_num_elements` ({options.max_num_elements}) must be at least `max_audio_len` ({max_audio_len})."
        )

    # `create_bucket_sizes` needs a multiple of the longest sequence.
    max_num_elements = options.max_num_elements - options.max_num_elements % max_audio_len

    bucket_sizes = create_bucket_sizes(
        max_num_elements=max_num_elements,
        max_seq_len=max_audio_len,
        min_seq_len=options.min_audio_len,
        num_seqs_multiple_of=options.num_seqs_multiple_of,
    )

    # Long utterances are bucketed at their cropped length, so none is dropped.
    def use_cropped_len(example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "num_samples": min(int(example["num_samples"]), max_audio_len)}

    builder.map(use_cropped_len)

    builder.bucket_by_length(
        bucket_sizes,
        selector="num_samples",
        min_data_len=options.min_audio_len,
        skip_below_min_examples=True,
        skip_above_max_examples=True,
    )


@final
class _WaveformCropper:
    """Turns a bucket of decoded examples into a :class:`SequenceBatch`."""

    def __init__(self, manifest_file: Path, options: SpeechReadOptions, seed: int) -> None:
        self._manifest_file = manifest_file
        self._options = options
        self._generator = torch.Generator().manual_seed(seed)
        self._collater = Collater(pad_value=0)

    def __call__(self, bucket: list[dict[str, Any]]) -> SequenceBatch:
        waveforms = [self._check(example) for example in bucket]

        if self._options.normalize_audio:
            waveforms = [F.layer_norm(w, w.shape) for w in waveforms]

        crop_len = self._options.max_audio_len

        if self._options.crop_to_batch_shortest:
            crop_len = min(crop_len, min(len(w) for w in waveforms))

        waveforms = [self._crop(w, crop_len) for w in waveforms]

        collated = self._collater(waveforms)

        seqs: Tensor = collated["seqs"]

        seq_lens = [int(n) for n in collated["seq_lens"]] if collated["is_ragged"] else None

        paths = [str(example["path"]["path"]) for example in bucket]

        return SequenceBatch(seqs, seq_lens, example={"paths": paths})

    def _check(self, example: dict[str, Any]) -> Tensor:
        audio = example["path"]
        decoded = audio["data"]
        path = Path(audio["path"])

        if decoded["sample_rate"] != SAMPLE_RATE:
            raise DatasetError(
                f"{path} listed in {self._manifest_file} is sampled at "
                f"{decoded['sample_rate']:g} Hz, expected {SAMPLE_RATE} Hz; resample it."
            )

        waveform: Tensor = decoded["waveform"]

        if waveform.ndim == 2:
            if waveform.size(1) != 1:
                raise DatasetError(
                    f"{path} listed in {self._manifest_file} has {waveform.size(1)} channels, expected mono; downmix it."
                )

            waveform = waveform.squeeze(1)

        if not torch.isfinite(waveform).all():
            raise DatasetError(f"{path} listed in {self._manifest_file} contains NaN or infinite samples.")

        return waveform

    def _crop(self, waveform: Tensor, crop_len: int) -> Tensor:
        excess = len(waveform) - crop_len
        if excess <= 0:
            return waveform

        if self._options.crop == "start":
            start = 0
        else:
            start = int(torch.randint(0, excess + 1, (), generator=self._generator))

        return waveform[start : start + crop_len]


@dataclass(kw_only=True)
class SpeechManifestDatasetConfig:
    manifest_dir: Path = field(default_factory=Path)
    """The directory holding one ``{split}.tsv`` manifest per split."""


def open_speech_manifest_dataset(config: SpeechManifestDatasetConfig) -> SpeechManifestDataset:
    return SpeechManifestDataset(config.manifest_dir.expanduser().resolve())
