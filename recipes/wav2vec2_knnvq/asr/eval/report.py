"""The transcriptions of an evaluated split and the files they are written to.

Written to the output directory:

- ``{split}.hyp.txt`` and ``{split}.ref.txt``: one transcript per line, in manifest order;
- ``{split}.tsv``: ``id<TAB>ref<TAB>hyp`` with a header line;
- ``{split}.json``: WER and CER in percent with their edit counts and the settings used,
  also printed to standard output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import final

import torch.distributed as dist

from fairseq2.datasets import Seq2SeqBatch
from fairseq2.gang import Gang

from w2v_knnvq.text import EditCounts, ErrorRateMetric, ErrorRates

from ..dataset import batch_manifest_indices, batch_transcripts, batch_utterance_ids


@dataclass(frozen=True)
class Transcription:
    index: int
    """The position of the utterance in its manifest."""

    utterance_id: str

    reference: str

    hypothesis: str


@final
class TranscriptCollector:
    """Keeps the transcriptions of the batches one rank decodes; a
    :data:`~recipes.wav2vec2_knnvq.asr.recipe.HypothesisSink`."""

    def __init__(self) -> None:
        self._transcriptions: list[Transcription] = []

    def __call__(self, batch: Seq2SeqBatch, hypotheses: list[str]) -> None:
        rows = zip(
            batch_manifest_indices(batch), batch_utterance_ids(batch), batch_transcripts(batch), hypotheses, strict=True
        )

        self._transcriptions.extend(Transcription(*row) for row in rows)

    def gather(self, gang: Gang) -> list[Transcription]:
        """The transcriptions of all ranks of ``gang``, in manifest order. Every rank must call it."""
        if gang.size == 1:
            parts = [self._transcriptions]
        else:
            parts = [[] for _ in range(gang.size)]

            dist.all_gather_object(parts, self._transcriptions, group=gang.as_process_group())

        return sorted((t for part in parts for t in part), key=lambda t: t.index)


def score(transcriptions: Sequence[Transcription]) -> ErrorRates:
    """The corpus-level WER and CER of ``transcriptions``, as validation computes them."""
    metric = ErrorRateMetric()

    metric.update(hyps=[t.hypothesis for t in transcriptions], refs=[t.reference for t in transcriptions])

    return metric.compute()


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Where and how the transcriptions of one split are written."""

    output_dir: Path

    split: str

    settings: Mapping[str, object]
    """What the evaluation ran with, recorded in ``{split}.json``."""

    def write(self, transcriptions: Sequence[Transcription]) -> dict[str, object]:
        """Writes the transcript files and ``{split}.json`` into ``output_dir``.

        :returns: The record of ``{split}.json``.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)

        self._write_lines("hyp.txt", [t.hypothesis for t in transcriptions])
        self._write_lines("ref.txt", [t.reference for t in transcriptions])

        rows = [f"{t.utterance_id}\t{t.reference}\t{t.hypothesis}" for t in transcriptions]

        self._write_lines("tsv", ["id\tref\thyp", *rows])

        rates = score(transcriptions)

        record: dict[str, object] = {
            **self.settings,
            "num_utterances": len(transcriptions),
            "wer": rates.wer,
            "cer": rates.cer,
            "word_edits": _edit_counts(rates.word_counts),
            "char_edits": _edit_counts(rates.char_counts),
        }

        self._file("json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        return record

    def _write_lines(self, suffix: str, lines: Sequence[str]) -> None:
        self._file(suffix).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def _file(self, suffix: str) -> Path:
        return self.output_dir / f"{self.split}.{suffix}"


def _edit_counts(counts: EditCounts) -> dict[str, int]:
    return {field.name: getattr(counts, field.name) for field in fields(counts)}
