"""The ``dataset`` section of the fine-tuning recipe and the readers built from it."""

from __future__ import annotations

from dataclasses import dataclass

from fairseq2.composition import register_dataset_family
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import DataReader, Seq2SeqBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.data.asr_dataset import (
    ASR_MANIFEST_DATASET_FAMILY,
    AsrManifestDataset,
    AsrManifestDatasetConfig,
    AsrReadOptions,
    open_asr_manifest_dataset,
)
from w2v_knnvq.data.manifest_dataset import ManifestDatasetSection


def register_asr_manifest_dataset(container: DependencyContainer) -> None:
    register_dataset_family(
        container,
        ASR_MANIFEST_DATASET_FAMILY,
        AsrManifestDataset,
        AsrManifestDatasetConfig,
        opener=open_asr_manifest_dataset,
    )


@dataclass(kw_only=True)
class AsrDatasetSection(ManifestDatasetSection):
    """Where the manifests are (``config_overrides.manifest_dir``) and how they are read.

    Each split also needs its ``{split}.wrd`` transcripts; those of ``train_split`` train
    the tokenizer when none is given. ``normalize_audio`` must match pretraining; the
    recipe refuses to start when the pretraining run's ``config.yaml`` says otherwise.
    """

    family: str | None = ASR_MANIFEST_DATASET_FAMILY

    min_audio_len: int = 1

    max_audio_len: int = 640_000
    """Longer training utterances are dropped (40 s at 16 kHz keeps all of LibriSpeech)."""

    max_num_elements: int = 3_200_000


def create_train_reader(
    dataset: AsrManifestDataset,
    section: AsrDatasetSection,
    tokenizer: Tokenizer,
    gangs: Gangs,
    *,
    seed: int,
    num_accumulate: int,
) -> DataReader[Seq2SeqBatch]:
    options = AsrReadOptions(
        min_audio_len=section.min_audio_len,
        max_audio_len=section.max_audio_len,
        max_num_elements=section.max_num_elements,
        normalize_audio=section.normalize_audio,
        shuffle_window=section.shuffle_window,
        batch_shuffle_window=section.batch_shuffle_window,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        num_accumulate=num_accumulate,
        sync_mode=SyncMode.UNTIL_FIRST,
        seed=seed,
    )

    return dataset.create_reader(section.train_split, tokenizer, gangs, options)


def create_valid_reader(
    dataset: AsrManifestDataset, section: AsrDatasetSection, tokenizer: Tokenizer, gangs: Gangs, *, seed: int
) -> DataReader[Seq2SeqBatch]:
    """Reads the whole validation split in manifest order; no utterance is dropped for length."""
    if section.valid_split is None:
        raise ValueError("`section.valid_split` must not be `None`.")

    longest = max(utterance.num_samples for utterance in dataset.read_split(section.valid_split).utterances)

    options = AsrReadOptions(
        min_audio_len=1,
        max_audio_len=longest,
        max_num_elements=max(section.max_num_elements, longest),
        normalize_audio=section.normalize_audio,
        shuffle_window=1,
        batch_shuffle_window=1,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        sync_mode=SyncMode.UNTIL_LAST,
        max_num_batches=section.max_num_valid_batches,
        seed=seed,
    )

    return dataset.create_reader(section.valid_split, tokenizer, gangs, options)
