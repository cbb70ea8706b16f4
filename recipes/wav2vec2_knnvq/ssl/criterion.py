"""The pretraining loss of a wav2vec 2.0 model and the quantizer figures it reports.

Both the project's ``wav2vec2_knnvq`` family (any quantizer of the paper, its regularizer)
and fairseq2's ``wav2vec2`` family (Gumbel quantizer, diversity loss, as a baseline) are
supported; one adapter per family turns a forward pass into one normalized view, which
the metrics record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

from fairseq2.datasets import SequenceBatch
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2 import Wav2Vec2Model

from w2v_knnvq.quantizer import code_counts, code_perplexity, code_usage
from w2v_knnvq.wav2vec2.frames import PretrainingModel
from w2v_knnvq.wav2vec2.model import Wav2Vec2KnnVqModel

from .metrics import (
    update_accuracy,
    update_batch_metrics,
    update_losses,
    update_quantizer_stats,
)


@dataclass(kw_only=True)
class SslLossSection:
    diversity_loss_weight: float = 0.1
    """The weight of the diversity loss of fairseq2's Gumbel quantizer. Models of
    the ``wav2vec2_knnvq`` family weight their regularizer with the model config's
    ``regularizer_weight`` instead."""

    feature_penalty_weight: float = 10.0
    """The weight of the L2 penalty on the CNN features: fairseq2's recipe setting of this
    name, passed as its model's ``features_penalty_weight``; the logged term keeps the
    name of fairseq2's loss field and metric, ``features_penalty``."""


@dataclass(frozen=True)
class CodebookShape:
    num_codebooks: int
    """G"""

    codebook_size: int
    """M"""


@dataclass(kw_only=True)
class PretrainingStep:
    """One forward pass of a pretraining model, seen the same way for every family.
    Losses are summed over the masked frames; G is the number of codebooks."""

    aggregate: Tensor

    contrastive: Tensor

    quantizer: Tensor
    """The regularizer (or diversity loss), unweighted."""

    features_penalty: Tensor

    logits: Tensor
    """``(N, S_msk, L)`` contrastive logits; the target is candidate 0."""

    num_targets: int

    hard_perplexity: Tensor
    """``(G,)`` perplexity of the batch's code histogram."""

    soft_perplexity: Tensor | None
    """``(G,)`` perplexity of the batch-mean assignment probabilities, if the quantizer has any."""

    temperature: Tensor | float | None

    code_usage: Tensor
    """``(G,)`` fraction of each codebook's entries used in the batch."""

    prob_perplexity: Tensor | None = None
    """The soft perplexity summed over codebooks, where the quantizer gives only the sum."""


class PretrainingModelAdapter(ABC):
    """Calls a pretraining model of one family and reports a :class:`PretrainingStep`."""

    base_model: PretrainingModel
    """The unwrapped model."""

    @property
    @abstractmethod
    def codebook_shape(self) -> CodebookShape: ...

    @abstractmethod
    def step(self, model: Module, batch: SequenceBatch, section: SslLossSection) -> PretrainingStep:
        """:param model: The model to call, possibly wrapped for data parallelism."""


@final
class KnnVqAdapter(PretrainingModelAdapter):
    """For the ``wav2vec2_knnvq`` family."""

    def __init__(self, base_model: Wav2Vec2KnnVqModel) -> None:
        self.base_model = base_model

        config = base_model.quantizer.config

        self._shape = CodebookShape(config.num_codebooks, config.codebook_size)

    @property
    @override
    def codebook_shape(self) -> CodebookShape:
        return self._shape

    @override
    def step(self, model: Module, batch: SequenceBatch, section: SslLossSection) -> PretrainingStep:
        seqs, seqs_layout = batch.as_input()

        loss, output = model(seqs, seqs_layout, features_penalty_weight=section.feature_penalty_weight)

        quantizer_output = output.quantizer_output

        return PretrainingStep(
            aggregate=loss.aggregate,
            contrastive=loss.contrastive,
            quantizer=loss.regularizer,
            features_penalty=loss.features_penalty,
            logits=output.logits,
            num_targets=output.num_targets,
            hard_perplexity=quantizer_output.hard_perplexity,
            soft_perplexity=quantizer_output.soft_perplexity,
            temperature=quantizer_output.temperature,
            code_usage=output.code_usage,
        )


