"""FSDP, activation checkpointing and ``torch.compile`` of the ``wav2vec2_knnvq`` family:
the Transformer layers are wrapped as in fairseq2's ``wav2vec2`` family, the quantizer is a
float32 unit of its own, and the CNN stays in the root unit."""

from __future__ import annotations

from typing import Any

from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import Module

from fairseq2.gang import get_current_gangs
from fairseq2.models.utils.ac import apply_layerwise_ac
from fairseq2.models.utils.fsdp import apply_layerwise_fsdp
from fairseq2.nn.fsdp import FSDPParameterInitializer, FSDPWrapper
from fairseq2.nn.utils.module import broadcast_module

from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


def apply_fsdp_to_wav2vec2_knnvq(model: Wav2Vec2KnnVqModel, granularity: str, wrapper: FSDPWrapper) -> Module:
    """:param granularity: ``layer`` wraps each Transformer layer, ``stack`` the whole encoder.

    With FSDP2 the quantizer is a unit of its own that keeps its parameters in float32 under
    any mixed precision (:func:`shard_in_float32`); the rest of the model follows the trainer's
    policy."""
    if granularity == "layer":
        apply_layerwise_fsdp(model.encoder.layers, wrapper)
    elif granularity == "stack":
        model.register_module("encoder", wrapper(model.encoder))
    else:
        raise ValueError(f"`granularity` must be `layer` or `stack`, but is `{granularity}` instead.")

    shard_in_float32(model.quantizer, like=model.encoder)

    return model


def shard_in_float32(module: Module, *, like: Module) -> None:
    """Shards ``module`` with FSDP2 over the device mesh of the already sharded ``like``, with a
    policy that casts nothing: its parameters stay float32 (a bf16 codebook and temperature
    would move ``t`` in 1.5% steps and the cosine logits by ``1/(128 t)``).

    A module still on the meta device is materialized and, as every rank's must be equal,
    broadcast from rank 0 first (FSDP1 shards no DTensor: nothing is done then).
    """
    reference = next(like.parameters(), None)

    if not isinstance(reference, DTensor):
        return

    gangs = get_current_gangs()

    if any(tensor.is_meta for tensor in (*module.parameters(), *module.buffers())):
        FSDPParameterInitializer(gangs.dp.device, skip_init=False)(module)

    broadcast_module(module, gangs.dp)

    fully_shard(module, mesh=reference.device_mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=False)


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
