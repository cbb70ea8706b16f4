"""Word and character error rates with substitution, deletion and insertion counts.

fairseq2 0.8.1's ``WerMetric`` compares the references with themselves for its unit error rate,
so the project computes both rates here. Rates are corpus-level: the sum of edits over all
utterances divided by the sum of reference lengths, never an average of per-utterance rates.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import final

import numpy as np
import torch
from torch import Tensor
from torcheval.metrics import Metric
from typing_extensions import Self, override


@dataclass(frozen=True, kw_only=True)
class EditCounts:
    """The edits of one minimum-cost alignment of a hypothesis against its reference."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        """The edit (Levenshtein) distance: substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            substitutions=self.substitutions + other.substitutions,
            deletions=self.deletions + other.deletions,
            insertions=self.insertions + other.insertions,
            reference_length=self.reference_length + other.reference_length,
        )

    def error_rate(self, unit: str) -> float:
        """Return ``100 * errors / reference_length``.

        :param unit: The unit name ("word", "character") used in the error message.
        :raises ValueError: when the reference length is zero, since the rate is undefined.
        """
        if self.reference_length == 0:
            raise ValueError(
                f"The error rate is undefined because the references hold no {unit}s. "
                "Make sure the reference transcripts are not all empty."
            )

        return 100.0 * self.errors / self.reference_length


