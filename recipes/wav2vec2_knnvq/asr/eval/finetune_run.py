"""What the evaluation takes over from the fine-tuning run: the checkpoint, the tokenizer
and the audio normalization the model was trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fairseq2.recipe.config import ReferenceModelSection
from fairseq2.recipe.error import RecipeError

from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError
from w2v_knnvq.text import finetuning_tokenizer_path

from ....common import find_recipe_checkpoint
from .config import FinetunedModelSection

ASR_MODEL_FAMILY: Final = "wav2vec2_asr"


def find_finetuned_checkpoint(section: FinetunedModelSection) -> RunCheckpoint:
    """:raises RecipeError: if ``section.run_dir`` holds no such checkpoint of a
    ``wav2vec2_asr`` model."""
    run = find_recipe_checkpoint(
        section.run_dir,
        section.checkpoint,
        path_option="model.run_dir",
        checkpoint_option="model.checkpoint",
        other_choices=", 'best' or 'last'",
    )

    if run.family != ASR_MODEL_FAMILY:
        raise RecipeError(
            f"`model.run_dir` must hold a `{ASR_MODEL_FAMILY}` model, but {run.metadata_file} describes a "
            f"`{run.family}` model instead; give the output directory of the fine-tuning recipe."
        )

    return run


def point_at_checkpoint(section: ReferenceModelSection, run: RunCheckpoint) -> None:
    """Makes fairseq2 load the model of ``run`` from ``section``: its step's model
    directory, with the family and configuration of ``checkpoints/model.yaml``."""
    section.path = run.model_dir
    section.family = run.family
    section.config_overrides = run.card.field("model_config").value


def check_run_config(run: RunCheckpoint) -> None:
    """:raises RecipeError: if the run's ``config.yaml`` is missing."""
    if not run.config_file.is_file():
        raise RecipeError(
            f"{run.config_file} does not exist, so the run's tokenizer and audio normalization are unknown; "
            "keep the fine-tuning output directory intact."
        )


def run_normalize_audio(run: RunCheckpoint) -> bool:
    """``dataset.normalize_audio`` of the run: the model only knows audio read this way.

    :raises RecipeError: if the run's ``config.yaml`` does not say.
    """
    check_run_config(run)

    normalize_audio = run.normalize_audio

    if normalize_audio is None:
        raise RecipeError(
            f"`dataset.normalize_audio` in {run.config_file} must be a boolean, but is "
            f"{run.recipe_option('dataset', 'normalize_audio')!r} instead; the file is not one the fine-tuning recipe wrote."
        )

    return normalize_audio


def run_tokenizer_path(run: RunCheckpoint) -> Path:
    """The tokenizer the run trained with: ``tokenizer.path`` of its ``config.yaml``, else
    the one it trained into its output directory.

    :raises RecipeError: if the run's ``config.yaml`` is missing or gives a relative path.
    """
    check_run_config(run)

    try:
        return finetuning_tokenizer_path(run, relative_path_fix="set `tokenizer.path` of the evaluation")
    except RunCheckpointError as ex:
        raise RecipeError(str(ex)) from None
