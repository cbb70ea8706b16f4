"""The ``dataset`` section of the pretraining recipe and the readers built from it."""

from __future__ import annotations

from dataclasses import dataclass

from fairseq2.composition import register_dataset_family
from fairseq2.datasets import DataReader, SequenceBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.recipe.config import DatasetSection
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.data.speech_dataset import (
    SPEECH_MANIFEST_DATASET_FAMILY,
    SpeechManifestDataset,
    SpeechManifestDatasetConfig,
    SpeechReadOptions,
    open_speech_manifest_dataset,
)


def register_speech_manifest_dataset(container: DependencyContainer) -> None:
    register_dataset_family(
        container,
        SPEECH_MANIFEST_DATASET_FAMILY,
        SpeechManifestDataset,
        SpeechManifestDatasetConfig,
        opener=open_speech_manifest_dataset,
    )


@dataclass(kw_only=True)
class SslDatasetSection(DatasetSection):
    """Where the manifests are (``config_overrides.manifest_dir``) and how they are read."""

    family: str | None = SPEECH_MANIFEST_DATASET_FAMILY

    train_split: str = "train"
    """Read from ``{manifest_dir}/{train_split}.tsv``."""

    valid_split: str | None = "valid"
    """Read from ``{manifest_dir}/{valid_split}.tsv``; ``None`` skips validation."""

    min_audio_len: int = 32_000
    """Utterances with fewer samples are dropped; the log says how many."""

    max_audio_len: int = 250_000
    """Longer utterances are randomly cropped to this many samples (validation
    crops keep their start), never dropped."""

    max_num_elements: int = 1_500_000
    """The number of audio samples per batch and rank, padding included."""

    num_seqs_multiple_of: int = 1

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

    def validate(self) -> ValidationResult:
        result = super().validate()

        if self.min_audio_len < 1:
            result.add_error("`min_audio_len` must be at least 1.")

        if self.max_audio_len < self.min_audio_len:
            result.add_error(
                f"`max_audio_len` must be at least `min_audio_len` ({self.min_audio_len}), but is {self.max_audio_len} instead."
            )

        if self.max_num_elements < self.max_audio_len:
            result.add_error(
                f"`max_num_elements` must be at least `max_audio_len` ({self.max_audio_len}), but is {self.max_num_elements} instead."
            )

        return result


def create_train_reader(
    dataset: SpeechManifestDataset, section: SslDatasetSection, gangs: Gangs, *, seed: int, num_accumulate: int
) -> DataReader[SequenceBatch]:
    options = SpeechReadOptions(
        min_audio_len=section.min_audio_len,
        max_audio_len=section.max_audio_len,
        max_num_elements=section.max_num_elements,
        num_seqs_multiple_of=section.num_seqs_multiple_of,
        crop="random",
        crop_to_batch_shortest=True,
        normalize_audio=section.normalize_audio,
        shuffle_window=section.shuffle_window,
        batch_shuffle_window=section.batch_shuffle_window,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        num_accumulate=num_accumulate,
        sync_mode=SyncMode.UNTIL_FIRST,
        seed=seed,
    )

    return dataset.create_reader(section.train_split, gangs, options)


def create_valid_reader(
    dataset: SpeechManifestDataset, section: SslDatasetSection, gangs: Gangs, *, seed: int
) -> DataReader[SequenceBatch]:
    """Reads the whole validation split in manifest order, each utterance cropped to its
    first ``max_audio_len`` samples and padded, so every validation sees the same audio."""
    if section.valid_split is None:
        raise ValueError("`section.valid_split` must not be `None`.")

    options = SpeechReadOptions(
        min_audio_len=section.min_audio_len,
        max_audio_len=section.max_audio_len,
        max_num_elements=section.max_num_elements,
        num_seqs_multiple_of=section.num_seqs_multiple_of,
        crop="start",
        crop_to_batch_shortest=False,
        normalize_audio=section.normalize_audio,
        shuffle_window=1,
        batch_shuffle_window=1,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        sync_mode=SyncMode.UNTIL_LAST,
        max_num_batches=section.max_num_valid_batches,
        seed=seed,
    )

    return dataset.create_reader(section.valid_split, gangs, options)
