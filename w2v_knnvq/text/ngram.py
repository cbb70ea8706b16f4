"""A word n-gram language model estimated from transcripts, written in the ARPA format that
KenLM (and so torchaudio's ``ctc_decoder``) loads.

The model is interpolated absolute discounting (Ney, Essen and Kneser, 1994): for a history
``h`` of ``n - 1`` words seen ``c(h)`` times, followed by ``N1+(h)`` distinct words,

    P(w | h) = max(c(h w) - D_n, 0) / c(h) + gamma(h) P(w | h'),    gamma(h) = D_n N1+(h) / c(h),

where ``h'`` drops the oldest word, ``D_n = n_1 / (n_1 + 2 n_2)`` from the numbers of
``n``-grams seen once and twice, and the unigrams interpolate with the uniform distribution
over the words, ``</s>`` and ``<unk>``. An interpolated model is exactly an ARPA backoff model:
each seen ``n``-gram is listed with its interpolated probability and each history with
``gamma(h)`` as its backoff weight.

It is meant for small corpora, the transcripts of a fine-tuning split; for LibriSpeech,
use the official 4-gram (``4-gram.arpa`` of openslr.org/11).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Final

SENTENCE_START: Final = "<s>"
SENTENCE_END: Final = "</s>"
UNKNOWN_WORD: Final = "<unk>"

_LOG10_ZERO: Final = -99.0
"""The ARPA convention for ``log10(0)``, the probability of predicting ``<s>``."""


NGram = tuple[str, ...]


def estimate_arpa(transcripts: Iterable[str], *, order: int = 3) -> str:
    """:param transcripts: One sentence per item, words separated by whitespace.
    :param order: The longest n-gram, at least 2 (KenLM loads no unigram model).
    :returns: The model in ARPA format.

    :raises ValueError: if ``order`` is below 2 or there is no word at all.
    """
    if order < 2:
        raise ValueError(f"`order` must be at least 2, but is {order} instead.")

    counts = _count_ngrams(transcripts, order)

    if not counts[1]:
        raise ValueError("The transcripts must hold at least one word, but are empty.")

    probs, backoffs = _interpolated_model(counts, order)

    return _format_arpa(probs, backoffs, order)


def write_arpa(transcripts: Iterable[str], path: Path, *, order: int = 3) -> Path:
    """Writes :func:`estimate_arpa` of ``transcripts`` to ``path``; returns ``path``."""
    text = estimate_arpa(transcripts, order=order)

    path.parent.mkdir(parents=True, exist_ok=True)

    path.write_text(text, encoding="utf-8")

    return path


def _count_ngrams(transcripts: Iterable[str], order: int) -> list[Counter[NGram]]:
    """``counts[n][ngram]`` for ``n`` in ``1..order`` (``counts[0]`` is unused); sentences are
    padded with one ``<s>`` and one ``</s>``, and ``<s>`` is never counted as predicted."""
    counts: list[Counter[NGram]] = [Counter() for _ in range(order + 1)]

    for transcript in transcripts:
        words = transcript.split()

        if not words:
            continue

        tokens = [SENTENCE_START, *words, SENTENCE_END]

        for end in range(1, len(tokens)):
            for n in range(1, order + 1):
                start = end - n + 1

                if start < 0:
                    break

                counts[n][tuple(tokens[start : end + 1])] += 1

    return counts


def _discount(counts: Counter[NGram]) -> float:
    """Ney's estimate ``n_1 / (n_1 + 2 n_2)``, 0.5 when it is undefined or degenerate."""
    num_once = sum(1 for count in counts.values() if count == 1)
    num_twice = sum(1 for count in counts.values() if count == 2)

    if num_once == 0 or num_twice == 0:
        return 0.5

    return num_once / (num_once + 2 * num_twice)


def _interpolated_model(counts: list[Counter[NGram]], order: int) -> tuple[dict[NGram, float], dict[NGram, float]]:
    """:returns: The interpolated probability of every listed n-gram and the backoff
    weight ``gamma(h)`` of every history seen with a continuation."""
    probs: dict[NGram, float] = {}

    backoffs: dict[NGram, float] = {}

    unigrams = counts[1]

    vocabulary = sorted({ngram[0] for ngram in unigrams} | {UNKNOWN_WORD})

    total = sum(unigrams.values())

    discount = _discount(unigrams)

    uniform_mass = discount * len(unigrams) / total

    for word in vocabulary:
        probs[(word,)] = max(unigrams[(word,)] - discount, 0.0) / total + uniform_mass / len(vocabulary)

    probs[(SENTENCE_START,)] = 0.0

    for n in range(2, order + 1):
        discount = _discount(counts[n])

        continuations: defaultdict[NGram, list[tuple[str, int]]] = defaultdict(list)

        for ngram, count in counts[n].items():
            continuations[ngram[:-1]].append((ngram[-1], count))

        for history, words in continuations.items():
            history_count = sum(count for _, count in words)

            gamma = discount * len(words) / history_count

            backoffs[history] = gamma

            for word, count in words:
                lower = probs[history[1:] + (word,)]

                probs[history + (word,)] = (count - discount) / history_count + gamma * lower

    return probs, backoffs


def _format_arpa(probs: dict[NGram, float], backoffs: dict[NGram, float], order: int) -> str:
    by_order: list[list[NGram]] = [[] for _ in range(order + 1)]

    for ngram in probs:
        by_order[len(ngram)].append(ngram)

    lines = ["", "\\data\\", *(f"ngram {n}={len(by_order[n])}" for n in range(1, order + 1)), ""]

    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")

        for ngram in sorted(by_order[n]):
            prob = probs[ngram]

            fields = [_format_log10(prob), " ".join(ngram)]

            if n < order and ngram in backoffs:
                fields.append(_format_log10(backoffs[ngram]))

            lines.append("\t".join(fields))

        lines.append("")

    lines.append("\\end\\")

    return "\n".join(lines) + "\n"


def _format_log10(value: float) -> str:
    return f"{_LOG10_ZERO:.1f}" if value <= 0.0 else f"{math.log10(value):.7f}"
