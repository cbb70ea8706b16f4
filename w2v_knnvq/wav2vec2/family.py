"""Registration of the ``wav2vec2_knnvq`` model family with fairseq2."""

from __future__ import annotations

from fairseq2.composition import register_model_family
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.wav2vec2.checkpoint import convert_wav2vec2_knnvq_state_dict
from w2v_knnvq.wav2vec2.config import (
    WAV2VEC2_KNNVQ_FAMILY,
    Wav2Vec2KnnVqConfig,
    register_wav2vec2_knnvq_configs,
)
from w2v_knnvq.wav2vec2.factory import create_wav2vec2_knnvq_model
from w2v_knnvq.wav2vec2.fsdp import (
    apply_ac_to_wav2vec2_knnvq,
    apply_fsdp_to_wav2vec2_knnvq,
    compile_wav2vec2_knnvq,
)
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


def register_wav2vec2_knnvq_family(container: DependencyContainer) -> None:
    """Register the family, its architectures, and its FSDP and activation
    checkpointing appliers (they wrap the encoder layers, as fairseq2's wav2vec2 does)."""
    register_model_family(
        container,
        WAV2VEC2_KNNVQ_FAMILY,
        kls=Wav2Vec2KnnVqModel,
        config_kls=Wav2Vec2KnnVqConfig,
        factory=create_wav2vec2_knnvq_model,
        state_dict_converter=convert_wav2vec2_knnvq_state_dict,
        fsdp_applier=apply_fsdp_to_wav2vec2_knnvq,
        layerwise_ac_applier=apply_ac_to_wav2vec2_knnvq,
        compiler=compile_wav2vec2_knnvq,
    )

    register_wav2vec2_knnvq_configs(container)