def align(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> EditCounts:
    """Align ``hypothesis`` to ``reference`` with unit costs and count the edits.

    The cost matrix ``D`` is filled one reference row at a time with numpy: with ``A[j]`` the
    cheaper of the diagonal (match/substitution) and the deletion step, the insertion
    recurrence ``D[i, j] = min(A[j], D[i, j-1] + 1)`` is a running minimum of ``A[j] - j``. Among alignments of equal cost the backtrace prefers a match or
    substitution, then a deletion, then an insertion, so the counts are deterministic.
    """
    vocab: dict[Hashable, int] = {}

    # Integer ids let numpy compare units of any hashable type.
    ref_ids = np.array([vocab.setdefault(u, len(vocab)) for u in reference], dtype=np.int64)
    hyp_ids = np.array([vocab.setdefault(u, len(vocab)) for u in hypothesis], dtype=np.int64)

    num_ref, num_hyp = len(ref_ids), len(hyp_ids)

    # (R + 1, H + 1)
    cost = np.empty((num_ref + 1, num_hyp + 1), dtype=np.int64)

    columns = np.arange(num_hyp + 1, dtype=np.int64)

    cost[0] = columns

    for i in range(1, num_ref + 1):
        prev = cost[i - 1]

        row = np.empty(num_hyp + 1, dtype=np.int64)

        row[0] = i
        row[1:] = np.minimum(prev[:-1] + (hyp_ids != ref_ids[i - 1]), prev[1:] + 1)

        cost[i] = np.minimum.accumulate(row - columns) + columns

    substitutions = deletions = insertions = 0

    i, j = num_ref, num_hyp

    while i > 0 or j > 0:
        if i > 0 and j > 0:
            mismatch = int(ref_ids[i - 1] != hyp_ids[j - 1])

            if cost[i, j] == cost[i - 1, j - 1] + mismatch:
                substitutions += mismatch

                i, j = i - 1, j - 1

                continue

        if i > 0 and cost[i, j] == cost[i - 1, j] + 1:
            deletions += 1

            i -= 1
        else:
            insertions += 1

            j -= 1

    return EditCounts(
        substitutions=substitutions,
        deletions=deletions,
        insertions=insertions,
        reference_length=num_ref,
    )


def normalize_text(text: str, *, collapse_whitespace: bool = True, lowercase: bool = False) -> str:
    """Prepare a transcript for scoring.

    :param collapse_whitespace: Strip the ends and turn every whitespace run into one space,
        so spacing differences are not counted as character errors.
    :param lowercase: Fold case; off by default because LibriSpeech-style transcripts are
        uppercase on both sides and case errors are real errors otherwise.
    """
    if collapse_whitespace:
        text = " ".join(text.split())

    if lowercase:
        text = text.lower()

    return text


def word_edits(reference: str, hypothesis: str) -> EditCounts:
    """Align whitespace-separated words."""
    return align(reference.split(), hypothesis.split())


def char_edits(reference: str, hypothesis: str) -> EditCounts:
    """Align characters; spaces count as characters."""
    return align(reference, hypothesis)


@dataclass(frozen=True, kw_only=True)
class ErrorRates:
    """Corpus-level error rates in percent, with the counts behind them."""

    wer: float
    cer: float
    word_counts: EditCounts
    char_counts: EditCounts

    def as_metric_values(self) -> dict[str, float]:
        """The values to record as validation metrics."""
        return {"wer": self.wer, "cer": self.cer}


# Order of the counters in ``ErrorRateMetric.counts``.
_COUNT_FIELDS = ("substitutions", "deletions", "insertions", "reference_length")


@final
class ErrorRateMetric(Metric[ErrorRates]):
    """Accumulates word and character edits over a corpus and computes WER and CER.

    It is a torcheval metric, so a fairseq2 ``MetricBag`` can hold it and sum its counts
    across data-parallel ranks before ``compute``.
    """

    def __init__(
        self,
        *,
        collapse_whitespace: bool = True,
        lowercase: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(device=device)

        self._collapse_whitespace = collapse_whitespace
        self._lowercase = lowercase

        self.word_counts: Tensor
        self.char_counts: Tensor

        # (4): substitutions, deletions, insertions, reference length
        for name in ("word_counts", "char_counts"):
            self._add_state(name, torch.zeros(len(_COUNT_FIELDS), device=device, dtype=torch.int64))

    @override
    @torch.inference_mode()
    def update(self, *, hyps: Sequence[str], refs: Sequence[str]) -> Self:
        """Add one batch of hypotheses and their references, in the same order."""
        if isinstance(hyps, str) or isinstance(refs, str):
            raise TypeError("`hyps` and `refs` must be sequences of strings, not single strings.")

        if len(hyps) != len(refs):
            raise ValueError(
                f"`hyps` and `refs` must have the same length, but have {len(hyps)} and {len(refs)} elements."
            )

        words = EditCounts()
        chars = EditCounts()

        for hyp, ref in zip(hyps, refs, strict=True):
            hyp = self._normalize(hyp)
            ref = self._normalize(ref)

            words += word_edits(ref, hyp)
            chars += char_edits(ref, hyp)

        self.word_counts += self._to_tensor(words)
        self.char_counts += self._to_tensor(chars)

        return self

    @override
    @torch.inference_mode()
    def compute(self) -> ErrorRates:
        """:raises ValueError: when no reference word (or character) has been accumulated."""
        word_counts = self._to_counts(self.word_counts)
        char_counts = self._to_counts(self.char_counts)

        return ErrorRates(
            wer=word_counts.error_rate("word"),
            cer=char_counts.error_rate("character"),
            word_counts=word_counts,
            char_counts=char_counts,
        )

    @override
    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[ErrorRateMetric]) -> Self:
        for metric in metrics:
            self.word_counts += metric.word_counts.to(self.device)
            self.char_counts += metric.char_counts.to(self.device)

        return self

    def _normalize(self, text: str) -> str:
        return normalize_text(text, collapse_whitespace=self._collapse_whitespace, lowercase=self._lowercase)

    def _to_tensor(self, counts: EditCounts) -> Tensor:
        values = [getattr(counts, name) for name in _COUNT_FIELDS]

        return torch.tensor(values, device=self.device, dtype=torch.int64)

    @staticmethod
    def _to_counts(values: Tensor) -> EditCounts:
        return EditCounts(**dict(zip(_COUNT_FIELDS, values.tolist(), strict=True)))
