"""Checks that a checkpoint fits the requested ``wav2vec2_knnvq`` model before loading."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import cast

import torch
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY

from w2v_knnvq.wav2vec2.config import (
    WAV2VEC2_KNNVQ_ARCHS,
    WAV2VEC2_KNNVQ_FAMILY,
    Wav2Vec2KnnVqConfig,
)
from w2v_knnvq.wav2vec2.factory import create_wav2vec2_knnvq_model

Shapes = dict[str, tuple[int, ...]]

# Keys of fairseq2's (and fairseq's) Gumbel quantizer, absent from this family.
_GUMBEL_QUANTIZER_KEYS = ("quantizer.entries", "quantizer.vars", "quantizer.weight_proj.weight")

_MAX_LISTED_DIFFERENCES = 3


class Wav2Vec2KnnVqCheckpointError(ValueError):
    """Raised when a checkpoint does not hold the requested ``wav2vec2_knnvq`` model."""


def convert_wav2vec2_knnvq_state_dict(state_dict: dict[str, object], config: Wav2Vec2KnnVqConfig) -> dict[str, object]:
    """Unwrap ``state_dict`` and check that its keys and shapes are those of the
    model ``config`` describes.

    :raises Wav2Vec2KnnVqCheckpointError: if the checkpoint holds a stock
        wav2vec 2.0 model, another architecture, or another quantizer method;
        the message names both sides.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = cast(dict[str, object], state_dict["model"])

    consume_prefix_in_state_dict_if_present(state_dict, prefix="module.")

    expected_shapes = _expected_shapes(config)

    # Naming the requested architecture builds every registered one on the meta
    # device, so only a failing load pays for it.
    def requested() -> str:
        return _describe_config(config, expected_shapes)

    if any(key in state_dict for key in _GUMBEL_QUANTIZER_KEYS):
        raise Wav2Vec2KnnVqCheckpointError(
            f"The checkpoint holds a {WAV2VEC2_FAMILY} model with a Gumbel quantizer, but a {WAV2VEC2_KNNVQ_FAMILY} model ({requested()}) was requested. "
            f"Load it with the {WAV2VEC2_FAMILY} family, or train a {WAV2VEC2_KNNVQ_FAMILY} model."
        )

    checkpoint_shapes = {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, Tensor)}

    if not any(key.startswith("encoder_frontend.") for key in checkpoint_shapes):
        raise Wav2Vec2KnnVqCheckpointError(
            f"The checkpoint holds no wav2vec 2.0 model (it has no `encoder_frontend`), but a {WAV2VEC2_KNNVQ_FAMILY} model ({requested()}) was requested. "
            "Check the checkpoint path and the model family of the asset card."
        )

    if not any(key.startswith("quantizer.") for key in checkpoint_shapes):
        raise Wav2Vec2KnnVqCheckpointError(
            f"The checkpoint holds a wav2vec 2.0 model without a quantizer, such as a wav2vec2_asr model, but a {WAV2VEC2_KNNVQ_FAMILY} model ({requested()}) was requested. "
            "Load it with its own family."
        )

    differences = _list_differences(checkpoint_shapes, expected_shapes)
    if differences:
        found = _describe_shapes(checkpoint_shapes)

        listed = "; ".join(differences[:_MAX_LISTED_DIFFERENCES])

        raise Wav2Vec2KnnVqCheckpointError(
            f"The checkpoint holds a {WAV2VEC2_KNNVQ_FAMILY} model of {found}, but the requested model is {requested()}. "
            f"They differ in {len(differences)} tensors, e.g. {listed}. Load the checkpoint with the architecture and `quantizer.method` it was trained with."
        )

    return state_dict


def _expected_shapes(config: Wav2Vec2KnnVqConfig) -> Shapes:
    with torch.device("meta"):
        model = create_wav2vec2_knnvq_model(config)

    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _fits(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether a tensor of shape ``found`` is the tensor of shape ``expected`` or, in a
    checkpoint written under FSDP, one data-parallel shard of it: FSDP splits dimension 0
    and fairseq2 checks each shard file this way before joining them."""
    if found == expected:
        return True

    return len(found) == len(expected) > 0 and found[1:] == expected[1:] and found[0] <= expected[0]


@cache
def _arch_shapes(arch: str, method: str) -> Shapes:
    config = WAV2VEC2_KNNVQ_ARCHS[arch]()

    config.quantizer.method = method

    return _expected_shapes(config)


def _match_arch(shapes: Shapes, method: str) -> str | None:
    # Only a Gumbel method with an annealed temperature keeps its step; the
    # registered architectures anneal nothing.
    shapes = {key: shape for key, shape in shapes.items() if key != "quantizer.gumbel_step"}

    for arch in WAV2VEC2_KNNVQ_ARCHS:
        if not _list_differences(shapes, _arch_shapes(arch, method)):
            return arch

    return None


def _describe_config(config: Wav2Vec2KnnVqConfig, shapes: Shapes) -> str:
    method = config.quantizer.method

    arch = _match_arch(shapes, method)

    return _describe(arch, config, method)


def _describe_shapes(shapes: Shapes) -> str:
    # The quantizer's parameters tell its kind of method apart: a frozen basis
    # for SimVQ, a learned temperature for the smoothed methods.
    if "quantizer.codebook.frozen" in shapes:
        kind, method = "SimVQ", "simvq"
    elif "quantizer.log_temperature" in shapes:
        kind, method = "smoothed", "softmax-knn-ce"
    else:
        kind, method = "hard", "ste-euclid"

    arch = _match_arch(shapes, method)
    if arch is None:
        return f"an unregistered architecture ({_summarize(shapes)}) with a {kind} quantizer"

    return f"architecture {arch} with a {kind} quantizer"


def _describe(arch: str | None, config: Wav2Vec2KnnVqConfig, method: str) -> str:
    if arch is None:
        encoder = config.encoder_config
        quantizer = config.quantizer

        return (
            f"an unregistered architecture (model_dim {encoder.model_dim}, {encoder.num_encoder_layers} layers, "
            f"{quantizer.num_codebooks}x{quantizer.codebook_size} codebooks of dim {quantizer.codebook_dim}) "
            f"with quantizer.method {method}"
        )

    return f"architecture {arch} with quantizer.method {method}"


def _summarize(shapes: Mapping[str, tuple[int, ...]]) -> str:
    codebook = shapes.get("quantizer.codebook.weight") or shapes.get("quantizer.codebook.frozen")

    model_dim = shapes.get("masker.temporal_mask_embed")

    num_layers = len({key.split(".")[2] for key in shapes if key.startswith("encoder.layers.")})

    parts = []

    if model_dim is not None:
        parts.append(f"model_dim {model_dim[0]}")

    parts.append(f"{num_layers} layers")

    if codebook is not None:
        parts.append(f"{codebook[0]}x{codebook[1]} codebooks of dim {codebook[2]}")

    return ", ".join(parts)


def _list_differences(found: Shapes, expected: Shapes) -> list[str]:
    differences = []

    for key, shape in expected.items():
        found_shape = found.get(key)
        if found_shape is None:
            differences.append(f"`{key}` is missing")
        elif not _fits(found_shape, shape):
            differences.append(f"`{key}` has shape {found_shape} instead of {shape}")

    for key in sorted(found.keys() - expected.keys()):
        differences.append(f"`{key}` is unexpected")

    return differences
