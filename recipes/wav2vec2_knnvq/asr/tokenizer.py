"""The CTC character tokenizer of the fine-tuning recipe: given, or trained from the training split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fairseq2.data.tokenizers import Tokenizer
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.recipe.error import RecipeError

from w2v_knnvq.text import load_ctc_tokenizer, read_transcripts, train_char_tokenizer

TRAINED_TOKENIZER_DIR = "tokenizer"
"""Where, under the output directory, the recipe writes the tokenizer it trains."""


@dataclass(kw_only=True)
class CtcTokenizerSection:
    path: Path | None = None
    """The asset card (``NAME.yaml``) or the ``NAME.model`` file of a tokenizer from
    ``tools/train_tokenizer.py``. ``None`` trains one from the transcripts of the
    training split and writes it to ``OUTPUT_DIR/tokenizer/{name}.yaml``."""

    name: str = "ctc_char"
    """The name of the trained tokenizer."""


def trained_tokenizer_card(output_dir: Path, name: str) -> Path:
    return output_dir / TRAINED_TOKENIZER_DIR / f"{name}.yaml"


def prepare_ctc_tokenizer(
    section: CtcTokenizerSection, train_transcripts: Path, output_dir: Path, gangs: Gangs
) -> tuple[Tokenizer, Path]:
    """Loads the configured tokenizer, training it first if none is configured.

    A rerun in the same output directory reuses the tokenizer it trained before, so a
    resumed run keeps its vocabulary.

    :returns: The tokenizer and the path it was loaded from.
    """
    if section.path is not None:
        path = section.path.expanduser().resolve()
    else:
        path = trained_tokenizer_card(output_dir, section.name)

        if gangs.root.rank == 0 and not path.is_file():
            log.info("Training a character tokenizer on {}.", train_transcripts)

            try:
                transcripts = read_transcripts([train_transcripts])

                train_char_tokenizer(transcripts, path.parent, section.name)
            except (OSError, ValueError) as ex:
                raise RecipeError(f"The CTC tokenizer cannot be trained from {train_transcripts}: {ex}") from None

        gangs.root.barrier()

    try:
        tokenizer = load_ctc_tokenizer(path)
    except (OSError, ValueError) as ex:
        raise RecipeError(f"The CTC tokenizer cannot be loaded: {ex}") from None

    log.info("CTC tokenizer {} with a vocabulary of {}.", path, tokenizer.vocab_info.size)

    return tokenizer, path
