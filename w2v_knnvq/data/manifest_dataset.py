"""What the pretraining and the fine-tuning manifest datasets share.

A split ``{split}.tsv`` holds the audio root directory on its first line (absolute, or
relative to the manifest's own directory), then one ``relative/path.flac<TAB>num_samples``
line per utterance. This module parses it, holds the steps that both data pipelines take
(shuffle and shard, bucket by length, decode, check the audio, read batches), and the
part of the recipes' ``dataset`` section that both recipes have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, final

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from fairseq2.data.data_pipeline import (
    DataPipelineBuilder,
    create_bucket_sizes,
    read_sequence,
)
from fairseq2.datasets import DataPipelineReader, DataReader, DatasetError, SyncMode
from fairseq2.gang import Gangs
from fairseq2.recipe.config import DatasetSection
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.data.audio_reading import (
    DEFAULT_MAX_BAD_AUDIO_FRACTION,
    AudioLoader,
    AudioReadTracker,
    ReadEpoch,
    bad_audio_fraction_error,
)
from w2v_knnvq.data.manifest import ManifestError, read_manifest

BatchT = TypeVar("BatchT")


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
        raise DatasetError(f"Audio root directory {audio_dir} named on line 1 of {manifest_file} does not exist.")

    if not rows:
        raise DatasetError(f"Manifest {manifest_file} lists no utterances; the split is empty.")

    entries = [ManifestEntry(path, num_samples) for path, num_samples in rows]

    return ManifestSplit(manifest_file, audio_dir, entries)


def split_name_error(option: str, split: str) -> str | None:
    """The validation error of a split name ``option``, or ``None``: a split is
    ``{manifest_dir}/{split}.tsv``, so its name must stay inside the manifest directory (and
    outputs named after it inside the output directory)."""
    if not split or split in (".", "..") or "/" in split or "\\" in split or split != split.strip():
        return (
            f"`{option}` must be the name of a manifest in the manifest directory (no `/`, no `..`), "
            f"but is '{split}' instead."
        )

    return None


def check_manifest_dir(manifest_dir: Path, expected_files: str) -> None:
    """:param expected_files: What the directory must hold, for the error message.
    :raises DatasetError: if ``manifest_dir`` is not a directory."""
    if not manifest_dir.is_dir():
        raise DatasetError(f"Manifest directory {manifest_dir} does not exist; it must hold {expected_files}.")


@dataclass(kw_only=True)
class ManifestReadOptions:
    """How a split is shuffled, decoded and read; the other length limits are the subclasses'."""

    min_audio_len: int = 1
    """Utterances with fewer samples in their manifest entry are dropped (and counted in the
    log); a decoded file with fewer samples is skipped as unusable audio."""

    normalize_audio: bool = False
    """Standardize each utterance to zero mean and unit variance (before any cropping)."""

    shuffle_window: int = 0
    """Window of the utterance shuffle; 0 shuffles the whole split, 1 keeps its order."""

    batch_shuffle_window: int = 1
    """Window of the batch shuffle; 0 shuffles all batches, 1 keeps their order."""

    num_parallel_calls: int = 4

    num_prefetch: int = 4

    num_accumulate: int = 1

    sync_mode: SyncMode = SyncMode.UNTIL_FIRST

    max_num_batches: int | None = None

    max_bad_audio_fraction: float = DEFAULT_MAX_BAD_AUDIO_FRACTION
    """Unusable utterances are skipped with a warning until they pass this fraction of
    the reads (see :class:`~w2v_knnvq.data.audio_reading.AudioReadTracker`)."""

    seed: int = 2


ReadOptionsT = TypeVar("ReadOptionsT", bound=ManifestReadOptions)


def whole_split_options(options: ReadOptionsT, *, max_num_batches: int | None = None) -> ReadOptionsT:
    """``options`` for reading a whole split for evaluation: manifest order, no shuffling,
    every data-parallel rank to its last batch. The length limits stay the caller's.

    :param max_num_batches: Caps the batches per rank; ``None`` reads everything.
    """
    return replace(
        options,
        shuffle_window=1,
        batch_shuffle_window=1,
        num_accumulate=1,
        sync_mode=SyncMode.UNTIL_LAST,
        max_num_batches=max_num_batches,
    )


