"""How many audio samples a wav2vec 2.0 model needs: its CNN's frames and fairseq2's masker.

An utterance shorter than its CNN's receptive field gives no frame; one that gives too few
frames for the temporal masker makes fairseq2's ``compute_row_mask`` raise in the middle
of a run. The readers skip decoded audio shorter than these lengths as unusable, and the
recipes check their ``min_audio_len`` against them before training starts. The lengths
are read off the model's modules, so they hold for every family with fairseq2's
wav2vec 2.0 CNN (``wav2vec2_knnvq``, ``wav2vec2``, ``wav2vec2_asr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch
from torch.nn import Module

from fairseq2.models.wav2vec2 import StandardWav2Vec2Masker, Wav2Vec2EncoderConfig, Wav2Vec2FeatureExtractor

MAX_SEARCHED_FRAMES: Final = 1_000_000

ConvShape = tuple[int, int]
"""The kernel size and the stride of one convolution of the CNN."""


def config_conv_shapes(encoder_config: Wav2Vec2EncoderConfig) -> list[ConvShape]:
    return [(kernel_size, stride) for _, kernel_size, stride in encoder_config.feature_extractor_layer_descs]


def model_conv_shapes(model: Module) -> list[ConvShape]:
    """The convolutions of the wav2vec 2.0 CNN in ``model``.

    :raises ValueError: if ``model`` has no :class:`Wav2Vec2FeatureExtractor`.
    """
    for module in model.modules():
        if isinstance(module, Wav2Vec2FeatureExtractor):
            return [(kernel_size, stride) for _, kernel_size, stride in module.layer_descs]

    raise ValueError("`model` must hold a wav2vec 2.0 CNN (`Wav2Vec2FeatureExtractor`), but has none.")


def num_frames(num_samples: int, conv_shapes: Sequence[ConvShape]) -> int:
    """The number of frames that the CNN makes of ``num_samples``."""
    length = num_samples

    for kernel_size, stride in conv_shapes:
        if length < kernel_size:
            return 0

        length = (length - kernel_size) // stride + 1

    return length


def min_num_samples(conv_shapes: Sequence[ConvShape], num_frames: int = 1) -> int:
    """The fewest samples from which the CNN makes ``num_frames`` frames (1: its receptive
    field, 400 for wav2vec 2.0's CNN)."""
    length = num_frames

    for kernel_size, stride in reversed(conv_shapes):
        length = (length - 1) * stride + kernel_size

    return length


def min_masked_frames(span_len: int, max_mask_prob: float, min_num_spans: int) -> int:
    """The fewest frames of a row for which fairseq2's temporal masker draws its spans:
    more frames than ``span_len`` and at least ``min_num_spans`` spans, counted as
    ``compute_row_mask`` counts them (``max_mask_prob / span_len * (frames - 1)`` in float32).

    :raises ValueError: if no number of frames below :data:`MAX_SEARCHED_FRAMES` suffices.
    """

    def enough(frames: int) -> bool:
        num_spans = int(max_mask_prob / span_len * (torch.tensor(frames) - 1))

        return frames > span_len and num_spans >= min_num_spans

    low, high = span_len + 1, MAX_SEARCHED_FRAMES

    if not enough(high):
        raise ValueError(
            f"no sequence of fewer than {MAX_SEARCHED_FRAMES} frames takes {min_num_spans} mask spans of "
            f"{span_len} frames with a mask probability of {max_mask_prob}."
        )

    # The number of spans grows with the frames: the least that suffices is bisected.
    while low < high:
        middle = (low + high) // 2

        if enough(middle):
            high = middle
        else:
            low = middle + 1

    return low


def model_min_num_samples(model: Module, *, masked: bool) -> int:
    """The fewest samples of an utterance that ``model`` takes: its CNN's receptive field,
    or with ``masked`` (a training step) the frames its temporal masker needs, if it has one.
    """
    conv_shapes = model_conv_shapes(model)

    frames = 1

    if masked:
        for module in model.modules():
            if isinstance(module, StandardWav2Vec2Masker) and module.max_temporal_mask_prob > 0.0:
                frames = min_masked_frames(
                    module.temporal_span_len, module.max_temporal_mask_prob, module.min_num_temporal_mask_spans
                )

    return min_num_samples(conv_shapes, frames)


RECEPTIVE_FIELD: Final = min_num_samples(config_conv_shapes(Wav2Vec2EncoderConfig()))
"""The receptive field of wav2vec 2.0's CNN, which every architecture of this project
keeps: the fewest samples that give one frame."""
