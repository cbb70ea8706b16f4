"""Beam-search decoding in the evaluation: its decoder, the lexicon built from the run's
training transcripts, and the command-line options that stand for ``decoding.*``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fairseq2.data.tokenizers import Tokenizer
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.recipe.error import RecipeError

from w2v_knnvq.data.asr_dataset import AsrManifestDataset
from w2v_knnvq.runs import RunCheckpoint
from w2v_knnvq.text import (
    BeamSearchOptions,
    CtcBeamSearchDecoder,
    CtcVocabularyError,
    LanguageModelError,
    LexiconError,
    ctc_vocabulary,
    read_transcripts,
    write_lexicon,
)

from .config import DecodingSection

LEXICON_FILE: Final = "lexicon.txt"
"""The lexicon built from the training transcripts, in the evaluation's output directory."""

_OPTIONS: Final = (
    ("--lexicon", "lexicon", "FILE", "the lexicon (default: built from the run's training transcripts)"),
    ("--lm", "lm", "FILE", "a KenLM language model over words, ARPA or binary"),
    ("--lm-weight", "lm_weight", "WEIGHT", "the weight of the language model's log-probability"),
    ("--word-score", "word_score", "SCORE", "the score added per word"),
    ("--beam-size", "beam_size", "N", "the number of hypotheses kept per frame"),
)


def expand_decoding_options(argv: Sequence[str]) -> list[str]:
    """Turns the options of :data:`_OPTIONS` and ``--beam-search`` in ``argv`` (before a
    ``--``) into fairseq2's ``--config decoding.NAME=VALUE``; the rest is kept as it is."""
    if "--" in argv:
        split = list(argv).index("--")

        head, tail = list(argv[:split]), list(argv[split:])
    else:
        head, tail = list(argv), []

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    for flag, dest, metavar, help_text in _OPTIONS:
        parser.add_argument(flag, dest=dest, metavar=metavar, help=help_text)

    parser.add_argument("--beam-search", action="store_true")

    known, rest = parser.parse_known_args(head)

    overrides = [
        f"decoding.{dest}={_yaml_value(dest, value)}"
        for _, dest, _, _ in _OPTIONS
        if (value := getattr(known, dest)) is not None
    ]

    if known.beam_search:
        overrides.append("decoding.beam_search=true")

    return [*rest, *(["--config", *overrides] if overrides else []), *tail]


def _yaml_value(dest: str, value: str) -> str:
    """fairseq2 reads ``--config`` values as YAML: paths are quoted so that they stay strings
    (``2024``, ``null`` or a ``#`` in a name would not)."""
    return json.dumps(value) if dest in ("lexicon", "lm") else value


def create_beam_decoder(
    section: DecodingSection,
    tokenizer: Tokenizer,
    dataset: AsrManifestDataset,
    run: RunCheckpoint,
    output_dir: Path,
    gangs: Gangs,
) -> CtcBeamSearchDecoder:
    """The beam search of ``section`` over the tokenizer's vocabulary; without
    ``section.lexicon``, :data:`LEXICON_FILE` is first written from the run's training
    transcripts.

    :raises RecipeError: if the tokenizer, the lexicon or the language model cannot be used.
    """
    try:
        vocabulary = ctc_vocabulary(tokenizer)
    except CtcVocabularyError as ex:
        raise RecipeError(f"Beam-search decoding needs a character tokenizer: {ex}") from None

    lexicon = section.lexicon

    if lexicon is None:
        # Every rank builds the same lexicon (it is cheap), so that each fails alike and none
        # depends on another node's file system.
        lexicon = output_dir / LEXICON_FILE

        _build_lexicon(vocabulary, _training_transcripts(dataset, run), lexicon, log_summary=gangs.root.rank == 0)

    options = BeamSearchOptions(
        lexicon=lexicon,
        lm=section.lm,
        lm_weight=section.lm_weight,
        word_score=section.word_score,
        beam_size=section.beam_size,
        beam_threshold=section.beam_threshold,
    )

    try:
        return CtcBeamSearchDecoder(vocabulary, options)
    except (LexiconError, LanguageModelError) as ex:
        raise RecipeError(str(ex)) from None


def beam_settings(options: BeamSearchOptions) -> dict[str, object]:
    """What a split's record (in ``evaluation.json``) holds of the beam search."""
    return {
        "lexicon": str(options.lexicon),
        "lm": None if options.lm is None else str(options.lm),
        "lm_weight": options.lm_weight,
        "word_score": options.word_score,
        "beam_size": options.beam_size,
        "beam_threshold": options.beam_threshold,
    }


def _training_transcripts(dataset: AsrManifestDataset, run: RunCheckpoint) -> Path:
    """``{manifest_dir}/{train_split}.wrd`` of the evaluated dataset, with the run's split.

    :raises RecipeError: if the run does not name its split or the file is missing.
    """
    split = run.recipe_option("dataset", "train_split")

    if not isinstance(split, str):
        raise RecipeError(
            f"`dataset.train_split` in {run.config_file} must name the training split, but is {split!r} instead; "
            "give a lexicon with `--lexicon FILE`."
        )

    file = dataset.transcript_file(split)

    if not file.is_file():
        raise RecipeError(
            f"{file}, the transcripts of the run's training split, does not exist, so no lexicon can be built; "
            "point `dataset.config_overrides.manifest_dir` at the run's manifests or give `--lexicon FILE`."
        )

    return file


def _build_lexicon(vocabulary: Sequence[str], transcripts_file: Path, lexicon: Path, *, log_summary: bool) -> None:
    try:
        summary = write_lexicon(read_transcripts([transcripts_file]), vocabulary, lexicon)
    except (ValueError, LexiconError) as ex:
        raise RecipeError(f"No lexicon can be built from {transcripts_file}: {ex}") from None

    if not log_summary:
        return

    log.info("Wrote the lexicon of the {} words of {} to {}.", summary.num_words, transcripts_file, lexicon)

    if summary.skipped_words:
        log.warning("Left {} words with characters outside the vocabulary out of the lexicon, e.g. {}.", len(summary.skipped_words), ", ".join(summary.skipped_words[:5]))  # fmt: skip