def read_examples(
    examples: Sequence[dict[str, Any]], gangs: Gangs, options: ManifestReadOptions
) -> DataPipelineBuilder:
    """Starts a pipeline over ``examples``, shuffled with ``options.seed`` (unless
    ``shuffle_window`` is 1), then sharded over the data-parallel gang ``gangs.dp``."""
    builder = read_sequence(examples)

    if options.shuffle_window != 1:
        builder.shuffle(options.shuffle_window, options.seed)

    if gangs.dp.size > 1:
        builder.shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)

    return builder


def length_bucket_sizes(
    *, max_num_elements: int, max_audio_len: int, min_audio_len: int, num_seqs_multiple_of: int = 1
) -> list[tuple[int, int]]:
    """Returns ``(batch_size, num_samples)`` buckets of at most ``max_num_elements`` samples.

    :raises ValueError: if ``max_num_elements`` is less than ``max_audio_len``.
    """
    if max_num_elements < max_audio_len:
        raise ValueError(f"`max_num_elements` ({max_num_elements}) must be at least `max_audio_len` ({max_audio_len}).")

    # `create_bucket_sizes` needs a multiple of the longest sequence.
    max_num_elements -= max_num_elements % max_audio_len

    return create_bucket_sizes(
        max_num_elements=max_num_elements,
        max_seq_len=max_audio_len,
        min_seq_len=min_audio_len,
        num_seqs_multiple_of=num_seqs_multiple_of,
    )


def bucket_by_num_samples(
    builder: DataPipelineBuilder, bucket_sizes: list[tuple[int, int]], min_audio_len: int
) -> None:
    """Groups examples into buckets by their ``num_samples``; examples outside the
    buckets' lengths are skipped, so they must be filtered out beforehand."""
    builder.bucket_by_length(
        bucket_sizes,
        selector="num_samples",
        min_data_len=min_audio_len,
        skip_below_min_examples=True,
        skip_above_max_examples=True,
    )


def decode_audio(builder: DataPipelineBuilder, audio_dir: Path, num_parallel_calls: int) -> None:
    """Replaces the relative ``path`` of each example of a bucket with an
    :class:`~w2v_knnvq.data.audio_reading.AudioLoader` output: the checked float32
    samples, or why the file cannot be used; :func:`load_waveforms` sorts them."""
    builder.map(AudioLoader(audio_dir), selector="[*].path", num_parallel_calls=num_parallel_calls)


