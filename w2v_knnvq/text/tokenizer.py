"""A character-level SentencePiece tokenizer for CTC, trained from LibriSpeech-style transcripts.

Vocabulary layout (the CTC head's output size equals the vocabulary size):

- id 0 ``<pad>``: padding of target batches and the CTC blank. The blank never occurs in a
  target, and fairseq2's CTC loss (blank 0) ignores targets past their lengths, so one id
  serves both.
- id 1 ``<unk>``: characters that were not in the training transcripts.
- ids 2 and up: ``▁`` (SentencePiece's word boundary, i.e. the space) and every other
  distinct character of the transcripts, most frequent first.
- No BOS/EOS: CTC targets carry no sentence markers.

The trained model comes with a fairseq2 asset card (``NAME.yaml``) of the ``char_tokenizer``
family. :func:`load_ctc_tokenizer` loads either the card or the ``NAME.model`` file; the
fine-tuning recipe takes the same paths (``tokenizer.path: DIR/NAME.yaml`` or
``tokenizer.path: DIR/NAME.model``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import sentencepiece as spm

from fairseq2.assets import AssetCard, FileAssetMetadataLoader, StandardAssetStore
from fairseq2.data.tokenizers import Tokenizer, load_tokenizer
from fairseq2.data.tokenizers.char import CHAR_TOKENIZER_FAMILY, load_char_tokenizer
from fairseq2.runtime.dependency import get_dependency_resolver

from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, local_path_field

CTC_BLANK_ID: Final = 0
PAD_ID: Final = CTC_BLANK_ID
UNK_ID: Final = 1
NUM_SPECIAL_TOKENS: Final = 2

# SentencePiece replaces spaces with this symbol; it is one vocabulary entry.
WORD_BOUNDARY: Final = "\u2581"

_TRANSCRIPT_SUFFIXES: Final = (".trans.txt", ".wrd")

_CARD_SUFFIXES: Final = (".yaml", ".yml")

_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

TRAINED_TOKENIZER_DIR: Final = "tokenizer"
"""Where, under its output directory, the fine-tuning recipe writes the tokenizer it trains."""

DEFAULT_TOKENIZER_NAME: Final = "ctc_char"
"""The name of the tokenizer the fine-tuning recipe trains unless ``tokenizer.name`` is set."""


def find_transcript_files(paths: Sequence[Path]) -> list[Path]:
    """Expand ``paths`` to transcript files.

    A directory contributes every ``*.trans.txt`` (LibriSpeech chapters) and ``*.wrd``
    (fairseq manifests) file below it, in sorted order; a file must have one of these suffixes.
    """
    files: list[Path] = []

    for path in paths:
        if path.is_dir():
            found = sorted(p for suffix in _TRANSCRIPT_SUFFIXES for p in path.rglob(f"*{suffix}"))
            if not found:
                raise FileNotFoundError(
                    f"{path} holds no transcript files (*.trans.txt or *.wrd). "
                    "Point to a LibriSpeech split directory or a manifest directory."
                )

            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(_TRANSCRIPT_SUFFIXES):
                raise ValueError(
                    f"{path} is not a transcript file: expected a name ending in {' or '.join(_TRANSCRIPT_SUFFIXES)}."
                )

            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist. Check the transcript path.")

    return files


def read_transcripts(paths: Sequence[Path]) -> list[str]:
    """Read one transcript per line from ``.wrd`` and ``.trans.txt`` files (or directories).

    ``.trans.txt`` lines start with the utterance id, which is dropped. Empty transcripts are
    skipped.

    :raises ValueError: when no transcript text is found at all.
    """
    transcripts: list[str] = []

    for file in find_transcript_files(paths):
        has_ids = file.name.endswith(".trans.txt")

        with file.open(encoding="utf-8") as fp:
            for line in fp:
                words = line.split()
                if has_ids:
                    words = words[1:]

                text = " ".join(words)
                if text:
                    transcripts.append(text)

    if not transcripts:
        raise ValueError(
            f"No transcript text found in {', '.join(str(p) for p in paths)}. "
            "The files are empty or hold utterance ids only."
        )

    return transcripts


def char_vocab_size(transcripts: Iterable[str]) -> int:
    """The vocabulary size a character tokenizer trained on ``transcripts`` gets.

    Distinct non-space characters, plus the word boundary, plus ``<pad>``/blank and ``<unk>``.
    """
    chars: set[str] = set()

    for text in transcripts:
        chars.update(text)

    chars.discard(" ")

    return len(chars) + 1 + NUM_SPECIAL_TOKENS


def train_char_tokenizer(transcripts: Sequence[str], output_dir: Path, name: str) -> Path:
    """Train a character SentencePiece model and write ``NAME.model`` and ``NAME.yaml``.

    :param transcripts: The training text, one utterance per item.
    :param output_dir: Created if missing.
    :param name: The asset card name and the file stem.
    :returns: The path of the asset card.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"`name` must consist of letters, digits, '_', '.', '-' and start with a letter or digit, but is '{name}'."
        )

    transcripts = [" ".join(text.split()) for text in transcripts]
    transcripts = [text for text in transcripts if text]
    if not transcripts:
        raise ValueError("`transcripts` holds no text; the tokenizer needs at least one line.")

    vocab_size = char_vocab_size(transcripts)

    model = io.BytesIO()

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(transcripts),
        model_writer=model,
        model_type="char",
        vocab_size=vocab_size,
        character_coverage=1.0,
        # Keep the transcripts' characters exactly as written (no NFKC folding).
        normalization_rule_name="identity",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        # SentencePiece silently skips longer lines, which could drop rare characters; it
        # refuses a limit below 10 bytes.
        max_sentence_length=max(10, *(len(text.encode("utf-8")) for text in transcripts)),
        minloglevel=2,
    )

    output_dir.mkdir(parents=True, exist_ok=True)

    model_path = output_dir / f"{name}.model"
    model_path.write_bytes(model.getvalue())

    card_path = output_dir / f"{name}.yaml"
    card_path.write_text(_card_text(name, model_path.name, vocab_size), encoding="utf-8")

    return card_path


