"""The eval-mode path from waveforms to codes of a pretraining model (``wav2vec2_knnvq``
or fairseq2's ``wav2vec2``): the CNN on padded batches, each utterance normalized as on
its own, and the argmax codes of its quantizer. Feature extraction and the SSL recipe's
validation both count codes this way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

import torch
from torch import Tensor

from fairseq2.models.wav2vec2 import GumbelWav2Vec2VectorQuantizer, Wav2Vec2FeatureExtractor, Wav2Vec2Model
from fairseq2.models.wav2vec2.feature_extractor import Wav2Vec2FeatureExtractionLayer

from w2v_knnvq.quantizer import VectorQuantizer
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel

PretrainingModel = Wav2Vec2KnnVqModel | Wav2Vec2Model
"""A pretraining model of this project's family or fairseq2's ``wav2vec2`` (Gumbel) family."""

PADDING_CODE: Final = -1
"""The code reported for padding frames."""


@dataclass(kw_only=True)
class CnnFeatures:
    """The layer-normed CNN features of N padded utterances, zero at padding frames."""

    features: Tensor
    """``(N, S, F)``."""

    frame_lens: list[int]
    """The number of real frames of each utterance."""

    @property
    def padding_mask(self) -> Tensor:
        """``(N, S)`` bool, ``True`` at real frames."""
        positions = torch.arange(self.features.size(1), device=self.features.device)

        return positions.unsqueeze(0) < torch.tensor(self.frame_lens, device=self.features.device).unsqueeze(1)


@dataclass(kw_only=True)
class FrameCodes:
    """The eval-mode codes of every frame of N padded utterances."""

    codes: Tensor
    """``(N, S, G)`` int64, :data:`PADDING_CODE` at padding frames."""

    individual_perplexity: Tensor | None
    """``(N, S, G)`` ``exp(-sum_m p_m log p_m)`` of a smoothed quantizer at each frame;
    ``None`` for hard quantizers and fairseq2's Gumbel quantizer."""

    padding_mask: Tensor
    """``(N, S)`` bool, ``True`` at real frames."""


def run_cnn(model: PretrainingModel, seqs: Tensor, seq_lens: Sequence[int]) -> CnnFeatures:
    """Runs the CNN of ``model`` and its layer norm on zero-padded waveforms, each
    utterance normalized as it would be on its own (:func:`_masked_group_norm`).

    :param seqs: ``(N, S_wav)`` waveforms, zero after ``seq_lens[i]`` samples.
    """
    raw_features, frame_lens = _run_feature_extractor(model.encoder_frontend.feature_extractor, seqs, seq_lens)

    cnn = CnnFeatures(features=raw_features, frame_lens=frame_lens)

    cnn.features = model.encoder_frontend.post_extract_layer_norm(raw_features) * cnn.padding_mask.unsqueeze(-1)

    return cnn


def quantize_frames(model: PretrainingModel, cnn: CnnFeatures) -> FrameCodes:
    """Quantizes every real frame of ``cnn`` with the eval-mode (argmax) quantizer of
    ``model``: a :class:`~w2v_knnvq.quantizer.VectorQuantizer` or fairseq2's Gumbel quantizer.

    :raises ValueError: if ``model`` is in training mode, where codes are sampled.
    """
    if model.training:
        raise ValueError(
            "`model` must be in eval mode to assign codes deterministically, but is in training mode instead."
        )

    padding_mask = cnn.padding_mask

    quantizer = model.quantizer

    perplexity: Tensor | None = None

    if isinstance(quantizer, VectorQuantizer):
        output = quantizer(cnn.features, padding_mask)

        codes, perplexity = output.codes, output.individual_perplexity
    elif isinstance(quantizer, GumbelWav2Vec2VectorQuantizer):
        batch_size, num_frames = cnn.features.shape[:2]

        # (N, S, G x V) -> (N, S, G, V), the logits whose argmax fairseq2's quantizer picks.
        logits = quantizer.entry_proj(cnn.features).view(batch_size, num_frames, quantizer.num_codebooks, -1)

        codes = logits.argmax(dim=-1)
    else:
        raise TypeError(
            f"The quantizer must be a `VectorQuantizer` or a `GumbelWav2Vec2VectorQuantizer`, but is a `{type(quantizer).__name__}` instead."
        )

    codes = codes.masked_fill(~padding_mask.unsqueeze(-1), PADDING_CODE)

    return FrameCodes(codes=codes, individual_perplexity=perplexity, padding_mask=padding_mask)


def _run_feature_extractor(extractor: object, seqs: Tensor, seq_lens: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Mirrors :class:`Wav2Vec2FeatureExtractor` in eval mode with a group norm
    that ignores padding.

    :param seqs: ``(N, S_wav)`` zero-padded waveforms.
    :returns: ``(N, S, F)`` raw CNN features and the frame count of each row.
    """
    if not isinstance(extractor, Wav2Vec2FeatureExtractor):
        raise ValueError(
            f"The model must read waveforms through a `Wav2Vec2FeatureExtractor`, but reads them through a `{type(extractor).__name__}` instead."
        )

    lengths = list(seq_lens)

    # (N, S_wav) -> (N, 1, S_wav)
    x = seqs.unsqueeze(1)

    for module, (_, kernel_size, stride) in zip(extractor.layers, extractor.layer_descs, strict=True):
        # `layers` is a `Sequential` of these.
        layer = cast(Wav2Vec2FeatureExtractionLayer, module)

        x = layer.conv(x)

        lengths = [math.floor((length - kernel_size) / stride) + 1 for length in lengths]

        if layer.group_norm is not None:
            x = _masked_group_norm(x, lengths, layer.group_norm)

        if layer.layer_norm is not None:
            x = layer.layer_norm(x.transpose(1, 2)).transpose(1, 2)

        x = layer.activation(x)

    # (N, F, S) -> (N, S, F)
    return x.transpose(1, 2), lengths


def _masked_group_norm(x: Tensor, lengths: list[int], norm: torch.nn.GroupNorm) -> Tensor:
    """Group norm over the first ``lengths[i]`` time steps of each row, in float32 as
    fairseq2's ``Float32GroupNorm``.

    :param x: ``(N, C, S)``. :returns: ``(N, C, S)``; padding steps are garbage-free
        but meaningless.
    """
    batch_size, num_channels, num_steps = x.shape

    num_groups = norm.num_groups

    mask = torch.arange(num_steps, device=x.device).unsqueeze(0) < torch.tensor(lengths, device=x.device).unsqueeze(1)

    # (N, S) -> (N, 1, 1, S)
    mask = mask.view(batch_size, 1, 1, num_steps).float()

    # (N, C, S) -> (N, G, C/G, S)
    grouped = x.float().view(batch_size, num_groups, num_channels // num_groups, num_steps)

    count = mask.sum(dim=3, keepdim=True) * (num_channels // num_groups)

    mean = (grouped * mask).sum(dim=(2, 3), keepdim=True) / count

    var = (((grouped - mean) ** 2) * mask).sum(dim=(2, 3), keepdim=True) / count

    normed = ((grouped - mean) / torch.sqrt(var + norm.eps)).view(batch_size, num_channels, num_steps)

    if norm.affine:
        normed = normed * norm.weight.float().view(1, -1, 1) + norm.bias.float().view(1, -1, 1)

    return normed.type_as(x)
