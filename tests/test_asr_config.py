"""The fine-tuning recipe's configuration: what it validates when fairseq2 reads it, and the
model it refuses when fairseq2 built it without the values the recipe completes at run time."""

from __future__ import annotations

import pytest

from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, create_wav2vec2_asr_model
from fairseq2.recipe.config import ModelSection
from fairseq2.recipe.error import RecipeError

from recipes.wav2vec2_knnvq.asr.config import AsrRecipeConfig
from recipes.wav2vec2_knnvq.asr.recipe import _check_completed_model
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS


def _errors(config_overrides: object) -> str:
    config = AsrRecipeConfig()

    config.model.config_overrides = config_overrides

    return str(config.validate())


def test_the_completed_overrides_must_have_their_form() -> None:
    assert _errors(None) == _errors({"encoder_config": {"dropout_p": 0.1}, "target_vocab_size": 12}) == ""

    assert "`model.config_overrides` must be a mapping of model configuration fields, but is of type `str`" in _errors("x")  # fmt: skip
    assert "`model.config_overrides.encoder_config` must be a mapping of encoder fields, but is of type `int`" in _errors({"encoder_config": 3})  # fmt: skip
    assert "`model.config_overrides.target_vocab_size` must be an integer, but is '12' instead." in _errors({"target_vocab_size": "12"})  # fmt: skip


def test_a_model_built_without_the_completed_overrides_is_refused() -> None:
    config = Wav2Vec2AsrConfig(target_vocab_size=12)

    config.encoder_config = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]().encoder_config

    model = create_wav2vec2_asr_model(config)

    completed = {"target_vocab_size": 12, "encoder_config": {"model_dim": config.encoder_config.model_dim}}

    _check_completed_model(model, ModelSection(family="wav2vec2_asr", config_overrides=completed))

    for overrides in (None, {"encoder_config": completed["encoder_config"]}, {**completed, "target_vocab_size": 32}):
        with pytest.raises(RecipeError, match="built before the recipe set `target_vocab_size`"):
            _check_completed_model(model, ModelSection(family="wav2vec2_asr", config_overrides=overrides))
