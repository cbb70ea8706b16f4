"""FSDP, activation checkpointing and ``torch.compile`` of the ``wav2vec2_knnvq`` family:
the Transformer layers are wrapped as in fairseq2's ``wav2vec2`` family; the CNN and the
quantizer stay in the root unit.

fairseq2 gives every unit one mixed-precision policy: with ``trainer.mixed_precision.mode=static``
the quantizer's stored codebook and temperature take the trainer's dtype (its math still runs
in float32); ``mode=auto`` (autocast, which the quantizer switches off) keeps them float32. A
unit of its own with a float32 policy breaks fairseq2 0.8.1's broadcast of the root module on
a fresh start, which skips only the units that fairseq2's wrapper sharded."""

from __future__ import annotations

from typing import Any

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


def compile_wav2vec2_knnvq(model: Wav2Vec2KnnVqModel, *args: Any, **kwargs: Any) -> None:
    """``model.compile``: compiles each Transformer layer and the quantizer with
    ``torch.compile`` (the options of the recipe's ``compile_options``), as fairseq2 compiles
    its language models layer by layer and its own quantizer. The CNN runs once per batch and
    stays eager. A global KNN's collectives split the quantizer's graph, so it is compiled
    without ``fullgraph`` then; its chunked pass runs its loop eagerly."""
    modules = [*model.encoder.layers, getattr(model.encoder, "layer_norm", None)]

    for module in modules:
        if isinstance(module, Module):
            module.compile(*args, **kwargs)  # type: ignore[no-untyped-call]

    quantizer_options = dict(kwargs)

    if model.quantizer.config.knn_scope == "global":
        quantizer_options["fullgraph"] = False

    model.quantizer.compile(*args, **quantizer_options)  # type: ignore[no-untyped-call]