def _card_text(name: str, model_filename: str, vocab_size: int) -> str:
    return (
        "# Character-level SentencePiece tokenizer for CTC.\n"
        f"# Vocabulary size {vocab_size}: id {PAD_ID} <pad> is also the CTC blank, "
        f"id {UNK_ID} <unk>, no BOS/EOS.\n"
        f"name: {name}\n"
        f"tokenizer_family: {CHAR_TOKENIZER_FAMILY}\n"
        f"tokenizer: {model_filename}\n"
    )


def load_tokenizer_card(card_path: Path) -> AssetCard:
    """Read the single asset card in ``card_path``, with relative paths resolved against it."""
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} does not exist. Train a tokenizer with tools/train_tokenizer.py.")

    resolver = get_dependency_resolver()

    provider = resolver.resolve(FileAssetMetadataLoader).load(card_path)

    names = sorted(name.removesuffix("@") for name in provider.asset_names)
    if len(names) != 1:
        raise ValueError(f"{card_path} must hold exactly one asset card, but holds {len(names)}.")

    card = StandardAssetStore([provider]).retrieve_card(names[0])

    # The model file named so that fairseq2 finds it whatever letters its path holds.
    if (tokenizer := local_path_field(card, "tokenizer")) is None:
        return card

    return AssetCard(card.name, {"tokenizer": tokenizer}, base=card)


def load_ctc_tokenizer(path: Path) -> Tokenizer:
    """Load a CTC character tokenizer from its asset card (``.yaml``) or its ``.model`` file.

    The vocabulary size (``tokenizer.vocab_info.size``) is the CTC head's output size.

    :raises ValueError: when id 0 is not the padding/blank entry, so CTC would treat a real
        symbol as blank.
    """
    if path.suffix in _CARD_SUFFIXES:
        tokenizer = load_tokenizer(load_tokenizer_card(path))
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist. Train a tokenizer with tools/train_tokenizer.py.")

        tokenizer = load_char_tokenizer(path, None)

    if tokenizer.vocab_info.pad_idx != CTC_BLANK_ID:
        raise ValueError(
            f"The tokenizer at {path} does not reserve id {CTC_BLANK_ID} for the CTC blank "
            f"(its padding id is {tokenizer.vocab_info.pad_idx}). "
            "Retrain it with tools/train_tokenizer.py."
        )

    return tokenizer


def check_vocab_size(tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_path: Path) -> None:
    """Make sure the CTC model's output size is the tokenizer's vocabulary size.

    :raises ValueError: on a mismatch, naming both sizes and the tokenizer.
    """
    if tokenizer_vocab_size != model_vocab_size:
        raise ValueError(
            f"The CTC model predicts {model_vocab_size} classes, but the tokenizer at "
            f"{tokenizer_path} has a vocabulary of {tokenizer_vocab_size}. Set the model's "
            f"`target_vocab_size` to {tokenizer_vocab_size}, or use the tokenizer the model "
            "was trained with."
        )


def trained_tokenizer_card(output_dir: Path, name: str) -> Path:
    """The asset card of the tokenizer ``name`` that the fine-tuning recipe trained into ``output_dir``."""
    return output_dir / TRAINED_TOKENIZER_DIR / f"{name}.yaml"


def finetuning_tokenizer_path(run: RunCheckpoint, *, relative_path_fix: str) -> Path:
    """The tokenizer a fine-tuning run trained with: ``tokenizer.path`` of its
    ``config.yaml``, else the one it trained into its output directory.

    :param relative_path_fix: What the error about a relative ``tokenizer.path`` tells the
        user to do instead, e.g. which option to set.

    :raises RunCheckpointError: if the run's ``config.yaml`` is missing or gives a relative path.
    """
    if not run.config_file.is_file():
        raise RunCheckpointError(
            f"{run.config_file} does not exist, so the run's tokenizer is unknown; keep the fine-tuning output directory intact."
        )

    path = run.recipe_option("tokenizer", "path")

    if path is None:
        name = run.recipe_option("tokenizer", "name")

        return trained_tokenizer_card(run.run_dir, name if isinstance(name, str) else DEFAULT_TOKENIZER_NAME)

    tokenizer_path = Path(str(path)).expanduser()

    # The recipe records the path it resolved; a relative one cannot be resolved again
    # since the directory the run was started in is unknown.
    if not tokenizer_path.is_absolute():
        raise RunCheckpointError(
            f"`tokenizer.path` in {run.config_file} must be absolute, but is the relative path {tokenizer_path} "
            f"instead, relative to the directory the run was started in, which is unknown; {relative_path_fix}."
        )

    return tokenizer_path
