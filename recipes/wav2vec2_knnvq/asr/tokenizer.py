"""The CTC character tokenizer of the fine-tuning recipe: given, or trained from the training split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fairseq2.data.tokenizers import Tokenizer
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.recipe.error import RecipeError

from w2v_knnvq.text import (
    DEFAULT_TOKENIZER_NAME,
    load_ctc_tokenizer,
    read_transcripts,
    train_char_tokenizer,
    trained_tokenizer_card,
)


@dataclass(kw_only=True)
class CtcTokenizerSection:
    path: Path | None = None
    """The asset card (``NAME.yaml``) or the ``NAME.model`` file of a tokenizer from
    ``tools/train_tokenizer.py``. ``None`` trains one from the transcripts of the
    training split and writes it to ``OUTPUT_DIR/tokenizer/{name}.yaml``. A relative
    path is taken from the directory the recipe is started in."""

    name: str = DEFAULT_TOKENIZER_NAME
    """The name of the tokenizer the recipe trains; unused with ``path``."""

    def __post_init__(self) -> None:
        # Resolved here so that the run's `config.yaml` records the absolute path and the
        # evaluation finds the same tokenizer from any directory.
        if self.path is not None:
            self.path = self.path.expanduser().resolve()


def prepare_ctc_tokenizer(
    section: CtcTokenizerSection, train_transcripts: Path, output_dir: Path, gangs: Gangs
) -> tuple[Tokenizer, Path]:
    """Loads the configured tokenizer, training it first if none is configured.

    A rerun in the same output directory reuses the tokenizer it trained before, so a
    resumed run keeps its vocabulary.

    :returns: The tokenizer and the path it was loaded from.
    """
    if section.path is not None:
        path = section.path
    else:
        path = trained_tokenizer_card(output_dir, section.name)

        _train_on_rank_0(path, section.name, train_transcripts, gangs)

    return load_recipe_tokenizer(path), path


def load_recipe_tokenizer(path: Path) -> Tokenizer:
    """Loads the CTC tokenizer from its asset card or ``.model`` file.

    :raises RecipeError: if the file is missing or holds no CTC tokenizer.
    """
    try:
        tokenizer = load_ctc_tokenizer(path)
    except (OSError, ValueError) as ex:
        raise RecipeError(f"The CTC tokenizer cannot be loaded: {ex}") from None

    log.info("CTC tokenizer {} with a vocabulary of {}.", path, tokenizer.vocab_info.size)

    return tokenizer


def _train_on_rank_0(card_path: Path, name: str, train_transcripts: Path, gangs: Gangs) -> None:
    """Trains the tokenizer on rank 0 unless ``card_path`` exists; the other ranks wait.

    :raises RecipeError: on every rank if rank 0 fails, so that no rank waits forever.
    """
    error: str | None = None

    if gangs.root.rank == 0 and not card_path.is_file():
        log.info("Training a character tokenizer on {}.", train_transcripts)

        try:
            transcripts = read_transcripts([train_transcripts])

            train_char_tokenizer(transcripts, card_path.parent, name)
        except Exception as ex:  # Whatever the failure, the other ranks must hear of it.
            error = f"The CTC tokenizer cannot be trained from {train_transcripts}: {ex}"

    # Rank 0's outcome; the broadcast also keeps the other ranks waiting until it is known.
    outcome: list[object] = [error]

    gangs.root.broadcast_objects(outcome, source_rank=0)

    if outcome[0] is not None:
        suffix = "" if gangs.root.rank == 0 else f" (reported by rank 0 to rank {gangs.root.rank})"

        raise RecipeError(f"{outcome[0]}{suffix}")
