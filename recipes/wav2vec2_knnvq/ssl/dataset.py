"""The ``dataset`` section of the pretraining recipe and the readers built from it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fairseq2.composition import register_dataset_family
from fairseq2.datasets import DataReader, SequenceBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.data.manifest_dataset import ManifestDatasetSection, whole_split_options
from w2v_knnvq.data.speech_dataset import (
    SPEECH_MANIFEST_DATASET_FAMILY,
    SpeechManifestDataset,
    SpeechManifestDatasetConfig,
    SpeechReadOptions,
    open_speech_manifest_dataset,
)
from w2v_knnvq.wav2vec2.lengths import RECEPTIVE_FIELD


def register_speech_manifest_dataset(container: DependencyContainer) -> None:
    register_dataset_family(
        container,
        SPEECH_MANIFEST_DATASET_FAMILY,
        SpeechManifestDataset,
        SpeechManifestDatasetConfig,
        opener=open_speech_manifest_dataset,
    )


@dataclass(kw_only=True)
class SslDatasetSection(ManifestDatasetSection):
    """Where the manifests are (``config_overrides.manifest_dir``) and how they are read."""

    family: str | None = SPEECH_MANIFEST_DATASET_FAMILY

    min_audio_len: int = 32_000
    """Utterances with fewer samples are dropped (the log says how many), and a file that
    decodes to fewer is skipped as unusable audio. At least what the masker needs (the
    recipe checks it)."""

    max_audio_len: int = 250_000
    """Longer utterances are randomly cropped to this many samples, never dropped.
    The validation loss sees their first ``max_audio_len`` samples; validation usage
    counts them whole."""

    max_num_elements: int = 1_500_000

    num_seqs_multiple_of: int = 1


def create_train_reader(
    dataset: SpeechManifestDataset, section: SslDatasetSection, gangs: Gangs, *, seed: int, num_accumulate: int
) -> DataReader[SequenceBatch]:
    options = replace(
        _section_read_options(section, seed=seed),
        crop="random",
        crop_to_batch_shortest=True,
        shuffle_window=section.shuffle_window,
        batch_shuffle_window=section.batch_shuffle_window,
        num_accumulate=num_accumulate,
        sync_mode=SyncMode.UNTIL_FIRST,
    )

    return dataset.create_reader(section.train_split, gangs, options)


def create_valid_reader(
    dataset: SpeechManifestDataset, section: SslDatasetSection, gangs: Gangs, *, seed: int
) -> DataReader[SequenceBatch]:
    """Reads the whole validation split in manifest order, every utterance whole and padded,
    so that codebook usage counts every frame of the split (the validation loss crops; see
    :class:`~recipes.wav2vec2_knnvq.ssl.recipe.SslEvalUnit`)."""
    if section.valid_split is None:
        raise ValueError("`section.valid_split` must not be `None`.")

    options = replace(
        _section_read_options(section, seed=seed),
        min_audio_len=RECEPTIVE_FIELD,
        max_audio_len=None,
        crop="start",
        crop_to_batch_shortest=False,
    )

    options = whole_split_options(options, max_num_batches=section.max_num_valid_batches)

    return dataset.create_reader(section.valid_split, gangs, options)


def _section_read_options(section: SslDatasetSection, *, seed: int) -> SpeechReadOptions:
    """The options that training and validation both take from ``section``."""
    return SpeechReadOptions(
        min_audio_len=section.min_audio_len,
        max_audio_len=section.max_audio_len,
        max_num_elements=section.max_num_elements,
        num_seqs_multiple_of=section.num_seqs_multiple_of,
        normalize_audio=section.normalize_audio,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        max_bad_audio_fraction=section.max_bad_audio_fraction,
        seed=seed,
    )
