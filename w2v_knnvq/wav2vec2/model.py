"""wav2vec 2.0 pretraining with a :class:`~w2v_knnvq.quantizer.VectorQuantizer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import override

from fairseq2.data_type import DataType
from fairseq2.device import Device
from fairseq2.models.transformer import TransformerEncoder
from fairseq2.models.wav2vec2 import (
    Wav2Vec2Features,
    Wav2Vec2Frontend,
    Wav2Vec2Masker,
    Wav2Vec2Model,
)
from fairseq2.nn import BatchLayout

from w2v_knnvq.quantizer import QuantizerOutput, VectorQuantizer


# fairseq2 marks `Wav2Vec2Model` final for type checkers only; subclassing keeps its
# frontend, masking, distractor sampling, contrastive loss and feature penalty, and
# its module names, so that `wav2vec2_asr` models can share the encoder.
class Wav2Vec2KnnVqModel(Wav2Vec2Model):  # type: ignore[misc]
    """A wav2vec 2.0 model whose Gumbel quantizer and diversity loss are replaced by
    a :class:`VectorQuantizer` (any method of the paper) and its regularizer.

    The quantizer sees the layer-normed CNN features of the masked frames only;
    its ``(N, S_msk, G * D)`` output goes through ``final_target_proj`` to the
    contrastive loss where the Gumbel quantizer's output went.
    """

    quantizer: VectorQuantizer  # type: ignore[assignment]

    def __init__(
        self,
        model_dim: int,
        encoder_frontend: Wav2Vec2Frontend,
        encoder: TransformerEncoder,
        masker: Wav2Vec2Masker,
        quantizer: VectorQuantizer,
        final_dim: int,
        *,
        regularizer_weight: float = 1.0,
        quantizer_encoder_grad: bool = True,
        final_proj_bias: bool = True,
        num_distractors: int = 100,
        logit_temp: float = 0.1,
        device: Device | None = None,
        dtype: DataType | None = None,
    ) -> None:
        """
        :param quantizer: Quantizes the ``feature_dim``-dimensional targets.
        :param regularizer_weight: The weight of the quantizer's regularizer,
            which is mean-reduced and scaled by the number of masked frames
            like fairseq2's diversity loss.

        See :class:`Wav2Vec2Model` for the other parameters.
        """
        super().__init__(
            model_dim,
            encoder_frontend,
            encoder,
            masker,
            quantizer,  # type: ignore[arg-type]
            final_dim,
            quantizer_encoder_grad=quantizer_encoder_grad,
            final_proj_bias=final_proj_bias,
            num_distractors=num_distractors,
            logit_temp=logit_temp,
            device=device,
            dtype=dtype,
        )

        self.regularizer_weight = regularizer_weight

    @override
    def forward(  # type: ignore[override]
        self,
        seqs: Tensor,
        seqs_layout: BatchLayout,
        *,
        features_penalty_weight: float = 10.0,
    ) -> tuple[Wav2Vec2KnnVqLoss, Wav2Vec2KnnVqOutput]:
        """
        :param seqs: ``(N, S_wav)`` waveforms.
        :param features_penalty_weight: The weight of the L2 penalty on the CNN
            features.
        """
        features = self.extract_features(seqs, seqs_layout)

        output = self.quantize_and_contrast(features)

        loss = self.compute_loss(output, features_penalty_weight=features_penalty_weight)

        return loss, output

    if TYPE_CHECKING:
        __call__ = forward

    @override
    def quantize_and_contrast(  # type: ignore[override]
        self, features: Wav2Vec2Features
    ) -> Wav2Vec2KnnVqOutput:
        seqs = Wav2Vec2Masker.extract_masked_elements(features.seqs, features.temporal_mask)

        seqs = self.final_proj(seqs)

        # Every row holds the same number of masked frames, all of them real, so
        # the regularizer needs no padding mask.
        quantizer_output = self.quantizer(features.targets)

        # The quantizer answers in float32; a model kept in half precision
        # without autocast needs its own dtype back.
        quantized = quantizer_output.quantized.type_as(features.targets)

        targets = self.final_target_proj(quantized)

        distractors = self._sample_distractors(targets)

        logits = self._compute_logits(seqs, targets, distractors)

        batch_size, seq_len = logits.shape[:2]

        return Wav2Vec2KnnVqOutput(
            logits=logits,
            quantized_targets=targets,
            num_targets=batch_size * seq_len,
            temporal_mask=features.temporal_mask,
            quantizer_output=quantizer_output,
            code_usage=self._compute_code_usage(quantizer_output.codes),
            encoder_output=features.seqs,
            encoder_output_layout=features.seqs_layout,
            raw_features=features.raw,
        )

    def _compute_code_usage(self, codes: Tensor) -> Tensor:
        """:returns: ``(G,)`` fraction of each codebook's entries used by ``codes`` ``(N, S, G)``."""
        config = self.quantizer.config

        with torch.no_grad():
            used = torch.zeros(
                (config.num_codebooks, config.codebook_size), device=codes.device
            )

            # (N, S, G) -> (G, N x S)
            used.scatter_(1, codes.reshape(-1, config.num_codebooks).t(), 1.0)

            return used.mean(dim=1)

    @override
    def compute_loss(  # type: ignore[override]
        self, output: Wav2Vec2KnnVqOutput, *, features_penalty_weight: float = 10.0
    ) -> Wav2Vec2KnnVqLoss:
        contrastive_loss = self.compute_contrastive_loss(output.logits)

        # The contrastive loss is summed over the masked frames; scaling the
        # mean-reduced regularizer by their number keeps `regularizer_weight`
        # relative to the per-frame loss, as fairseq2 does for the diversity loss.
        regularizer_loss = output.quantizer_output.loss * output.num_targets

        features_penalty = self.compute_features_penalty(output.logits, output.raw_features)

        aggregate_loss = (
            contrastive_loss
            + self.regularizer_weight * regularizer_loss
            + features_penalty_weight * features_penalty
        )

        return Wav2Vec2KnnVqLoss(
            aggregate=aggregate_loss,
            contrastive=contrastive_loss,
            regularizer=regularizer_loss,
            features_penalty=features_penalty,
        )

    @override
    def extra_repr(self) -> str:
        """:meta private:"""
        return f"{super().extra_repr()}, regularizer_weight={self.regularizer_weight:G}"


