"""Builds :class:`Wav2Vec2KnnVqModel` from a :class:`Wav2Vec2KnnVqConfig`."""

from __future__ import annotations

from typing_extensions import override

from fairseq2.models.wav2vec2 import Wav2Vec2Factory
from fairseq2.utils.validation import ValidationError

from w2v_knnvq.quantizer import VectorQuantizer
from w2v_knnvq.wav2vec2.config import Wav2Vec2KnnVqConfig
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


def create_wav2vec2_knnvq_model(config: Wav2Vec2KnnVqConfig) -> Wav2Vec2KnnVqModel:
    return Wav2Vec2KnnVqFactory(config).create_model()


class Wav2Vec2KnnVqFactory(Wav2Vec2Factory):
    """fairseq2's wav2vec 2.0 factory with the quantizer and model class swapped;
    the frontend, encoder and masker come from the parent unchanged."""

    _config: Wav2Vec2KnnVqConfig

    def __init__(self, config: Wav2Vec2KnnVqConfig) -> None:
        # Configurations built in code skip fairseq2's validation of asset cards
        # and recipe sections; a mismatched quantizer would only fail in forward.
        result = config.validate()
        if result.has_error():
            raise ValidationError(result)

        super().__init__(config)

    @override
    def create_model(self) -> Wav2Vec2KnnVqModel:
        config = self._config

        return Wav2Vec2KnnVqModel(
            config.encoder_config.model_dim,
            self.create_encoder_frontend(),
            self.create_encoder(),
            self.create_masker(),
            self.create_quantizer(),
            config.final_dim,
            regularizer_weight=config.regularizer_weight,
            final_proj_bias=config.final_proj_bias,
            num_distractors=config.num_distractors,
            logit_temp=config.logit_temp,
            quantizer_encoder_grad=config.quantizer_encoder_grad,
        )

    @override
    def create_quantizer(self) -> VectorQuantizer:  # type: ignore[override]
        return VectorQuantizer(self._config.quantizer)
