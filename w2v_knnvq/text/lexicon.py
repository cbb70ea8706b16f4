"""Lexicons for the lexicon beam search of :mod:`w2v_knnvq.text.beam_search`.

A lexicon file (flashlight's format, as torchaudio's ``ctc_decoder`` reads it) has one line
per spelling: the word, then the written tokens of :func:`~w2v_knnvq.text.vocabulary.ctc_vocabulary`
that spell it::

    THE	T H E

No word delimiter ``|`` ends a spelling: our SentencePiece tokenizer writes it before each
word (``▁THE▁CAT``), not after, so the last word of an utterance has none; the search takes
``|`` as the silence that may separate words. (Lexicons of fairseq's letter dictionaries end
each spelling with ``|``; they decode our models' last words only where a ``|`` follows.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from w2v_knnvq.files import write_atomically
from w2v_knnvq.text.vocabulary import PAD_TOKEN, WORD_DELIMITER_TOKEN


class LexiconError(ValueError):
    """A lexicon file that the beam search cannot use; the message names the file and the fix."""


@dataclass(frozen=True, kw_only=True)
class LexiconSummary:
    file: Path

    num_words: int

    skipped_words: tuple[str, ...]
    """Words left out since a character of theirs is no token of the vocabulary."""


def spell(word: str, tokens: set[str]) -> list[str] | None:
    """The character tokens that spell ``word``; ``None`` if a character is not in ``tokens``."""
    if not all(char in tokens for char in word):
        return None

    return list(word)


def write_lexicon(transcripts: Iterable[str], vocabulary: Sequence[str], path: Path) -> LexiconSummary:
    """Writes the lexicon of the distinct words of ``transcripts`` (in order of first
    appearance), each spelled character by character with the tokens of ``vocabulary``.

    :raises LexiconError: if no word can be spelled.
    """
    tokens = _spelling_tokens(vocabulary)

    words = dict.fromkeys(word for transcript in transcripts for word in transcript.split())

    lines, skipped = [], []

    for word in words:
        spelling = spell(word, tokens)

        if spelling is None:
            skipped.append(word)
        else:
            lines.append(f"{word}\t{' '.join(spelling)}\n")

    if not lines:
        raise LexiconError(
            f"The transcripts must hold a word spelled with the tokenizer's characters to build {path}, "
            f"but hold {len(words)} words, none of which is; give a lexicon or the tokenizer the model was trained with."
        )

    path.parent.mkdir(parents=True, exist_ok=True)

    # Every rank of an evaluation writes the same lexicon; none reads a partial one.
    write_atomically(path, lambda tmp_path: tmp_path.write_text("".join(lines), encoding="utf-8"))

    return LexiconSummary(file=path, num_words=len(lines), skipped_words=tuple(skipped))


def check_lexicon(path: Path, vocabulary: Sequence[str]) -> int:
    """:returns: The number of spellings in the lexicon file ``path``.

    :raises LexiconError: if the file is missing, empty, or spells a word with a token
        that is not in ``vocabulary``.
    """
    if not path.is_file():
        raise LexiconError(
            f"The lexicon file {path} does not exist; give an existing file, or none to build one from the training transcripts."
        )

    known = set(vocabulary)

    num_spellings = 0

    with path.open(encoding="utf-8") as fp:
        for line_nr, line in enumerate(fp, start=1):
            fields = line.split()

            if not fields:
                continue

            if len(fields) < 2:
                raise LexiconError(
                    f"Line {line_nr} of the lexicon {path} must be a word followed by its tokens, but is '{line.strip()}' instead."
                )

            unknown = [token for token in fields[1:] if token not in known]

            if unknown:
                raise LexiconError(
                    f"Line {line_nr} of the lexicon {path} must spell '{fields[0]}' with tokens of the model's vocabulary, "
                    f"but uses {', '.join(map(repr, unknown))} instead; the vocabulary is {' '.join(vocabulary[1:])} "
                    f"('{WORD_DELIMITER_TOKEN}', the word boundary, may separate words as silence)."
                )

            num_spellings += 1

    if num_spellings == 0:
        raise LexiconError(f"The lexicon {path} must hold at least one word, but is empty.")

    return num_spellings


def _spelling_tokens(vocabulary: Sequence[str]) -> set[str]:
    """The single-character tokens of ``vocabulary`` that can spell a word."""
    return {
        token
        for token in vocabulary
        if len(token) == 1 and not token.isspace() and token not in (WORD_DELIMITER_TOKEN, PAD_TOKEN)
    }