@dataclass(kw_only=True)
class Wav2Vec2KnnVqOutput:
    """Holds the output of a :class:`Wav2Vec2KnnVqModel`. N is the batch size,
    S_msk the number of masked frames per row, S_enc the number of frames, L the
    number of candidates (distractors plus the target), G the number of codebooks."""

    logits: Tensor
    """``(N, S_msk, L)`` contrastive logits; the target is candidate 0."""

    quantized_targets: Tensor
    """``(N, S_msk, final_dim)`` projected quantized targets."""

    num_targets: int
    """N x S_msk, the number of masked frames."""

    temporal_mask: Tensor
    """``(N, S_enc)`` bool, ``True`` at masked frames."""

    quantizer_output: QuantizerOutput
    """The quantizer's output for the masked frames: ``codes`` ``(N, S_msk, G)``
    (one row per utterance, for :class:`~w2v_knnvq.quantizer.CodebookUsage`),
    ``hard_perplexity`` and ``soft_perplexity`` ``(G,)``, ``temperature``, and
    the unweighted mean-reduced regularizer ``loss``."""

    code_usage: Tensor
    """``(G,)`` fraction of each codebook's entries used in this batch."""

    encoder_output: Tensor
    """``(N, S_enc, model_dim)`` context network output."""

    encoder_output_layout: BatchLayout

    raw_features: Tensor
    """``(N, S_enc, feature_dim)`` CNN features before layer norm."""


@dataclass(kw_only=True)
class Wav2Vec2KnnVqLoss:
    """The losses of one batch, each summed over its masked frames."""

    aggregate: Tensor
    """``contrastive + regularizer_weight * regularizer + features_penalty_weight * features_penalty``."""

    contrastive: Tensor

    regularizer: Tensor
    """The quantizer's mean-reduced regularizer times the number of masked frames, unweighted."""

    features_penalty: Tensor