def load_waveforms(
    bucket: Sequence[dict[str, Any]], tracker: AudioReadTracker, *, normalize: bool
) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Drops the utterances of a bucket (see :func:`decode_audio`) that cannot be used,
    with a warning, and returns the others with their samples, each of shape ``(S_wav,)``,
    standardized if ``normalize``.

    :raises BadAudioBudgetError: if ``tracker`` has skipped too many utterances.
    """
    kept, waveforms = tracker.sort_bucket(bucket)

    if normalize:
        waveforms = [F.layer_norm(w, w.shape) for w in waveforms]

    return kept, waveforms


def collated_seq_lens(collated: dict[str, Any]) -> list[int] | None:
    """The sequence lengths of a ``Collater`` output; ``None`` if it holds no padding."""
    return [int(n) for n in collated["seq_lens"]] if collated["is_ragged"] else None


def create_read_tracker(
    manifest_file: Path, num_examples: int, gangs: Gangs, options: ManifestReadOptions
) -> AudioReadTracker:
    """The tracker of the utterances that a rank's reader skips.

    :param num_examples: The utterances of the split that the readers of all ranks read.
    """
    return AudioReadTracker(
        manifest_file,
        max_fraction=options.max_bad_audio_fraction,
        num_utterances=max(1, num_examples // gangs.dp.size),
        min_num_samples=options.min_audio_len,
    )


def create_pipeline_reader(
    builder: DataPipelineBuilder, gangs: Gangs, options: ManifestReadOptions, epoch: ReadEpoch
) -> ManifestReader[BatchT]:
    """Ends the pipeline (drops the buckets left with no usable utterance, caps the
    batches, prefetches) and returns a reader of its batches.

    :param epoch: What the pipeline's random draws read the data epoch from.
    """
    builder.filter(lambda batch: batch is not None)

    if options.max_num_batches is not None:
        builder.take(options.max_num_batches)

    builder.prefetch(options.num_prefetch)

    reader: DataPipelineReader[BatchT] = DataPipelineReader(
        builder.and_return(),
        gangs,
        num_accumulate=options.num_accumulate,
        sync_mode=options.sync_mode,
    )

    return ManifestReader(reader, epoch)


@final
class ManifestReader(DataReader[BatchT]):
    """fairseq2's pipeline reader, plus the data epoch in its state: the random crops of a
    resumed run are those of the uninterrupted one."""

    def __init__(self, reader: DataPipelineReader[BatchT], epoch: ReadEpoch) -> None:
        self._reader = reader
        self._epoch = epoch

    @override
    def __iter__(self) -> ManifestReader[BatchT]:
        return self

    @override
    def __next__(self) -> list[BatchT]:
        return next(self._reader)

    @override
    def reset(self) -> None:
        # Before the pipeline restarts, so that no draw of the new epoch sees the old one.
        self._epoch.value += 1

        self._reader.reset()

    @override
    def state_dict(self) -> dict[str, object]:
        return {"pipeline": self._reader.state_dict(), "epoch": self._epoch.value}

    @override
    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        pipeline_state, epoch = state_dict.get("pipeline"), state_dict.get("epoch")

        if not isinstance(pipeline_state, dict) or not isinstance(epoch, int):
            raise ValueError(
                "`state_dict` must hold the `pipeline` state and the `epoch` of a manifest reader, but does not; "
                "the checkpoint was written by an older version of the readers."
            )

        self._epoch.value = epoch

        self._reader.load_state_dict(pipeline_state)

    @property
    @override
    def num_accumulate(self) -> int:
        return self._reader.num_accumulate


@dataclass(kw_only=True)
class ManifestDatasetSection(DatasetSection):
    """The ``dataset`` section of a recipe that reads a manifest directory
    (``config_overrides.manifest_dir``); the subclasses set the length defaults."""

    train_split: str = "train"
    """Read from ``{manifest_dir}/{train_split}.tsv``."""

    valid_split: str | None = "valid"
    """Read from ``{manifest_dir}/{valid_split}.tsv``; ``None`` skips validation."""

    min_audio_len: int | None
    """Training utterances with fewer samples are dropped (the log says how many), and a
    file that decodes to fewer is skipped as unusable audio; ``None`` takes the fewest
    that the model's CNN and temporal masker need."""

    max_audio_len: int

    max_num_elements: int
    """The number of audio samples per batch and rank, padding included."""

    normalize_audio: bool = False
    """Standardize each utterance to zero mean and unit variance."""

    shuffle_window: int = 0
    """0 shuffles the whole training split; 1 keeps its order."""

    batch_shuffle_window: int = 0
    """0 shuffles all training batches; 1 keeps their order."""

    num_parallel_calls: int = 4
    """The number of utterances decoded in parallel."""

    num_prefetch: int = 4

    max_num_valid_batches: int | None = None
    """Caps the validation batches per rank (``None`` reads the whole split)."""

    max_bad_audio_fraction: float = DEFAULT_MAX_BAD_AUDIO_FRACTION
    """A file that vanished or cannot be decoded is skipped with a warning and counted in
    the metrics; the run stops, naming the files, once the skips pass this fraction of the
    utterances read (or of the split, early in an epoch)."""

    def validate(self) -> ValidationResult:
        result = super().validate()

        for option, split in (("train_split", self.train_split), ("valid_split", self.valid_split)):
            if split is not None and (error := split_name_error(option, split)) is not None:
                result.add_error(error)

        if self.min_audio_len is not None and self.min_audio_len < 1:
            result.add_error(f"`min_audio_len` must be at least 1, but is {self.min_audio_len} instead.")

        if self.min_audio_len is not None and self.max_audio_len < self.min_audio_len:
            result.add_error(
                f"`max_audio_len` must be at least `min_audio_len` ({self.min_audio_len}), but is {self.max_audio_len} instead."
            )

        if (error := bad_audio_fraction_error(self.max_bad_audio_fraction)) is not None:
            result.add_error(error)

        if self.max_num_elements < self.max_audio_len:
            result.add_error(
                f"`max_num_elements` must be at least `max_audio_len` ({self.max_audio_len}), but is {self.max_num_elements} instead."
            )

        return result
