"""FSDP and activation checkpointing of the ``wav2vec2_knnvq`` family: the Transformer
layers are wrapped as in fairseq2's ``wav2vec2`` family; the CNN and the quantizer stay
whole."""

from __future__ import annotations

from torch.nn import Module

from fairseq2.models.utils.ac import apply_layerwise_ac
from fairseq2.models.utils.fsdp import apply_layerwise_fsdp
from fairseq2.nn.fsdp import FSDPWrapper

from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


def apply_fsdp_to_wav2vec2_knnvq(model: Wav2Vec2KnnVqModel, granularity: str, wrapper: FSDPWrapper) -> Module:
    """:param granularity: ``layer`` wraps each Transformer layer, ``stack`` the whole encoder."""
    if granularity == "layer":
        apply_layerwise_fsdp(model.encoder.layers, wrapper)

        return model

    if granularity == "stack":
        model.register_module("encoder", wrapper(model.encoder))

        return model

    raise ValueError(f"`granularity` must be `layer` or `stack`, but is `{granularity}` instead.")


def apply_ac_to_wav2vec2_knnvq(model: Wav2Vec2KnnVqModel, every_nth_layer: int) -> Module:
    """Checkpoints the activations of every ``every_nth_layer``-th Transformer layer."""
    apply_layerwise_ac(model.encoder.layers, every_nth_layer)

    return model
