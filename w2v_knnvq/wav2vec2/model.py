"""wav2vec 2.0 pretraining with a :class:`~w2v_knnvq.quantizer.VectorQuantizer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.functional import cross_entropy
from typing_extensions import override

from fairseq2.data_type import DataType
from fairseq2.device import Device
from fairseq2.models.transformer import TransformerEncoder
from fairseq2.models.wav2vec2 import Wav2Vec2Frontend, Wav2Vec2Masker
from fairseq2.nn import BatchLayout, Linear

from w2v_knnvq.quantizer import QuantizerOutput, VectorQuantizer, code_counts, code_usage


@final
class Wav2Vec2KnnVqModel(Module):
    """A wav2vec 2.0 pretraining model (Baevski et al., 2020) whose quantizer is any
    method of the paper, trained with that method's regularizer in place of the
    diversity loss.

    It is composed of fairseq2's wav2vec 2.0 parts under fairseq2's module names
    (``encoder_frontend``, ``encoder``, ``masker``, ``final_proj``), so that a
    ``wav2vec2_asr`` model takes the encoder unchanged. The quantizer sees the
    layer-normed CNN features of the masked frames only; its ``(N, S_msk, G * D)``
    output goes through ``final_target_proj`` to the contrastive loss.
    """

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
        :param model_dim: The dimensionality of the encoder.
        :param encoder_frontend: The CNN feature extractor and the input projection.
        :param encoder: The Transformer (context network).
        :param masker: Masks time steps and features of the encoder input.
        :param quantizer: Quantizes the ``feature_dim``-dimensional targets.
        :param final_dim: The dimensionality of the final projections of context
            vectors and quantized targets.
        :param regularizer_weight: The weight of the quantizer's regularizer, which is
            mean-reduced and scaled by the number of masked frames like the per-frame
            contrastive loss.
        :param quantizer_encoder_grad: If ``False``, the quantizer's gradient does not
            reach the CNN.
        :param num_distractors: The number of distractors per masked frame.
        :param logit_temp: The temperature that divides the contrastive logits.
        """
        super().__init__()

        self.model_dim = model_dim

        self.encoder_frontend = encoder_frontend

        self.encoder = encoder

        self.masker = masker

        self.quantizer = quantizer

        self.final_proj = Linear(model_dim, final_dim, final_proj_bias, device=device, dtype=dtype)

        self.final_target_proj = Linear(quantizer.output_dim, final_dim, bias=True, device=device, dtype=dtype)

        self.regularizer_weight = regularizer_weight

        self.quantizer_encoder_grad = quantizer_encoder_grad

        self.num_distractors = num_distractors

        self.logit_temp = logit_temp

    def forward(
        self, seqs: Tensor, seqs_layout: BatchLayout, *, features_penalty_weight: float = 10.0
    ) -> tuple[Wav2Vec2KnnVqLoss, Wav2Vec2KnnVqOutput]:
        """
        :param seqs: ``(N, S_wav)`` waveforms.
        :param features_penalty_weight: The weight of the L2 penalty on the CNN features.
        """
        masked = self.run_frontend(seqs, seqs_layout)

        encoder_output = self.encoder(masked.seqs, masked.seqs_layout)

        output = self.quantize_and_contrast(masked, encoder_output)

        loss = self.compute_loss(output, features_penalty_weight=features_penalty_weight)

        return loss, output

    if TYPE_CHECKING:
        __call__ = forward

    def run_frontend(self, seqs: Tensor, seqs_layout: BatchLayout) -> MaskedFeatures:
        """Runs the CNN, keeps the targets of the masked frames, and masks the encoder input."""
        frontend = self.encoder_frontend

        features, features_layout, raw_features = frontend.extract_features(seqs, seqs_layout)

        targets = features.clone() if self.quantizer_encoder_grad else features.detach().clone()

        if frontend.first_pass_dropout is not None:
            targets = frontend.first_pass_dropout(targets)

        masked_seqs, temporal_mask = frontend.process_features(features, features_layout, self.masker)

        if temporal_mask is None:
            raise RuntimeError("The encoder frontend returned no temporal mask although the model has a masker.")

        return MaskedFeatures(
            seqs=masked_seqs,
            seqs_layout=features_layout,
            targets=Wav2Vec2Masker.extract_masked_elements(targets, temporal_mask),
            temporal_mask=temporal_mask,
            raw=raw_features,
        )

    def quantize_and_contrast(self, masked: MaskedFeatures, encoder_output: Tensor) -> Wav2Vec2KnnVqOutput:
        """Quantizes the targets of the masked frames and scores each masked context
        vector against its target and ``num_distractors`` distractors.

        :param encoder_output: ``(N, S_enc, model_dim)`` context vectors.
        """
        seqs = self.final_proj(Wav2Vec2Masker.extract_masked_elements(encoder_output, masked.temporal_mask))

        # Every row holds the same number of masked frames, all of them real, so the
        # regularizer needs no padding mask.
        quantizer_output = self.quantizer(masked.targets)

        # The quantizer answers in float32; a model kept in half precision without
        # autocast needs its own dtype back.
        targets = self.final_target_proj(quantizer_output.quantized.type_as(masked.targets))

        logits = self.contrastive_logits(seqs, targets)

        with torch.no_grad():
            # (N, S_msk, G) -> (1, N x S_msk, G) -> (G, M), the counts of the whole batch.
            counts = code_counts(
                quantizer_output.codes.flatten(0, 1).unsqueeze(0), self.quantizer.config.codebook_size
            )[0]

        return Wav2Vec2KnnVqOutput(
            logits=logits,
            quantized_targets=targets,
            num_targets=logits.size(0) * logits.size(1),
            temporal_mask=masked.temporal_mask,
            quantizer_output=quantizer_output,
            code_usage=code_usage(counts).float(),
            encoder_output=encoder_output,
            encoder_output_layout=masked.seqs_layout,
            raw_features=masked.raw,
        )

    def contrastive_logits(self, seqs: Tensor, targets: Tensor) -> Tensor:
        """Cosine similarities of context vectors to their target (candidate 0) and to
        distractors drawn uniformly from the other masked frames of the same utterance,
        divided by ``logit_temp``, in float32. A distractor equal to its target (a sign of
        low codebook usage) gets ``-inf``.

        :param seqs: ``(N, S_msk, final_dim)`` projected context vectors.
        :param targets: ``(N, S_msk, final_dim)`` projected quantized targets.
        :returns: ``(N, S_msk, 1 + num_distractors)``.
        """
        distractors = self._sample_distractors(targets)

        # (N, S, 1, D) + (N, S, L, D) -> (N, S, 1 + L, D)
        candidates = torch.cat([targets.unsqueeze(2), distractors], dim=2)

        logits = torch.cosine_similarity(seqs.unsqueeze(2).float(), candidates.float(), dim=-1) / self.logit_temp

        # (N, S, L)
        distractor_is_target = (targets.unsqueeze(2) == distractors).all(dim=-1)

        return torch.cat([logits[:, :, :1], logits[:, :, 1:].masked_fill(distractor_is_target, -torch.inf)], dim=2)

    def _sample_distractors(self, targets: Tensor) -> Tensor:
        """:param targets: ``(N, S, D)``. :returns: ``(N, S, L, D)``, for each frame L
        other frames of its row, drawn with replacement."""
        batch_size, seq_len, dim = targets.shape

        if seq_len < 2:
            raise ValueError(
                f"Distractors need at least 2 masked frames per utterance, but there are {seq_len}; use longer utterances."
            )

        # Draw from the S - 1 other frames by shifting indices at or above the frame's own.
        # (N, S, L)
        indices = torch.randint(0, seq_len - 1, (batch_size, seq_len, self.num_distractors), device=targets.device)

        positions = torch.arange(seq_len, device=targets.device).view(1, seq_len, 1)

        indices = indices + (indices >= positions).long()

        # (N, S x L) -> (N, S x L, D) -> (N, S, L, D)
        gathered = targets.gather(1, indices.view(batch_size, -1, 1).expand(-1, -1, dim))

        return gathered.view(batch_size, seq_len, self.num_distractors, dim)

    def compute_loss(self, output: Wav2Vec2KnnVqOutput, *, features_penalty_weight: float = 10.0) -> Wav2Vec2KnnVqLoss:
        """The losses of one batch, each summed over its masked frames."""
        num_targets = output.num_targets

        # (N, S, 1 + L) -> (N x S, 1 + L); the target is candidate 0.
        logits = output.logits.flatten(0, 1).float()

        contrastive_loss = cross_entropy(logits, logits.new_zeros((num_targets,), dtype=torch.int64), reduction="sum")

        # Scaling the mean-reduced regularizer by the number of masked frames keeps
        # `regularizer_weight` relative to the per-frame contrastive loss (and a global KNN's
        # gradient right under data parallelism).
        regularizer_loss = output.quantizer_output.loss_times(num_targets)

        features_penalty = output.raw_features.float().pow(2).mean() * num_targets

        aggregate_loss = (
            contrastive_loss + self.regularizer_weight * regularizer_loss + features_penalty_weight * features_penalty
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
        return (
            f"model_dim={self.model_dim}, quantizer_encoder_grad={self.quantizer_encoder_grad}, "
            f"num_distractors={self.num_distractors}, logit_temp={self.logit_temp:G}, "
            f"regularizer_weight={self.regularizer_weight:G}"
        )


@dataclass(kw_only=True)
class MaskedFeatures:
    """The CNN features of a batch, masked for the encoder, with the targets of the
    masked frames. N is the batch size, S_enc the number of frames, S_msk the number
    of masked frames per row."""

    seqs: Tensor
    """``(N, S_enc, model_dim)`` the masked encoder input."""

    seqs_layout: BatchLayout

    targets: Tensor
    """``(N, S_msk, feature_dim)`` the layer-normed CNN features of the masked frames."""

    temporal_mask: Tensor
    """``(N, S_enc)`` bool, ``True`` at masked frames."""

    raw: Tensor
    """``(N, S_enc, feature_dim)`` CNN features before layer norm."""


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
    """The quantizer's output for the masked frames: ``codes`` ``(N, S_msk, G)``,
    ``hard_perplexity`` and ``soft_perplexity`` ``(G,)``, ``temperature``, and the
    unweighted mean-reduced regularizer ``loss``."""

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
