"""CTC beam-search decoding with a lexicon and an optional KenLM n-gram language model,
through torchaudio's ``ctc_decoder`` (flashlight-text).

The search only emits words of the lexicon (``unk_score`` of minus infinity). Its score of a
hypothesis is the acoustic log-probability plus ``lm_weight`` times the language model's
log-probability plus ``word_score`` per word; without a language model, the lexicon alone
constrains the search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from w2v_knnvq.text.ctc import normalize_transcript
from w2v_knnvq.text.lexicon import LexiconError, check_lexicon
from w2v_knnvq.text.ngram import UNKNOWN_WORD
from w2v_knnvq.text.vocabulary import PAD_TOKEN, WORD_DELIMITER_TOKEN


class LanguageModelError(ValueError):
    """A language model file that cannot be loaded; the message names the file and the fix."""


@dataclass(frozen=True, kw_only=True)
class BeamSearchOptions:
    lexicon: Path
    """The lexicon file (:mod:`w2v_knnvq.text.lexicon`)."""

    lm: Path | None = None
    """A KenLM language model over the lexicon's words, ARPA or binary; ``None`` searches
    with the lexicon alone."""

    lm_weight: float = 2.0

    word_score: float = 0.0

    beam_size: int = 50
    """The number of hypotheses kept after each frame."""

    beam_threshold: float = 25.0
    """Hypotheses scoring this far below the best one are dropped."""

    def __post_init__(self) -> None:
        errors = beam_search_setting_errors(
            beam_size=self.beam_size,
            beam_threshold=self.beam_threshold,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
        )

        if errors:
            raise ValueError(errors[0])


def beam_search_setting_errors(
    *, beam_size: int, beam_threshold: float, lm_weight: float, word_score: float
) -> list[str]:
    """The errors of the numeric settings of :class:`BeamSearchOptions` (none if they are valid)."""
    errors = []

    if beam_size < 1:
        errors.append(f"`beam_size` must be at least 1, but is {beam_size} instead.")

    if not beam_threshold > 0.0:
        errors.append(f"`beam_threshold` must be positive, but is {beam_threshold} instead.")

    for name, value in (("lm_weight", lm_weight), ("word_score", word_score)):
        if not math.isfinite(value):
            errors.append(f"`{name}` must be finite, but is {value} instead.")

    return errors


class CtcBeamSearchDecoder:
    """Decodes CTC outputs to the most probable word sequence of the lexicon."""

    def __init__(self, vocabulary: Sequence[str], options: BeamSearchOptions) -> None:
        """:param vocabulary: The written token of each output class
            (:func:`~w2v_knnvq.text.vocabulary.ctc_vocabulary`), the blank first.

        :raises LexiconError: if the lexicon does not fit ``vocabulary``.
        :raises LanguageModelError: if the language model cannot be loaded.
        """
        from torchaudio.models.decoder import ctc_decoder

        check_lexicon(options.lexicon, vocabulary)

        if options.lm is not None and not options.lm.is_file():
            raise LanguageModelError(
                f"The language model file {options.lm} does not exist; give an ARPA or KenLM binary file, "
                "or none to search with the lexicon alone."
            )

        try:
            self._decoder = ctc_decoder(
                lexicon=str(options.lexicon),
                tokens=list(vocabulary),
                lm=None if options.lm is None else str(options.lm),
                beam_size=options.beam_size,
                beam_threshold=options.beam_threshold,
                lm_weight=options.lm_weight,
                word_score=options.word_score,
                unk_score=-math.inf,
                blank_token=PAD_TOKEN,
                sil_token=WORD_DELIMITER_TOKEN,
                unk_word=UNKNOWN_WORD,
            )
        except RuntimeError as ex:
            if options.lm is None:
                raise LexiconError(
                    f"The beam search cannot be built from the lexicon {options.lexicon}: {ex}"
                ) from None

            raise LanguageModelError(
                f"The language model {options.lm} cannot be loaded: {ex}; give an ARPA file of order 2 or more "
                "(e.g. written by `w2v_knnvq.text.write_arpa`) or a KenLM binary."
            ) from None

        self.vocab_size = len(vocabulary)

        self.options = options

    def __call__(self, logits: Tensor, seq_lens: Tensor | Sequence[int]) -> list[str]:
        """:param logits: Per-frame scores. *Shape:* :math:`(N,T,V)`.
        :param seq_lens: The number of valid frames of each sequence. *Shape:* :math:`(N)`.
        :returns: ``N`` transcripts, words separated by single spaces ("" where the search
            found no word sequence).
        """
        if logits.dim() != 3 or logits.size(-1) != self.vocab_size:
            raise ValueError(
                f"`logits` must be of shape (N, T, {self.vocab_size}), but has shape {tuple(logits.shape)} instead."
            )

        emissions = torch.log_softmax(logits.detach().float(), dim=-1).cpu().contiguous()

        lengths = torch.as_tensor(seq_lens).to(device="cpu", dtype=torch.int32)

        results = self._decoder(emissions, lengths)

        return [normalize_transcript(" ".join(hyps[0].words)) if hyps else "" for hyps in results]
