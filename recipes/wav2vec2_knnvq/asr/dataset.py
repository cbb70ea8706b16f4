"""The ``dataset`` section of the fine-tuning recipe and the readers built from it.

The evaluation recipe reads its split with :func:`create_valid_reader` too, so that its
figures agree with validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import cast

from fairseq2.composition import register_dataset_family
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import DataReader, Seq2SeqBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.data.asr_dataset import (
    ASR_MANIFEST_DATASET_FAMILY,
    AsrManifestDataset,
    AsrManifestDatasetConfig,
    AsrReadOptions,
    check_speed_factors,
    open_asr_manifest_dataset,
)
from w2v_knnvq.data.manifest_dataset import ManifestDatasetSection, whole_split_options
from w2v_knnvq.wav2vec2.lengths import RECEPTIVE_FIELD


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

    min_audio_len: int | None = None

    max_audio_len: int = 640_000
    """Longer training utterances are dropped (40 s at 16 kHz keeps all of LibriSpeech)."""

    max_num_elements: int = 3_200_000

    speed_perturbation: list[float] | None = None
    """Training utterances are played at a speed drawn from these factors, afresh each epoch
    (e.g. ``[0.9, 1.0, 1.1]``, Kaldi's speed perturbation: tempo and pitch change together);
    ``None`` leaves them as they are. Validation and evaluation read the audio unchanged. A
    factor below 1 lengthens a batch beyond ``max_num_elements`` by up to its inverse."""

    def validate(self) -> ValidationResult:
        result = super().validate()

        try:
            check_speed_factors(self.speed_perturbation or (), "dataset.speed_perturbation")
        except ValueError as ex:
            result.add_error(str(ex))

        return result


def create_train_reader(
    dataset: AsrManifestDataset,
    section: AsrDatasetSection,
    tokenizer: Tokenizer,
    gangs: Gangs,
    *,
    min_audio_len: int,
    seed: int,
    num_accumulate: int,
) -> DataReader[Seq2SeqBatch]:
    """:param min_audio_len: ``section.min_audio_len``, or what the model needs if it is ``None``."""
    options = replace(
        section_read_options(section, seed=seed),
        min_audio_len=min_audio_len,
        max_audio_len=section.max_audio_len,
        shuffle_window=section.shuffle_window,
        batch_shuffle_window=section.batch_shuffle_window,
        num_accumulate=num_accumulate,
        sync_mode=SyncMode.UNTIL_FIRST,
        speed_factors=tuple(section.speed_perturbation or ()),
    )

    return dataset.create_reader(section.train_split, tokenizer, gangs, options)


def section_read_options(section: AsrDatasetSection, *, seed: int) -> AsrReadOptions:
    """The options that training and validation both take from ``section``."""
    return AsrReadOptions(
        max_num_elements=section.max_num_elements,
        normalize_audio=section.normalize_audio,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        max_bad_audio_fraction=section.max_bad_audio_fraction,
        seed=seed,
    )


def create_valid_reader(
    dataset: AsrManifestDataset,
    split: str,
    tokenizer: Tokenizer,
    gangs: Gangs,
    options: AsrReadOptions,
    *,
    max_num_batches: int | None = None,
) -> DataReader[Seq2SeqBatch]:
    """Reads the whole ``split`` in manifest order, as validation and evaluation do; only
    utterances shorter than the CNN's receptive field are dropped (they give no frame).

    :param options: How the audio is decoded and batched; the length limits are widened
        to the split's longest utterance, which may exceed ``max_num_elements``.
    :param max_num_batches: Caps the batches per rank; ``None`` reads the whole split.
    """
    longest = max(utterance.num_samples for utterance in dataset.read_split(split).utterances)

    options = replace(
        options,
        min_audio_len=RECEPTIVE_FIELD,
        max_audio_len=longest,
        max_num_elements=max(options.max_num_elements, longest),
    )

    options = whole_split_options(options, max_num_batches=max_num_batches)

    return dataset.create_reader(split, tokenizer, gangs, options)


def batch_utterance_ids(batch: Seq2SeqBatch) -> list[str]:
    """The ids of the utterances of a batch (their audio file names without extension)."""
    return cast(list[str], _batch_example(batch)["ids"])


def batch_transcripts(batch: Seq2SeqBatch) -> list[str]:
    """The reference transcripts of the utterances of a batch, whitespace collapsed."""
    return cast(list[str], _batch_example(batch)["transcripts"])


def batch_manifest_indices(batch: Seq2SeqBatch) -> list[int]:
    """The positions of the utterances of a batch in their manifest."""
    return cast(list[int], _batch_example(batch)["indices"])


def _batch_example(batch: Seq2SeqBatch) -> Mapping[str, object]:
    # Set by the collater of `AsrManifestDataset.create_reader`.
    return cast(Mapping[str, object], batch.example)
