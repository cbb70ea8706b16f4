"""Starts a model from the CNN and Transformer of a pretrained wav2vec 2.0 model.

Continued pretraining takes the encoder of a fairseq2 ``wav2vec2`` model (or of another
``wav2vec2_knnvq`` model) and trains it on with a freshly initialized quantizer. Both
families name their parts alike (``encoder_frontend``, ``encoder``, ``masker``,
``final_proj``, ``final_target_proj``), so the copy goes by parameter name:

- the encoder parts (:data:`ENCODER_PREFIXES`: the CNN feature extractor, the layer norms
  and projection of the frontend, the positional convolution, the Transformer and the
  mask embedding) must all be present with the same shapes;
- each contrastive projection (:data:`PROJECTION_PREFIXES`) is copied only if all its
  tensors fit, else it stays freshly initialized;
- the quantizer is never copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Final

import torch
from torch import Tensor
from torch.nn import Module

from w2v_knnvq.wav2vec2.config import WAV2VEC2_KNNVQ_ARCHS
from w2v_knnvq.wav2vec2.factory import create_wav2vec2_knnvq_model

ENCODER_PREFIXES: Final = ("encoder_frontend.", "encoder.", "masker.")
"""The parameters that must all fit: what makes the encoder."""

PROJECTION_PREFIXES: Final = ("final_proj.", "final_target_proj.")
"""The parameters copied only where their shapes agree."""

_MAX_LISTED_DIFFERENCES = 3

Shapes = dict[str, tuple[int, ...]]


class WarmStartError(ValueError):
    """Raised when a pretrained model's encoder does not fit the model to initialize."""

    def __init__(self, message: str, *, differences: list[str], matching_archs: list[str]) -> None:
        super().__init__(message)

        self.differences = differences
        """The tensors that differ, each with both shapes."""

        self.matching_archs = matching_archs
        """The architectures of this family whose encoder would fit."""


@dataclass(kw_only=True)
class WarmStartSummary:
    """What :func:`copy_pretrained_encoder` copied."""

    copied_parts: list[str] = field(default_factory=list)
    """The modules copied, e.g. ``encoder_frontend.feature_extractor``, ``encoder``."""

    num_copied_tensors: int = 0

    fresh_parts: list[str] = field(default_factory=list)
    """The modules kept freshly initialized, each with the reason."""

    def describe(self) -> str:
        """:returns: One sentence for the log."""
        fresh = "; ".join(self.fresh_parts) or "nothing"

        return (
            f"copied {', '.join(self.copied_parts)} ({self.num_copied_tensors} tensors); freshly initialized: {fresh}"
        )


def copy_pretrained_encoder(model: Module, pretrained_state: Mapping[str, Tensor], *, source: str) -> WarmStartSummary:
    """Copies the encoder of a pretrained wav2vec 2.0 model into ``model``, and its
    contrastive projections where their shapes agree; ``model``'s quantizer is untouched.

    :param model: A ``wav2vec2_knnvq`` or ``wav2vec2`` pretraining model.
    :param pretrained_state: The state dict of the pretrained model.
    :param source: How messages name the pretrained model (its card or checkpoint path).

    :raises WarmStartError: if a tensor of the encoder is missing on either side or has
        another shape; the message names the tensor, both shapes and an architecture of
        this family that would fit.
    """
    model_state = model.state_dict()

    _check_encoder(model_state, pretrained_state, source)

    encoder_keys = [key for key in model_state if key.startswith(ENCODER_PREFIXES)]

    copied = {key: pretrained_state[key] for key in encoder_keys}

    reasons = {}

    for prefix in PROJECTION_PREFIXES:
        keys = [key for key in model_state if key.startswith(prefix)]

        mismatch = _first_mismatch(keys, model_state, pretrained_state)
        if mismatch is None:
            copied.update((key, pretrained_state[key]) for key in keys)
        else:
            reasons[prefix.rstrip(".")] = mismatch

    # `load_state_dict` copies into the existing tensors, converting dtype and device.
    model.load_state_dict(copied, strict=False)

    copied_parts = _parts(copied)

    fresh_parts = [
        f"{part} ({reasons[part]})" if part in reasons else part
        for part in _parts(model_state)
        if part not in copied_parts
    ]

    return WarmStartSummary(copied_parts=copied_parts, num_copied_tensors=len(copied), fresh_parts=fresh_parts)


