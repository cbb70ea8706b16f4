"""What the evaluation takes over from the fine-tuning run: the checkpoint, the tokenizer
and the audio normalization the model was trained with."""

from __future__ import annotations

from pathlib import Path

from fairseq2.device import Device
from fairseq2.models.wav2vec2.asr import WAV2VEC2_ASR_FAMILY, Wav2Vec2AsrModel, get_wav2vec2_asr_model_hub
from fairseq2.recipe.error import RecipeError

from w2v_knnvq import runs
from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, load_run_model
from w2v_knnvq.text import finetuning_tokenizer_path

from ....common import EvaluatedRunSection, find_evaluated_checkpoint


def find_finetuned_checkpoint(section: EvaluatedRunSection) -> RunCheckpoint:
    """:raises RecipeError: if ``section.run_dir`` holds no such checkpoint of a
    ``wav2vec2_asr`` model."""
    run = find_evaluated_checkpoint(section)

    if run.family != WAV2VEC2_ASR_FAMILY:
        raise RecipeError(
            f"`run.run_dir` must hold a `{WAV2VEC2_ASR_FAMILY}` model, but {run.metadata_file} describes a "
            f"`{run.family}` model instead; give the output directory of the fine-tuning recipe."
        )

    return run


def load_finetuned_model(run: RunCheckpoint, device: Device) -> Wav2Vec2AsrModel:
    """The model of ``run`` in eval mode, with the family and configuration of its
    ``checkpoints/model.yaml``, loaded through the restricted loaders of :mod:`w2v_knnvq.runs`.

    :raises RecipeError: if the checkpoint cannot be loaded or holds a pickle that could run code.
    """
    try:
        return load_run_model(run, get_wav2vec2_asr_model_hub(), WAV2VEC2_ASR_FAMILY, device=device)
    except RunCheckpointError as ex:
        raise RecipeError(f"`run.run_dir`: {ex}") from None


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
    try:
        return runs.run_normalize_audio(run)
    except RunCheckpointError as ex:
        raise RecipeError(str(ex)) from None


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
