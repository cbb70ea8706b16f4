"""Builds :class:`Wav2Vec2KnnVqModel` from a :class:`Wav2Vec2KnnVqConfig`."""

from __future__ import annotations

from fairseq2.error import NotSupportedError
from fairseq2.gang import get_current_gangs
from fairseq2.models.transformer import TransformerEncoder
from fairseq2.models.wav2vec2 import (
    StandardWav2Vec2Masker,
    Wav2Vec2EncoderFactory,
    Wav2Vec2Frontend,
    Wav2Vec2Masker,
)
from fairseq2.utils.validation import ValidationError

from w2v_knnvq.quantizer import KnnGroup, VectorQuantizer
from w2v_knnvq.wav2vec2.config import Wav2Vec2KnnVqConfig
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


def create_wav2vec2_knnvq_model(config: Wav2Vec2KnnVqConfig) -> Wav2Vec2KnnVqModel:
    return Wav2Vec2KnnVqFactory(config).create_model()


class Wav2Vec2KnnVqFactory:
    """Composes fairseq2's wav2vec 2.0 encoder (:class:`Wav2Vec2EncoderFactory`) and
    standard masker with a :class:`VectorQuantizer`, as fairseq2's ``wav2vec2_asr``
    factory composes the encoder with a CTC head."""

    def __init__(self, config: Wav2Vec2KnnVqConfig) -> None:
        # Configurations built in code skip fairseq2's validation of asset cards and
        # recipe sections; a mismatched quantizer would only fail in forward.
        result = config.validate()
        if result.has_error():
            raise ValidationError(result)

        self._config = config

        self._encoder_factory = Wav2Vec2EncoderFactory(config.encoder_config)

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
            quantizer_encoder_grad=config.quantizer_encoder_grad,
            final_proj_bias=config.final_proj_bias,
            num_distractors=config.num_distractors,
            logit_temp=config.logit_temp,
        )

    def create_encoder_frontend(self) -> Wav2Vec2Frontend:
        return self._encoder_factory.create_encoder_frontend()

    def create_encoder(self) -> TransformerEncoder:
        return self._encoder_factory.create_encoder()

    def create_masker(self) -> Wav2Vec2Masker:
        config = self._config

        return StandardWav2Vec2Masker(
            config.encoder_config.model_dim,
            config.temporal_mask_span_len,
            config.max_temporal_mask_prob,
            config.min_num_temporal_mask_spans,
            config.spatial_mask_span_len,
            config.max_spatial_mask_prob,
            config.min_num_spatial_mask_spans,
        )

    def create_quantizer(self) -> VectorQuantizer:
        return VectorQuantizer(self._config.quantizer_config(), process_group=_data_parallel_process_group())


def _data_parallel_process_group() -> KnnGroup:
    """The data-parallel gang that fairseq2 builds the model under, as the process group of a
    global KNN: ``None`` (this rank alone) when the gang has one process in a larger world of
    tensor or pipeline parallelism; torch's default group when fairseq2 set up no gangs."""
    gangs = get_current_gangs()

    if gangs.root.size == 1:
        return "default"

    if gangs.dp.size == 1:
        return None

    try:
        return gangs.dp.as_process_group()
    except NotSupportedError:
        return None
