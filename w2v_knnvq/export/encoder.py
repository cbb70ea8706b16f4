"""The wav2vec 2.0 encoder of a ``wav2vec2_knnvq``, fairseq2 ``wav2vec2`` or
``wav2vec2_asr`` model in the module layout that Hugging Face ``transformers`` and
torchaudio share (feature extractor, feature projection, positional convolution,
Transformer layers).

Only the encoder is mapped here: the quantizer and the contrastive projections are
pretraining machinery that neither library's ``Wav2Vec2Model`` holds, and the CTC head
of a ``wav2vec2_asr`` model is added by :mod:`w2v_knnvq.export.ctc`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import Module

from fairseq2.models.transformer import TransformerNormOrder
from fairseq2.models.wav2vec2 import Wav2Vec2EncoderConfig


class ExportError(ValueError):
    """A model that the target library cannot represent; the message says which setting and why."""


class EncoderModelConfig(Protocol):
    """The configuration of a model built on a wav2vec 2.0 encoder: ``wav2vec2_knnvq``
    (:class:`~w2v_knnvq.wav2vec2.Wav2Vec2KnnVqConfig`) and fairseq2's ``wav2vec2`` and
    ``wav2vec2_asr`` configurations all hold one."""

    @property
    def encoder_config(self) -> Wav2Vec2EncoderConfig: ...

    @property
    def temporal_mask_span_len(self) -> int: ...


@dataclass(frozen=True, kw_only=True)
class EncoderLayout:
    """The settings of the shared layout that a wav2vec 2.0 encoder maps to."""

    conv_layers: list[tuple[int, int, int]]
    """(channels, kernel, stride) of each CNN layer."""

    conv_bias: bool

    conv_layer_norm: bool
    """``True``: layer norm after every conv; ``False``: group norm after the first only."""

    layer_norm_first: bool
    """Pre-norm Transformer layers with a final layer norm (else post-norm with a
    layer norm after the positional convolution)."""


def describe_encoder(config: EncoderModelConfig) -> EncoderLayout:
    """:raises ExportError: if the encoder has a part the shared layout lacks."""
    encoder = config.encoder_config

    unsupported = []

    if encoder.use_fbank:
        unsupported.append("`use_fbank=True` (filterbank input; both libraries read waveforms)")

    if encoder.use_conformer:
        unsupported.append("`use_conformer=True` (Conformer blocks)")

    if encoder.pos_encoder_type != "conv":
        unsupported.append(
            f"`pos_encoder_type={encoder.pos_encoder_type}` (only the convolutional position encoder exists there)"
        )

    if encoder.pos_encoder_depth != 1:
        unsupported.append(
            f"`pos_encoder_depth={encoder.pos_encoder_depth}` (only a single positional convolution exists there)"
        )

    layer_norm_first = encoder.norm_order == TransformerNormOrder.PRE

    if encoder.norm_order not in (TransformerNormOrder.PRE, TransformerNormOrder.POST):
        unsupported.append(f"`norm_order={encoder.norm_order}`")
    elif layer_norm_first and encoder.layer_norm_features:
        unsupported.append(
            "`layer_norm_features=True` with `norm_order=PRE` (a pre-norm encoder there has no layer norm after the positional convolution)"
        )
    elif not layer_norm_first and not encoder.layer_norm_features:
        unsupported.append(
            "`layer_norm_features=False` with `norm_order=POST` (a post-norm encoder there always has a layer norm after the positional convolution)"
        )

    # YAML gives lists; the layout holds tuples.
    conv_layers = [(channels, kernel, stride) for channels, kernel, stride in encoder.feature_extractor_layer_descs]

    if conv_layers and conv_layers[-1][0] != encoder.feature_dim:
        unsupported.append(
            f"`feature_dim={encoder.feature_dim}` differs from the last CNN layer's {conv_layers[-1][0]} channels"
        )

    if unsupported:
        raise ExportError(
            "The model cannot be exported to a Hugging Face or torchaudio wav2vec 2.0 model: "
            + "; ".join(unsupported)
            + "."
        )

    return EncoderLayout(
        conv_layers=conv_layers,
        conv_bias=encoder.feature_extractor_bias,
        conv_layer_norm=encoder.feature_extractor_layer_norm_convs,
        layer_norm_first=layer_norm_first,
    )


# fairseq2 names (after the frontend/encoder prefixes are handled) to the shared names.
_LAYER_KEY_MAP = (
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\."), r"encoder.layers.\1.attention.\2_proj."),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\."), r"encoder.layers.\1.attention.out_proj."),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\."), r"encoder.layers.\1.layer_norm."),
    (re.compile(r"^encoder\.layers\.(\d+)\.ffn\.inner_proj\."), r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (re.compile(r"^encoder\.layers\.(\d+)\.ffn\.output_proj\."), r"encoder.layers.\1.feed_forward.output_dense."),
    (re.compile(r"^encoder\.layers\.(\d+)\.ffn_layer_norm\."), r"encoder.layers.\1.final_layer_norm."),
    (
        re.compile(r"^encoder_frontend\.feature_extractor\.layers\.(\d+)\.conv\."),
        r"feature_extractor.conv_layers.\1.conv.",
    ),
    (
        re.compile(r"^encoder_frontend\.feature_extractor\.layers\.(\d+)\.(?:group_norm|layer_norm)\."),
        r"feature_extractor.conv_layers.\1.layer_norm.",
    ),
    (re.compile(r"^encoder_frontend\.post_extract_layer_norm\."), r"feature_projection.layer_norm."),
    (re.compile(r"^encoder_frontend\.model_dim_proj\."), r"feature_projection.projection."),
    (re.compile(r"^encoder_frontend\.pos_encoder\.conv\.bias$"), r"encoder.pos_conv_embed.conv.bias"),
    (re.compile(r"^encoder_frontend\.layer_norm\."), r"encoder.layer_norm."),
    (re.compile(r"^encoder\.layer_norm\."), r"encoder.layer_norm."),
)

# Parts of the model that the exported encoder leaves behind: the pretraining machinery
# and, of a CTC model, the head (`final_proj`).
_DROPPED_PREFIXES = ("quantizer.", "final_proj.", "final_target_proj.", "masker.")

_POS_CONV_PREFIX = "encoder_frontend.pos_encoder.conv."

_POS_CONV_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
_POS_CONV_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"


def encoder_state_dict(model: Module, config: EncoderModelConfig) -> dict[str, Tensor]:
    """Returns the encoder's weights under the shared names, with the root of Hugging
    Face's ``Wav2Vec2Model`` (``feature_extractor.``, ``feature_projection.``, ``encoder.``).

    The positional convolution is weight-normalized over dim 2 in all three
    libraries, so its magnitude and direction carry over unchanged; an identity
    projection stands in for fairseq2's absent one when ``feature_dim == model_dim``.

    :raises ExportError: if the encoder cannot be represented.
    """
    describe_encoder(config)

    source = {key: value.detach().clone() for key, value in model.state_dict().items()}

    exported: dict[str, Tensor] = {}

    pos_conv_g = source.pop(_POS_CONV_PREFIX + "weight_g", None)
    pos_conv_v = source.pop(_POS_CONV_PREFIX + "weight_v", None)
    pos_conv_weight = source.pop(_POS_CONV_PREFIX + "weight", None)

    if pos_conv_v is None:
        if pos_conv_weight is None:
            raise ExportError("The model has no positional convolution weight; it is not a wav2vec 2.0 encoder.")

        pos_conv_v = pos_conv_weight
        pos_conv_g = torch.linalg.vector_norm(pos_conv_weight, dim=(0, 1), keepdim=True)

    exported[_POS_CONV_G] = pos_conv_g
    exported[_POS_CONV_V] = pos_conv_v

    for key, value in source.items():
        if key.startswith(_DROPPED_PREFIXES):
            continue

        for pattern, replacement in _LAYER_KEY_MAP:
            new_key, num_subs = pattern.subn(replacement, key)

            if num_subs:
                exported[new_key] = value

                break
        else:
            raise ExportError(
                f"The model's tensor `{key}` has no counterpart in a Hugging Face or torchaudio wav2vec 2.0 encoder."
            )

    if "feature_projection.projection.weight" not in exported:
        dim = config.encoder_config.model_dim

        exported["feature_projection.projection.weight"] = torch.eye(dim)
        exported["feature_projection.projection.bias"] = torch.zeros(dim)

    return exported


def mask_embedding(model: Module) -> Tensor | None:
    """:returns: ``(model_dim,)`` the learned embedding of masked frames, if any."""
    embed = model.state_dict().get("masker.temporal_mask_embed")

    return None if embed is None else embed.detach().clone()