@final
class GumbelWav2Vec2Adapter(PretrainingModelAdapter):
    """For fairseq2's ``wav2vec2`` family, whose quantizer reports its perplexities
    summed over codebooks; its one-hot choices give them per codebook."""

    def __init__(self, base_model: Wav2Vec2Model) -> None:
        self.base_model = base_model

        quantizer = base_model.quantizer

        self._shape = CodebookShape(quantizer.num_codebooks, quantizer.num_codebook_entries)

    @property
    @override
    def codebook_shape(self) -> CodebookShape:
        return self._shape

    @override
    def step(self, model: Module, batch: SequenceBatch, section: SslLossSection) -> PretrainingStep:
        seqs, seqs_layout = batch.as_input()

        loss, output = model(
            seqs,
            seqs_layout,
            diversity_weight=section.diversity_loss_weight,
            features_penalty_weight=section.feature_penalty_weight,
        )

        shape = self._shape

        with torch.no_grad():
            # (N x S_msk, G x V) one-hot -> (1, N x S_msk, G) codes -> (G, V) counts
            choices = output.quantizer_output.cb.view(-1, shape.num_codebooks, shape.codebook_size)

            counts = code_counts(choices.argmax(dim=-1).unsqueeze(0), shape.codebook_size)[0]

        return PretrainingStep(
            aggregate=loss.aggregate,
            contrastive=loss.contrastive,
            quantizer=loss.diversity,
            features_penalty=loss.features_penalty,
            logits=output.logits,
            num_targets=output.num_targets,
            hard_perplexity=code_perplexity(counts),
            soft_perplexity=None,
            temperature=output.quantizer_output.temperature,
            code_usage=code_usage(counts).float(),
            prob_perplexity=output.quantizer_output.prob_perplexity,
        )


def adapt_pretraining_model(base_model: Module) -> PretrainingModelAdapter:
    """:param base_model: The unwrapped model.
    :raises TypeError: if ``base_model`` is no wav2vec 2.0 pretraining model."""
    if isinstance(base_model, Wav2Vec2KnnVqModel):
        return KnnVqAdapter(base_model)

    if isinstance(base_model, Wav2Vec2Model):
        return GumbelWav2Vec2Adapter(base_model)

    raise TypeError(
        f"`model` must be a wav2vec 2.0 pretraining model (family `wav2vec2_knnvq` or `wav2vec2`), but is of type `{type(base_model)}` instead."
    )


@final
class SslCriterion:
    """Computes the pretraining loss of a batch and records its metrics."""

    def __init__(self, model: Module, adapter: PretrainingModelAdapter, section: SslLossSection) -> None:
        """
        :param model: The model to call, possibly wrapped for data parallelism.
        """
        self._model = model
        self._adapter = adapter
        self._section = section

    def __call__(self, batch: SequenceBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        """:returns: The loss summed over the masked frames and their number."""
        step = self._adapter.step(self._model, batch, self._section)

        update_losses(
            metric_bag,
            aggregate=step.aggregate,
            contrastive=step.contrastive,
            quantizer=step.quantizer,
            features_penalty=step.features_penalty,
            num_targets=step.num_targets,
        )

        update_accuracy(metric_bag, step.logits)

        update_quantizer_stats(
            metric_bag,
            hard_perplexity=step.hard_perplexity,
            soft_perplexity=step.soft_perplexity,
            temperature=step.temperature,
            code_usage=step.code_usage,
            prob_perplexity=step.prob_perplexity,
        )

        update_batch_metrics(metric_bag, batch)

        return step.aggregate, step.num_targets