def _check_encoder(model_state: Mapping[str, Tensor], pretrained_state: Mapping[str, Tensor], source: str) -> None:
    expected = _encoder_shapes(model_state)

    found = _encoder_shapes(pretrained_state)

    differences = _list_differences(found, expected)
    if not differences:
        return

    archs = matching_archs(found)

    if archs:
        fix = f"Build the model with an architecture whose encoder matches it: {' or '.join(archs)}."
    else:
        fix = "No architecture of this family matches it; give the model the `encoder_config` of the pretrained model."

    raise WarmStartError(
        f"The encoder of the pretrained model {source} does not fit the model to initialize: {describe_differences(differences)}. {fix}",
        differences=differences,
        matching_archs=archs,
    )


def describe_differences(differences: list[str]) -> str:
    """:returns: The first few of ``differences`` and how many more there are."""
    listed = "; ".join(differences[:_MAX_LISTED_DIFFERENCES])

    num_more = len(differences) - _MAX_LISTED_DIFFERENCES

    return f"{listed} (and {num_more} more)" if num_more > 0 else listed


def matching_archs(encoder_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """:returns: The registered ``wav2vec2_knnvq`` architectures whose encoder has exactly
    ``encoder_shapes``."""
    return [
        arch for arch in WAV2VEC2_KNNVQ_ARCHS if not _list_differences(dict(encoder_shapes), _arch_encoder_shapes(arch))
    ]


@cache
def _arch_encoder_shapes(arch: str) -> Shapes:
    # On the meta device even the large architectures cost no memory.
    with torch.device("meta"):
        model = create_wav2vec2_knnvq_model(WAV2VEC2_KNNVQ_ARCHS[arch]())

    return _encoder_shapes(model.state_dict())


def _encoder_shapes(state: Mapping[str, object]) -> Shapes:
    return {
        key: tuple(value.shape)
        for key, value in state.items()
        if key.startswith(ENCODER_PREFIXES) and isinstance(value, Tensor)
    }


def _list_differences(found: Shapes, expected: Shapes) -> list[str]:
    differences = []

    for key, shape in expected.items():
        found_shape = found.get(key)
        if found_shape is None:
            differences.append(f"`{key}` {shape} is missing from the pretrained model")
        elif found_shape != shape:
            differences.append(f"`{key}` has shape {found_shape} in the pretrained model but {shape} in this one")

    for key in sorted(found.keys() - expected.keys()):
        differences.append(f"`{key}` {found[key]} of the pretrained model has no counterpart in this one")

    return differences


def _first_mismatch(
    keys: list[str], model_state: Mapping[str, Tensor], pretrained_state: Mapping[str, Tensor]
) -> str | None:
    """:returns: Why the tensors ``keys`` of ``model_state`` cannot be copied, or ``None``."""
    for key in keys:
        pretrained = pretrained_state.get(key)

        if pretrained is None:
            return f"`{key}` is missing from the pretrained model"

        if pretrained.shape != model_state[key].shape:
            return f"`{key}` has shape {tuple(pretrained.shape)} in the pretrained model but {tuple(model_state[key].shape)} in this one"

    return None


def _part(key: str) -> str:
    """The module a parameter belongs to, as the log names it: ``encoder_frontend.pos_encoder``
    for the frontend's parts, ``masker.temporal_mask_embed``, else the top-level module."""
    names = key.split(".")

    return ".".join(names[:2]) if names[0] in ("encoder_frontend", "masker") else names[0]


def _parts(state: Mapping[str, object]) -> list[str]:
    """The parts of ``state`` in the order of its keys."""
    return list(dict.fromkeys(_part(key) for key in state))
