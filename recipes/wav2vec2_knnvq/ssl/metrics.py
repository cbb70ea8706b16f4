"""Metrics of wav2vec 2.0 pretraining, including codebook usage over a whole split.

Per-codebook metrics are kept as ``(G,)`` tensors and published as lists, which the
jsonl recorder writes as arrays and TensorBoard as one scalar per codebook
(``Codebook Usage (0)``, ``Codebook Usage (1)``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from typing import Final

import torch
from torch import Tensor
from torcheval.metrics import Metric, MulticlassAccuracy
from typing_extensions import Self, override

from fairseq2.datasets import SequenceBatch
from fairseq2.metrics import Mean, MetricBag, Sum, format_as_float
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.quantizer import code_usage

from ...common import add_skipped_audio_metric, update_skipped_audio

CODEBOOK_USAGE: Final = "codebook_usage"
UTTERANCE_CODEBOOK_USAGE: Final = "utterance_codebook_usage"
QUANTIZER_LOSS: Final = "quantizer_loss"
HARD_PERPLEXITY: Final = "hard_perplexity"
SOFT_PERPLEXITY: Final = "soft_perplexity"
# fairseq's and fairseq2's names: the per-codebook perplexities summed over codebooks.
CODE_PERPLEXITY: Final = "code_perplexity"
PROB_PERPLEXITY: Final = "prob_perplexity"
BATCH_CODEBOOK_USAGE: Final = "batch_codebook_usage"
INDIVIDUAL_PERPLEXITY: Final = "individual_perplexity"

_PER_CODEBOOK_METRICS: Final = (
    CODEBOOK_USAGE,
    UTTERANCE_CODEBOOK_USAGE,
    HARD_PERPLEXITY,
    SOFT_PERPLEXITY,
    BATCH_CODEBOOK_USAGE,
    INDIVIDUAL_PERPLEXITY,
)

_SCALAR_METRICS: Final = ("temperature", CODE_PERPLEXITY, PROB_PERPLEXITY)


def register_ssl_metric_descriptors(container: DependencyContainer) -> None:
    """Gives the metrics that fairseq2 does not know their display names."""

    def register(name: str, display_name: str, priority: int, higher_better: bool = False) -> None:
        descriptor = MetricDescriptor(name, display_name, priority, format_as_float, higher_better=higher_better)

        container.collection.register_instance(MetricDescriptor, descriptor)

    # fmt: off
    register(QUANTIZER_LOSS,           "Quantizer Loss",                  105)
    register(HARD_PERPLEXITY,          "Hard Perplexity",                 211)
    register(SOFT_PERPLEXITY,          "Soft Perplexity",                 212)
    register(CODE_PERPLEXITY,          "Code Perplexity",                 214)
    register(PROB_PERPLEXITY,          "Prob Perplexity",                 215)
    register(BATCH_CODEBOOK_USAGE,     "Batch Codebook Usage",            213, higher_better=True)
    register(CODEBOOK_USAGE,           "Codebook Usage",                  230, higher_better=True)
    register(UTTERANCE_CODEBOOK_USAGE, "Mean Utterance Codebook Usage",   231, higher_better=True)
    register(INDIVIDUAL_PERPLEXITY,    "Mean Individual Perplexity",      232)
    # fmt: on


class CodeCounts(Metric[Tensor]):
    """Counts how often each codebook entry is chosen over all updates.

    ``compute()`` returns the fraction of entries of each codebook chosen at least once,
    shape ``(G,)``. Merging sums the counts, so after a data-parallel sync the figure
    covers the union of all ranks' data.
    """

    counts: Tensor

    def __init__(self, num_codebooks: int, codebook_size: int, *, device: torch.device | None = None) -> None:
        super().__init__(device=device)

        self._add_state("counts", torch.zeros((num_codebooks, codebook_size), device=self.device, dtype=torch.int64))

    @override
    @torch.inference_mode()
    def update(self, utterance_counts: Tensor) -> Self:
        """:param utterance_counts: Code counts per utterance. *Shape:* ``(N, G, M)``."""
        self.counts += utterance_counts.sum(dim=0).to(self.device)

        return self

    @override
    @torch.inference_mode()
    def compute(self) -> Tensor:
        return code_usage(self.counts)

    @override
    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[CodeCounts]) -> Self:
        for metric in metrics:
            self.counts += metric.counts.to(self.device)

        return self


class UtteranceCodebookUsage(Metric[Tensor]):
    """Mean over utterances of the fraction of each codebook used within the utterance.

    ``compute()`` returns shape ``(G,)``.
    """

    usage_sum: Tensor
    num_utterances: Tensor

    def __init__(self, num_codebooks: int, *, device: torch.device | None = None) -> None:
        super().__init__(device=device)

        self._add_state("usage_sum", torch.zeros((num_codebooks,), device=self.device, dtype=torch.float64))
        self._add_state("num_utterances", torch.zeros((), device=self.device, dtype=torch.int64))

    @override
    @torch.inference_mode()
    def update(self, utterance_counts: Tensor) -> Self:
        """:param utterance_counts: Code counts per utterance. *Shape:* ``(N, G, M)``."""
        # (N, G, M) -> (N, G)
        usage = code_usage(utterance_counts)

        self.usage_sum += usage.sum(dim=0).to(self.device)

        self.num_utterances += usage.size(0)

        return self

    @override
    @torch.inference_mode()
    def compute(self) -> Tensor:
        return self.usage_sum / self.num_utterances.clamp(min=1)

    @override
    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[UtteranceCodebookUsage]) -> Self:
        for metric in metrics:
            self.usage_sum += metric.usage_sum.to(self.device)
            self.num_utterances += metric.num_utterances.to(self.device)

        return self


class ElementwiseMean(Metric[Tensor]):
    """Weighted mean of ``(G,)`` vectors, kept per element (one value per codebook)."""

    weighted_sum: Tensor
    weights: Tensor

    def __init__(self, size: int, *, device: torch.device | None = None) -> None:
        super().__init__(device=device)

        self._add_state("weighted_sum", torch.zeros((size,), device=self.device, dtype=torch.float64))
        self._add_state("weights", torch.zeros((), device=self.device, dtype=torch.float64))

    @override
    @torch.inference_mode()
    def update(self, values: Tensor, *, weight: float = 1.0) -> Self:
        self.weighted_sum += values.detach().double().to(self.device) * weight

        self.weights += weight

        return self

    @override
    @torch.inference_mode()
    def compute(self) -> Tensor:
        # NaN marks a metric that never received data (e.g. the soft perplexity of a
        # hard quantizer); `publish_per_codebook` drops it.
        if self.weights == 0:
            return torch.full_like(self.weighted_sum, math.nan)

        return self.weighted_sum / self.weights

    @override
    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[ElementwiseMean]) -> Self:
        for metric in metrics:
            self.weighted_sum += metric.weighted_sum.to(self.device)
            self.weights += metric.weights.to(self.device)

        return self


def add_ssl_metrics(metric_bag: MetricBag, num_codebooks: int) -> None:
    metric_bag.add("loss", Mean())
    metric_bag.add("contrastive_loss", Mean())
    metric_bag.add(QUANTIZER_LOSS, Mean())
    metric_bag.add("features_penalty", Mean())
    metric_bag.add("accuracy", MulticlassAccuracy())
    metric_bag.add(HARD_PERPLEXITY, ElementwiseMean(num_codebooks))
    metric_bag.add(SOFT_PERPLEXITY, ElementwiseMean(num_codebooks))
    metric_bag.add(CODE_PERPLEXITY, ElementwiseMean(1))
    metric_bag.add(PROB_PERPLEXITY, ElementwiseMean(1))
    metric_bag.add(BATCH_CODEBOOK_USAGE, ElementwiseMean(num_codebooks))
    metric_bag.add("temperature", ElementwiseMean(1))
    metric_bag.add("num_examples", Sum())
    metric_bag.add("num_elements", Sum())
    metric_bag.add("total_num_examples", Sum())
    metric_bag.add("total_num_elements", Sum())
    add_skipped_audio_metric(metric_bag)


def add_codebook_usage_metrics(metric_bag: MetricBag, num_codebooks: int, codebook_size: int) -> None:
    metric_bag.add(CODEBOOK_USAGE, CodeCounts(num_codebooks, codebook_size))
    metric_bag.add(UTTERANCE_CODEBOOK_USAGE, UtteranceCodebookUsage(num_codebooks))
    # Mean over all frames of exp(-sum_m p_m log p_m): 1 for onehot quantizers, M for uniform.
    metric_bag.add(INDIVIDUAL_PERPLEXITY, ElementwiseMean(num_codebooks))


@torch.inference_mode()
def update_losses(
    metric_bag: MetricBag,
    *,
    aggregate: Tensor,
    contrastive: Tensor,
    quantizer: Tensor,
    features_penalty: Tensor,
    num_targets: int,
) -> None:
    """Records sum-reduced losses per target: the loss, contrastive loss and feature
    penalty in bits, as fairseq reports them; the quantizer's regularizer as the value of
    its own equation (e.g. eq. 13), which is no log-likelihood for most methods."""
    scale = num_targets * math.log(2)

    for name, loss in (
        ("loss", aggregate),
        ("contrastive_loss", contrastive),
        ("features_penalty", features_penalty),
    ):
        metric_bag.get(name, Mean).update(loss.detach().float() / scale, weight=num_targets)

    metric_bag.get(QUANTIZER_LOSS, Mean).update(quantizer.detach().float() / num_targets, weight=num_targets)


@torch.inference_mode()
def update_accuracy(metric_bag: MetricBag, logits: Tensor) -> None:
    """:param logits: *Shape:* ``(N, S, L + 1)`` with the true target at index 0."""
    predictions = logits.argmax(-1).view(-1)

    metric_bag.get("accuracy", MulticlassAccuracy).update(predictions, torch.zeros_like(predictions))


@torch.inference_mode()
def update_quantizer_stats(
    metric_bag: MetricBag,
    *,
    hard_perplexity: Tensor,
    soft_perplexity: Tensor | None,
    temperature: float | Tensor | None,
    code_usage: Tensor,
    prob_perplexity: Tensor | None = None,
) -> None:
    """
    :param hard_perplexity: ``(G,)`` perplexity of the batch's code histogram per codebook.
    :param soft_perplexity: ``(G,)`` perplexity of the batch-mean assignment probabilities.
    :param code_usage: ``(G,)`` fraction of each codebook's entries used in the batch.
    :param prob_perplexity: The soft perplexity summed over codebooks, where only the sum is
        known (fairseq2's Gumbel quantizer); by default the sum of ``soft_perplexity``.
    """
    metric_bag.get(HARD_PERPLEXITY, ElementwiseMean).update(hard_perplexity)

    # fairseq's and fairseq2's `code_perplexity` and `prob_perplexity`: summed over codebooks.
    metric_bag.get(CODE_PERPLEXITY, ElementwiseMean).update(hard_perplexity.detach().float().sum().view(1))

    metric_bag.get(BATCH_CODEBOOK_USAGE, ElementwiseMean).update(code_usage)

    if soft_perplexity is not None:
        metric_bag.get(SOFT_PERPLEXITY, ElementwiseMean).update(soft_perplexity)

        if prob_perplexity is None:
            prob_perplexity = soft_perplexity.detach().float().sum()

    if prob_perplexity is not None:
        metric_bag.get(PROB_PERPLEXITY, ElementwiseMean).update(prob_perplexity.detach().float().view(1))

    if temperature is not None:
        metric_bag.get("temperature", ElementwiseMean).update(torch.as_tensor(temperature).view(1))


@torch.inference_mode()
def update_batch_metrics(metric_bag: MetricBag, batch: SequenceBatch) -> None:
    for prefix in ("", "total_"):
        metric_bag.get(f"{prefix}num_examples", Sum).update(batch.num_examples)
        metric_bag.get(f"{prefix}num_elements", Sum).update(batch.num_elements)

    update_skipped_audio(metric_bag, batch)


def publish_per_codebook(values: MutableMapping[str, object]) -> None:
    """Turns ``(G,)`` tensors into lists and drops metrics that never received data."""
    for name in (*_PER_CODEBOOK_METRICS, *_SCALAR_METRICS):
        value = values.get(name)
        if not isinstance(value, Tensor):
            continue

        if value.isnan().any():
            del values[name]
        elif name in _SCALAR_METRICS:
            values[name] = float(value)
        else:
            values[name] = [float(v) for v in value.view(-1)]
