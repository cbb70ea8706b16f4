"""The pretraining loss of a wav2vec 2.0 model and the codes its quantizer assigns.

Both fairseq2's ``wav2vec2`` family (Gumbel quantizer, diversity loss) and the
project's ``wav2vec2_knnvq`` family (any quantizer of the paper, its regularizer)
are supported; the metrics see one normalized view of either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor
from torch.nn import Module

from fairseq2.datasets import SequenceBatch
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2 import Wav2Vec2Model
from fairseq2.nn import BatchLayout

from recipes.wav2vec2_knnvq.ssl.metrics import (
    update_accuracy,
    update_batch_metrics,
    update_losses,
    update_quantizer_stats,
)
from w2v_knnvq.quantizer import individual_perplexity
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel


@dataclass(kw_only=True)
class SslLossSection:
    diversity_loss_weight: float = 0.1
    """The weight of the diversity loss of fairseq2's Gumbel quantizer. Models of
    the ``wav2vec2_knnvq`` family weight their regularizer with the model config's
    ``regularizer_weight`` instead."""

    feature_penalty_weight: float = 10.0
    """The weight of the L2 penalty on the CNN features."""


@dataclass(frozen=True)
class CodebookShape:
    num_codebooks: int
    """G"""

    codebook_size: int
    """M"""


def get_codebook_shape(model: Module) -> CodebookShape:
    """:raises TypeError: if ``model`` is no wav2vec 2.0 pretraining model."""
    if isinstance(model, Wav2Vec2KnnVqModel):
        config = model.quantizer.config

        return CodebookShape(config.num_codebooks, config.codebook_size)

    if isinstance(model, Wav2Vec2Model):
        return CodebookShape(model.quantizer.num_codebooks, model.quantizer.num_codebook_entries)

    raise TypeError(
        f"The model must be a wav2vec 2.0 pretraining model (family `wav2vec2_knnvq` or `wav2vec2`), but is of type `{type(model)}`."
    )


@final
class SslCriterion:
    """Computes the pretraining loss of a batch and records its metrics."""

    def __init__(self, model: Module, base_model: Module, section: SslLossSection) -> None:
        """
        :param model: The model to call, possibly wrapped for data parallelism.
        :param base_model: The unwrapped model.
        """
        get_codebook_shape(base_model)

        self._model = model
        self._base_model = base_model
        self._section = section

    def __call__(self, batch: SequenceBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        """:returns: The loss summed over the masked frames and their number."""
        seqs, seqs_layout = batch.as_input()

        section = self._section

        if isinstance(self._base_model, Wav2Vec2KnnVqModel):
            loss, output = self._model(
                seqs, seqs_layout, features_penalty_weight=section.feature_penalty_weight
            )

            quantizer_loss = loss.regularizer

            quantizer_output = output.quantizer_output

            hard_perplexity = quantizer_output.hard_perplexity
            soft_perplexity = quantizer_output.soft_perplexity
            temperature = quantizer_output.temperature
            code_usage = output.code_usage
        else:
            loss, output = self._model(
                seqs,
                seqs_layout,
                diversity_weight=section.diversity_loss_weight,
                features_penalty_weight=section.feature_penalty_weight,
            )

            quantizer_loss = loss.diversity

            quantizer = self._base_model.quantizer

            # The Gumbel quantizer reports perplexities summed over codebooks;
            # its one-hot choices give them per codebook.
            # (N x S_msk, G x V) -> (N x S_msk, G, V)
            choices = output.quantizer_output.cb.view(-1, quantizer.num_codebooks, quantizer.num_codebook_entries)

            hard_perplexity = _perplexity(choices.float().mean(dim=0))
            soft_perplexity = None
            temperature = output.quantizer_output.temperature
            code_usage = (choices.sum(dim=0) > 0).float().mean(dim=-1)

        num_targets = output.num_targets

        update_losses(
            metric_bag,
            aggregate=loss.aggregate,
            contrastive=loss.contrastive,
            quantizer=quantizer_loss,
            features_penalty=loss.features_penalty,
            num_targets=num_targets,
        )

        update_accuracy(metric_bag, output.logits)

        update_quantizer_stats(
            metric_bag,
            hard_perplexity=hard_perplexity,
            soft_perplexity=soft_perplexity,
            temperature=temperature,
            code_usage=code_usage,
        )

        update_batch_metrics(metric_bag, batch)

        return loss.aggregate, num_targets


def _perplexity(probs: Tensor) -> Tensor:
    """:param probs: ``(G, M)`` distributions. :returns: ``(G,)`` exp(entropy)."""
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1)

    return torch.exp(entropy)


@dataclass
class UtteranceQuantization:
    """The eval-mode quantization of every frame of one utterance."""

    codes: Tensor
    """``(S_enc, G)`` code of each frame in each codebook."""

    individual_perplexity: Tensor | None
    """``(S_enc, G)`` ``exp(-sum_m p_m log p_m)`` of each frame's smoothed quantizer (the
    tightness of Table 2); ``None`` for quantizers without probabilities."""


@torch.inference_mode()
def quantize_utterances(model: Module, seqs: Tensor, seqs_layout: BatchLayout) -> list[UtteranceQuantization]:
    """Runs the CNN and the quantizer over every frame of every utterance, no masking.

    ``model`` must be in eval mode, where every quantizer picks its codes
    deterministically (argmax); the quantizer sees the same layer-normed CNN
    features as in pretraining. Padded batches are processed one utterance at a time
    because the CNN's group norm normalizes over time, padding included; so each
    utterance gets the codes it would get on its own.

    :param seqs: ``(N, S_wav)`` waveforms.
    :returns: One entry per utterance.
    """
    if model.training:
        raise ValueError("`model` must be in eval mode to assign codes deterministically.")

    if not seqs_layout.padded:
        return _quantize_frames(model, seqs, seqs_layout)

    quantized = []

    for row, seq_len in zip(seqs, seqs_layout.seq_lens):
        utterance = row[:seq_len].unsqueeze(0)

        quantized.extend(_quantize_frames(model, utterance, BatchLayout.of(utterance)))

    return quantized


def _quantize_frames(model: Module, seqs: Tensor, seqs_layout: BatchLayout) -> list[UtteranceQuantization]:
    """Quantizes an unpadded batch of N utterances of S_enc frames each."""
    features, _, _ = model.encoder_frontend.extract_features(seqs, seqs_layout)

    if isinstance(model, Wav2Vec2KnnVqModel):
        output = model.quantizer(features)

        if output.log_probs is None:
            return [UtteranceQuantization(codes=codes, individual_perplexity=None) for codes in output.codes]

        perplexities = individual_perplexity(output.log_probs)

        return [
            UtteranceQuantization(codes=codes, individual_perplexity=perplexity)
            for codes, perplexity in zip(output.codes, perplexities)
        ]

    if isinstance(model, Wav2Vec2Model):
        quantizer = model.quantizer

        batch_size, num_frames = features.shape[:2]

        # (N x S_enc, G x V) one-hot -> (N, S_enc, G)
        choices = quantizer(features).cb.view(batch_size, num_frames, quantizer.num_codebooks, -1)

        return [UtteranceQuantization(codes=codes, individual_perplexity=None) for codes in choices.argmax(dim=-1)]

    raise TypeError(f"The model must be a wav2vec 2.0 pretraining model, but is of type `{type(model)}`.")
