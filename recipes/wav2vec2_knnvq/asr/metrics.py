"""Metrics of CTC fine-tuning: the CTC loss per utterance, and the WER and CER of greedy
decoding.

fairseq2 knows ``ctc_loss`` and ``wer`` (lower is better); ``cer`` is registered here. The
error rates are accumulated as word and character edits in one :class:`ErrorRateMetric`,
summed over data-parallel ranks, and published as two figures in percent.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Final, cast

import torch
from torch import Tensor

from fairseq2.datasets import Seq2SeqBatch
from fairseq2.metrics import Mean, MetricBag, Sum, format_as_float
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.text import ErrorRateMetric, ErrorRates

from ...common import add_skipped_audio_metric, update_skipped_audio

CTC_LOSS: Final = "ctc_loss"

ERROR_RATES: Final = "error_rates"
"""The metric bag entry that accumulates word and character edits; published as
``wer`` and ``cer``."""


def register_asr_metric_descriptors(container: DependencyContainer) -> None:
    """Gives ``cer``, which fairseq2 does not know, its display name."""
    descriptor = MetricDescriptor("cer", "Character Error Rate (CER)", 201, format_as_float)

    container.collection.register_instance(MetricDescriptor, descriptor)


def add_ctc_metrics(metric_bag: MetricBag) -> None:
    metric_bag.add(CTC_LOSS, Mean())
    metric_bag.add("num_examples", Sum())
    metric_bag.add("num_source_elements", Sum())
    metric_bag.add("num_target_elements", Sum())
    add_skipped_audio_metric(metric_bag)


def add_error_rate_metrics(metric_bag: MetricBag) -> None:
    metric_bag.add(ERROR_RATES, ErrorRateMetric())


@torch.inference_mode()
def update_ctc_metrics(metric_bag: MetricBag, loss: Tensor, batch: Seq2SeqBatch) -> None:
    """Records the loss per utterance, the normalization wav2vec 2.0 fine-tuning uses.

    :param loss: The CTC loss summed over the utterances of ``batch``. *Shape:* ``()``.
    """
    num_examples = batch.num_examples

    metric_bag.get(CTC_LOSS, Mean).update(loss.detach().float() / num_examples, weight=num_examples)
    metric_bag.get("num_examples", Sum).update(num_examples)
    metric_bag.get("num_source_elements", Sum).update(sum(batch.source_seq_lens))
    metric_bag.get("num_target_elements", Sum).update(sum(batch.target_seq_lens))

    update_skipped_audio(metric_bag, batch)


def update_error_rates(metric_bag: MetricBag, *, hyps: Sequence[str], refs: Sequence[str]) -> None:
    """Adds the word and character edits of ``hyps`` against ``refs``, in the same order."""
    metric_bag.get(ERROR_RATES, ErrorRateMetric).update(hyps=hyps, refs=refs)


def publish_error_rates(values: MutableMapping[str, object]) -> None:
    """Replaces the accumulated edits with the ``wer`` and ``cer`` figures (percent)."""
    rates = cast(ErrorRates, values.pop(ERROR_RATES))

    values.update(rates.as_metric_values())
