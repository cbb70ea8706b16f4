"""The CTC loss of fairseq2's ``wav2vec2_asr`` model (blank id 0) on a batch of
transcribed utterances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor
from torch.nn import Module

from fairseq2.datasets import Seq2SeqBatch
from fairseq2.metrics import MetricBag
from fairseq2.recipe.error import RecipeError

from .dataset import batch_utterance_ids
from .metrics import update_ctc_metrics


@dataclass(frozen=True)
class CtcOutput:
    loss: Tensor
    """The CTC loss summed over the batch's utterances. *Shape:* ``()``."""

    logits: Tensor
    """*Shape:* ``(N, S_enc, V)``, where ``V`` is the vocabulary size of the tokenizer."""

    frame_counts: Tensor
    """The number of encoder frames of each utterance. *Shape:* ``(N,)``."""


@final
class CtcCriterion:
    """Computes the CTC loss of a batch and records it."""

    def __init__(self, model: Module) -> None:
        """:param model: The ASR model, possibly wrapped for data parallelism."""
        self._model = model

    def __call__(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> CtcOutput:
        """:raises RecipeError: if the loss is not finite (training diverged)."""
        source_seqs, source_layout = batch.as_source_input()
        target_seqs, target_layout = batch.as_target_input()

        loss, logits, logits_layout = self._model(
            source_seqs, source_layout, target_seqs, target_layout, return_logits=True
        )

        if not torch.isfinite(loss):
            raise RecipeError(
                f"The CTC loss must be finite, but is {float(loss)} instead on a batch of {batch.num_examples} "
                f"utterances starting with {batch_utterance_ids(batch)[:4]}; lower the learning rate or check the audio."
            )

        update_ctc_metrics(metric_bag, loss, batch)

        return CtcOutput(loss=loss, logits=logits, frame_counts=logits_layout.seq_lens_pt)
