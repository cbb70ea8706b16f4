"""Typed access to the ``wav2vec2_knnvq`` family through fairseq2's model hub."""

from __future__ import annotations

from fairseq2.models import ModelHubAccessor

from w2v_knnvq.wav2vec2.config import WAV2VEC2_KNNVQ_FAMILY, Wav2Vec2KnnVqConfig
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel

get_wav2vec2_knnvq_model_hub = ModelHubAccessor(WAV2VEC2_KNNVQ_FAMILY, Wav2Vec2KnnVqModel, Wav2Vec2KnnVqConfig)
