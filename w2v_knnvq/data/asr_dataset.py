"""Transcribed speech from fairseq-style manifests, batched for CTC fine-tuning.

A split is a ``{split}.tsv`` manifest (see :mod:`w2v_knnvq.data.speech_dataset`) and a
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
import torch.nn.functional as F
from torch import Tensor

from fairseq2.data.audio import AudioDecoder
from fairseq2.data.data_pipeline import Collater, FileMapper, create_bucket_sizes, read_sequence
from fairseq2.data.tokenizers import TokenEncoder, Tokenizer
from fairseq2.datasets import DataPipelineReader, DataReader, DatasetError, Seq2SeqBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.logging import log

from w2v_knnvq.data.manifest import ManifestError, read_transcripts
from w2v_knnvq.data.speech_dataset import SAMPLE_RATE, read_manifest_split

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
class AsrReadOptions:
    """How a split is filtered, batched and read."""

    min_audio_len: int = 1
    """Utterances with fewer samples are dropped (and counted in the log)."""

    max_audio_len: int = 640_000
    """Utterances with more samples are dropped (and counted in the log)."""

    max_num_elements: int = 3_200_000
    """Upper bound on the number of audio samples in a batch, padding included."""

    normalize_audio: bool = False
    """Standardize each utterance to zero mean and unit variance."""

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
class AsrManifestDataset:
    """The transcribed splits of a manifest directory."""

    _manifest_dir: Path

    def __init__(self, manifest_dir: Path) -> None:
        if not manifest_dir.is_dir():
            raise DatasetError(
                f"Manifest directory {manifest_dir} does not exist; it must hold a `{{split}}.tsv` "
                "and a `{split}.wrd` file per split (tools/make_manifest.py writes both)."
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
            transcripts = read_transcripts(self.transcript_file(split), manifest_path=manifest.manifest_file)
        except ManifestError as ex:
            raise DatasetError(f"Transcripts of split `{split}` cannot be read: {ex}") from ex

        utterances = [
            AsrUtterance(index, entry.path, entry.num_samples, " ".join(transcript.split()))
            for index, (entry, transcript) in enumerate(zip(manifest.entries, transcripts))
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
        asr_split = self.read_split(split)

        utterances = _filter_by_length(asr_split, options)

        builder = read_sequence(utterances)

        if options.shuffle_window != 1:
            builder.shuffle(options.shuffle_window, options.seed)

        if gangs.dp.size > 1:
            builder.shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)

        # `create_bucket_sizes` needs a multiple of the longest sequence.
        max_num_elements = options.max_num_elements - options.max_num_elements % options.max_audio_len

        bucket_sizes = create_bucket_sizes(
            max_num_elements=max_num_elements,
            max_seq_len=options.max_audio_len,
            min_seq_len=options.min_audio_len,
        )

        builder.bucket_by_length(
            bucket_sizes,
            selector="num_samples",
            min_data_len=options.min_audio_len,
            skip_below_min_examples=True,
            skip_above_max_examples=True,
        )

        if options.batch_shuffle_window != 1:
            builder.shuffle(options.batch_shuffle_window, options.seed + 1 + gangs.dp.rank)

        builder.map(FileMapper(asr_split.audio_dir, cached_fd_count=100), selector="[*].path")

        builder.map(
            AudioDecoder(dtype=torch.float32),
            selector="[*].path.data",
            num_parallel_calls=options.num_parallel_calls,
        )

        pad_idx = tokenizer.vocab_info.pad_idx

        if pad_idx is None:
            raise ValueError("The tokenizer must have a padding id to pad target batches.")

        builder.map(
            _AsrBatchCollater(asr_split.manifest_file, tokenizer.create_encoder(), pad_idx, options.normalize_audio)
        )

        if options.max_num_batches is not None:
            builder.take(options.max_num_batches)

        builder.prefetch(options.num_prefetch)

        return DataPipelineReader[Seq2SeqBatch](
            builder.and_return(),
            gangs,
            num_accumulate=options.num_accumulate,
            sync_mode=options.sync_mode,
        )


def _filter_by_length(asr_split: AsrSplit, options: AsrReadOptions) -> list[dict[str, Any]]:
    if options.max_num_elements < options.max_audio_len:
        raise ValueError(
            f"`max_num_elements` ({options.max_num_elements}) must be at least `max_audio_len` ({options.max_audio_len})."
        )

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
            num_dropped, len(asr_split.utterances), asr_split.manifest_file, options.min_audio_len, options.max_audio_len,  # fmt: skip
        )

    if not kept:
        raise DatasetError(
            f"All {len(asr_split.utterances)} utterances in {asr_split.manifest_file} lie outside "
            f"[{options.min_audio_len}, {options.max_audio_len}] samples; widen `min_audio_len`/`max_audio_len`."
        )

    return kept


@final
class _AsrBatchCollater:
    """Turns a bucket of decoded examples into a :class:`Seq2SeqBatch`."""

    def __init__(self, manifest_file: Path, encoder: TokenEncoder, pad_idx: int, normalize_audio: bool) -> None:
        self._manifest_file = manifest_file
        self._encoder = encoder
        self._normalize_audio = normalize_audio
        self._audio_collater = Collater(pad_value=0)
        self._target_collater = Collater(pad_value=pad_idx)

    def __call__(self, bucket: Sequence[dict[str, Any]]) -> Seq2SeqBatch:
        waveforms = [check_waveform(example["path"], self._manifest_file) for example in bucket]

        if self._normalize_audio:
            waveforms = [F.layer_norm(w, w.shape) for w in waveforms]

        targets = [self._encode(example) for example in bucket]

        sources = self._audio_collater(waveforms)
        target_batch = self._target_collater(targets)

        example = {
            "indices": [int(example["index"]) for example in bucket],
            "ids": [Path(example["path"]["path"]).stem for example in bucket],
            "transcripts": [str(example["transcript"]) for example in bucket],
        }

        return Seq2SeqBatch(
            sources["seqs"],
            _seq_lens(sources),
            target_batch["seqs"],
            _seq_lens(target_batch),
            example=example,
        )

    def _encode(self, example: dict[str, Any]) -> Tensor:
        target = self._encoder(example["transcript"])

        if target.numel() == 0:
            raise DatasetError(
                f"The transcript of {example['path']['path']} in {self._manifest_file} encodes to no token; check its `.wrd` line."
            )

        return target


def _seq_lens(collated: dict[str, Any]) -> list[int] | None:
    return [int(n) for n in collated["seq_lens"]] if collated["is_ragged"] else None


def check_waveform(audio: dict[str, Any], manifest_file: Path) -> Tensor:
    """Checks a decoded utterance and returns its samples.

    :param audio: The output of ``FileMapper`` followed by ``AudioDecoder``.
    :returns: *Shape:* ``(S_wav,)``.
    :raises DatasetError: if the audio is not 16 kHz mono or holds NaN or infinite
        samples; the message names the file and the manifest.
    """
    decoded = audio["data"]
    path = Path(audio["path"])

    if decoded["sample_rate"] != SAMPLE_RATE:
        raise DatasetError(
            f"{path} listed in {manifest_file} is sampled at {decoded['sample_rate']:g} Hz, "
            f"expected {SAMPLE_RATE} Hz; resample it."
        )

    waveform: Tensor = decoded["waveform"]

    if waveform.ndim == 2:
        if waveform.size(1) != 1:
            raise DatasetError(
                f"{path} listed in {manifest_file} has {waveform.size(1)} channels, expected mono; downmix it."
            )

        waveform = waveform.squeeze(1)

    if not torch.isfinite(waveform).all():
        raise DatasetError(f"{path} listed in {manifest_file} contains NaN or infinite samples.")

    return waveform


@dataclass(kw_only=True)
class AsrManifestDatasetConfig:
    manifest_dir: Path = field(default_factory=Path)
    """The directory holding a ``{split}.tsv`` and a ``{split}.wrd`` per split."""


def open_asr_manifest_dataset(config: AsrManifestDatasetConfig) -> AsrManifestDataset:
    return AsrManifestDataset(config.manifest_dir.expanduser().resolve())
