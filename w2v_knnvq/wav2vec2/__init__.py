"""The ``wav2vec2_knnvq`` fairseq2 model family: wav2vec 2.0 with the paper's quantizers."""

from __future__ import annotations

from w2v_knnvq.wav2vec2.checkpoint import (
    Wav2Vec2KnnVqCheckpointError as Wav2Vec2KnnVqCheckpointError,
)
from w2v_knnvq.wav2vec2.checkpoint import (
    convert_wav2vec2_knnvq_state_dict as convert_wav2vec2_knnvq_state_dict,
)
from w2v_knnvq.wav2vec2.config import WAV2VEC2_KNNVQ_ARCHS as WAV2VEC2_KNNVQ_ARCHS
from w2v_knnvq.wav2vec2.config import WAV2VEC2_KNNVQ_FAMILY as WAV2VEC2_KNNVQ_FAMILY
from w2v_knnvq.wav2vec2.config import Wav2Vec2KnnVqConfig as Wav2Vec2KnnVqConfig
from w2v_knnvq.wav2vec2.config import (
    register_wav2vec2_knnvq_configs as register_wav2vec2_knnvq_configs,
)
from w2v_knnvq.wav2vec2.factory import Wav2Vec2KnnVqFactory as Wav2Vec2KnnVqFactory
from w2v_knnvq.wav2vec2.factory import (
    create_wav2vec2_knnvq_model as create_wav2vec2_knnvq_model,
)
from w2v_knnvq.wav2vec2.family import (
    register_wav2vec2_knnvq_family as register_wav2vec2_knnvq_family,
)
from w2v_knnvq.wav2vec2.hub import (
    get_wav2vec2_knnvq_model_hub as get_wav2vec2_knnvq_model_hub,
)
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqLoss as Wav2Vec2KnnVqLoss
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel as Wav2Vec2KnnVqModel
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqOutput as Wav2Vec2KnnVqOutput
