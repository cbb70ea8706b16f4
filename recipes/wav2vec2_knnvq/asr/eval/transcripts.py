"""The transcriptions of an evaluated split and the files they are written to.

Written to the output directory, beside the evaluation's ``evaluation.json`` and
``summary.md``:

- ``{split}.hyp.txt`` and ``{split}.ref.txt``: one transcript per line, in manifest order;
- ``{split}.beam.hyp.txt``: the same for beam-search decoding, when it runs;
- ``{split}.tsv``: ``id<TAB>ref<TAB>hyp`` (and ``<TAB>beam_hyp``) with a header line.

The split's record in ``evaluation.json`` (:meth:`TranscriptFiles.write`) holds WER and CER of
greedy decoding in percent with their edit counts and the settings used, and under
``beam_search`` the same for beam-search decoding with its settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import final

from fairseq2.datasets import Seq2SeqBatch
from fairseq2.gang import Gang

from w2v_knnvq.gather import gather_objects
from w2v_knnvq.text import CtcBeamSearchDecoder, EditCounts, ErrorRateMetric, ErrorRates

from ..criterion import CtcOutput
from ..dataset import batch_manifest_indices, batch_transcripts, batch_utterance_ids


@dataclass(frozen=True)
class Transcription:
    index: int
    """The position of the utterance in its manifest."""

    utterance_id: str

    reference: str

    hypothesis: str
    """Of greedy decoding."""

    beam_hypothesis: str | None = None
    """Of beam-search decoding, if it ran."""


@final
class TranscriptCollector:
    """Keeps the transcriptions of the batches one rank decodes; a
    :data:`~recipes.wav2vec2_knnvq.asr.recipe.HypothesisSink`."""

    def __init__(self, beam_decoder: CtcBeamSearchDecoder | None = None) -> None:
        """:param beam_decoder: Also decodes every batch with this beam search."""
        self._transcriptions: list[Transcription] = []
        self._beam_decoder = beam_decoder

    def __call__(self, batch: Seq2SeqBatch, output: CtcOutput, hypotheses: list[str]) -> None:
        if self._beam_decoder is None:
            beam_hypotheses: list[str | None] = [None] * len(hypotheses)
        else:
            beam_hypotheses = list(self._beam_decoder(output.logits, output.frame_counts))

        rows = zip(
            batch_manifest_indices(batch),
            batch_utterance_ids(batch),
            batch_transcripts(batch),
            hypotheses,
            beam_hypotheses,
            strict=True,
        )

        self._transcriptions.extend(Transcription(*row) for row in rows)

    def gather(self, gang: Gang) -> list[Transcription]:
        """The transcriptions of all ranks of ``gang``, in manifest order. Every rank must call it."""
        parts = gather_objects(gang, self._transcriptions)

        return sorted((t for part in parts for t in part), key=lambda t: t.index)


def score(transcriptions: Sequence[Transcription], *, beam: bool = False) -> ErrorRates:
    """The corpus-level WER and CER of ``transcriptions``, as validation computes them.

    :param beam: Score the beam-search hypotheses instead of the greedy ones.
    """
    metric = ErrorRateMetric()

    hyps = [(t.beam_hypothesis or "") if beam else t.hypothesis for t in transcriptions]

    metric.update(hyps=hyps, refs=[t.reference for t in transcriptions])

    return metric.compute()


@dataclass(frozen=True, kw_only=True)
class TranscriptFiles:
    """Where and how the transcriptions of one split are written."""

    output_dir: Path

    split: str

    settings: Mapping[str, object]
    """What the evaluation ran with, recorded in the split's record."""

    beam_settings: Mapping[str, object] | None = None
    """The settings of beam-search decoding, if it ran."""

    def write(self, transcriptions: Sequence[Transcription]) -> dict[str, object]:
        """Writes the transcript files into ``output_dir``.

        :returns: The split's record of ``evaluation.json``.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)

        beam = self.beam_settings is not None

        self._write_lines("hyp.txt", [t.hypothesis for t in transcriptions])
        self._write_lines("ref.txt", [t.reference for t in transcriptions])

        header = ["id", "ref", "hyp"]

        rows = [[t.utterance_id, t.reference, t.hypothesis] for t in transcriptions]

        if beam:
            self._write_lines("beam.hyp.txt", [t.beam_hypothesis or "" for t in transcriptions])

            header.append("beam_hyp")

            for row, t in zip(rows, transcriptions, strict=True):
                row.append(t.beam_hypothesis or "")

        self._write_lines("tsv", ["\t".join(row) for row in (header, *rows)])

        record: dict[str, object] = {
            **self.settings,
            "num_utterances": len(transcriptions),
            **_rates_record(score(transcriptions)),
        }

        if self.beam_settings is not None:
            record["beam_search"] = {**self.beam_settings, **_rates_record(score(transcriptions, beam=True))}

        return record

    def _write_lines(self, suffix: str, lines: Sequence[str]) -> None:
        self._file(suffix).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def _file(self, suffix: str) -> Path:
        return self.output_dir / f"{self.split}.{suffix}"


def _rates_record(rates: ErrorRates) -> dict[str, object]:
    return {
        "wer": rates.wer,
        "cer": rates.cer,
        "word_edits": _edit_counts(rates.word_counts),
        "char_edits": _edit_counts(rates.char_counts),
    }


def _edit_counts(counts: EditCounts) -> dict[str, int]:
    return {field.name: getattr(counts, field.name) for field in fields(counts)}


def rates_table(record: Mapping[str, object]) -> str:
    """The WER and CER of greedy decoding and, if it ran, of beam search in ``record`` (a
    split's record of ``evaluation.json``), as a Markdown table."""
    rows = [("greedy", record)]

    beam = record.get("beam_search")

    if isinstance(beam, Mapping):
        rows.append(("beam search" if beam.get("lm") is None else "beam search + LM", beam))

    lines = ["| decoding | WER | CER |", "|---|---:|---:|"]

    lines += [f"| {name} | {values['wer']:.2f} | {values['cer']:.2f} |" for name, values in rows]

    return "\n".join(lines)
