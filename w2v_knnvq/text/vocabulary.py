"""The CTC vocabulary of a character tokenizer as written tokens: what the Hugging Face
CTC tokenizer, torchaudio's ``aux`` labels and the lexicon beam search of
:mod:`w2v_knnvq.text.beam_search` take.

Each token id gets the text our decoder writes for it; the CTC blank (id 0) becomes
:data:`PAD_TOKEN` and the word boundary (SentencePiece's ``▁``, written as a space) becomes
:data:`WORD_DELIMITER_TOKEN`, as in Hugging Face's own CTC checkpoints.
"""

from __future__ import annotations

from typing import Final

import torch

from fairseq2.data.tokenizers import TokenDecoder, Tokenizer

from w2v_knnvq.text.tokenizer import CTC_BLANK_ID

PAD_TOKEN: Final = "<pad>"
"""The CTC blank in the written vocabulary."""

WORD_DELIMITER_TOKEN: Final = "|"
"""The word boundary in the written vocabulary."""


class CtcVocabularyError(ValueError):
    """A tokenizer whose tokens cannot be written one by one as a CTC vocabulary."""


def ctc_vocabulary(tokenizer: Tokenizer) -> list[str]:
    """:returns: The written token of each id of ``tokenizer``: :data:`PAD_TOKEN` for
        the CTC blank, :data:`WORD_DELIMITER_TOKEN` for the token our decoder writes as a
        space, and what our decoder writes for each other token.

    :raises CtcVocabularyError: if the blank is not id 0, a token writes nothing or the
        same as another, or a token writes :data:`WORD_DELIMITER_TOKEN` itself.
    """
    if tokenizer.vocab_info.pad_idx != CTC_BLANK_ID:
        raise CtcVocabularyError(
            f"The tokenizer's padding id must be the CTC blank {CTC_BLANK_ID}, but is {tokenizer.vocab_info.pad_idx} instead."
        )

    surfaces = _token_surfaces(tokenizer)

    vocabulary = []

    for idx, surface in enumerate(surfaces):
        if idx == CTC_BLANK_ID:
            vocabulary.append(PAD_TOKEN)
        elif surface == " ":
            vocabulary.append(WORD_DELIMITER_TOKEN)
        elif surface in ("", WORD_DELIMITER_TOKEN, PAD_TOKEN):
            raise CtcVocabularyError(
                f"Token {idx} of the tokenizer must be written as a non-empty text other than "
                f"'{WORD_DELIMITER_TOKEN}' and '{PAD_TOKEN}', but is written as '{surface}' instead; "
                "a CTC vocabulary of written tokens cannot represent it."
            )
        else:
            vocabulary.append(surface)

    duplicates = sorted({token for token in vocabulary if vocabulary.count(token) > 1})

    if duplicates:
        raise CtcVocabularyError(
            f"The tokenizer's tokens must be written differently, but {', '.join(map(repr, duplicates))} "
            "stands for several ids instead; a CTC vocabulary of written tokens cannot represent them."
        )

    return vocabulary


def _token_surfaces(tokenizer: Tokenizer) -> list[str]:
    """What the decoder writes for each token after a probe token, so that a leading
    word boundary keeps its space (a decoder drops the space it would begin with)."""
    decoder = tokenizer.create_decoder()

    size = tokenizer.vocab_info.size

    probe_idx, probe_text = _probe(decoder, size)

    surfaces = []

    for idx in range(size):
        text = _decode(decoder, [probe_idx, idx])

        if not text.startswith(probe_text):
            raise CtcVocabularyError(
                f"The tokenizer's decoder must write token {idx} after token {probe_idx} as '{probe_text}' followed "
                f"by the token, but writes '{text}' instead; it is no character tokenizer."
            )

        surfaces.append(text[len(probe_text) :])

    return surfaces


def _probe(decoder: TokenDecoder, size: int) -> tuple[int, str]:
    """:returns: The first token that the decoder writes as visible text without spaces, and that text."""
    for idx in range(size):
        text = _decode(decoder, [idx])

        if text and not any(char.isspace() for char in text):
            return idx, text

    raise CtcVocabularyError("The tokenizer must have a token written as visible text, but has none.")


def _decode(decoder: TokenDecoder, ids: list[int]) -> str:
    return decoder(torch.tensor(ids, dtype=torch.int64))
