"""The vector quantizer: every method of the paper behind one module."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Linear, Module, Parameter
from torch.nn.functional import log_softmax, normalize

from w2v_knnvq.quantizer.assign import cosine_logits, gather_codes, gumbel_softmax, nearest_codes
from w2v_knnvq.quantizer.codebook import Codebook, SimVQCodebook
from w2v_knnvq.quantizer.config import QuantizerConfig
from w2v_knnvq.quantizer.estimators import rotation_trick, straight_through
from w2v_knnvq.quantizer.metrics import code_counts, code_perplexity
from w2v_knnvq.quantizer.regularizers import (
    commitment_codebook_loss,
    knn_loss,
    perplexity,
    perplexity_loss,
)


@dataclass
class QuantizerOutput:
    """Holds the output of a :class:`VectorQuantizer` for inputs of leading shape ``(...)``."""

    quantized: Tensor
    """``(..., G * D)`` quantized vectors, float32."""

    codes: Tensor
    """``(..., G)`` the code of each vector in each codebook."""

    probs: Tensor | None
    """``(..., G, M)`` assignment probabilities ``pi`` of the smoothed methods; ``None`` for hard ones."""

    log_probs: Tensor | None
    """``(..., G, M)`` ``log pi``, computed by log-softmax."""

    loss: Tensor
    """Scalar regularization loss of the method, averaged over codebooks; not weighted."""

    hard_perplexity: Tensor
    """``(G,)`` perplexity of the batch's code histogram per codebook."""

    soft_perplexity: Tensor | None
    """``(G,)`` perplexity of the batch-mean ``pi`` per codebook (eq. 11-12 without the ``1/M``)."""

    temperature: Tensor | None
    """Scalar learned temperature t of the cosine logits (detached); ``None`` for hard methods."""


class VectorQuantizer(Module):
    """Quantizes vectors with one of the paper's methods (see :data:`METHOD_NAMES`).

    The input is projected to ``G * D`` dimensions when needed, split into G groups, and each
    group is quantized by its own codebook of M entries (product quantization). Regularizers
    are applied per codebook and averaged. In training mode each method does what the paper
    describes; in eval mode every method quantizes hard (argmax) without noise.

    All quantization math runs in float32, also under fp16/bf16 autocast.
    """

    config: QuantizerConfig
    input_proj: Linear | None
    codebook: Codebook | SimVQCodebook
    log_temperature: Parameter | None
    gumbel_step: Tensor | None

    def __init__(
        self,
        config: QuantizerConfig,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()

        config.check()

        if config.input_dim is None:
            raise ValueError(
                "`config.input_dim` must be set, but is `None` instead; give the dimensionality of the vectors to quantize."
            )

        self.config = config

        self.input_dim = config.input_dim

        spec = config.spec

        if self.input_dim != config.output_dim:
            self.input_proj = Linear(self.input_dim, config.output_dim, device=device, dtype=dtype)
        else:
            self.register_module("input_proj", None)

        codebook_kls = SimVQCodebook if spec.simvq else Codebook

        self.codebook = codebook_kls(
            config.num_codebooks,
            config.codebook_size,
            config.codebook_dim,
            device=device,
            dtype=dtype,
        )

        if spec.smoothed:
            self.log_temperature = Parameter(torch.empty((), device=device, dtype=torch.float32))
        else:
            self.register_parameter("log_temperature", None)

        if spec.assignment.startswith("gumbel") and config.gumbel_tau_anneal is not None:
            step = torch.zeros((), device=device, dtype=torch.int64)

            # Persistent, so that a resumed run continues the annealing schedule.
            self.register_buffer("gumbel_step", step)
        else:
            self.register_buffer("gumbel_step", None)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.log_temperature is not None:
            with torch.no_grad():
                self.log_temperature.fill_(math.log(self.config.init_temperature - self.config.min_temperature))

        if self.gumbel_step is not None:
            self.gumbel_step.zero_()

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def temperature(self) -> Tensor:
        """:returns: The learned temperature t of the cosine logits, a float32 scalar."""
        if self.log_temperature is None:
            raise RuntimeError(f"The method {self.config.method!r} has no learned temperature.")

        # A differentiable floor: the temperature stays learnable however close it gets.
        return self.config.min_temperature + self.log_temperature.float().exp()

    def gumbel_tau(self) -> float:
        """:returns: The current Gumbel-softmax temperature tau."""
        if self.gumbel_step is None or self.config.gumbel_tau_anneal is None:
            return self.config.gumbel_tau

        max_tau, min_tau, decay = self.config.gumbel_tau_anneal

        return max(max_tau * decay ** int(self.gumbel_step), min_tau)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        """
        :param x: ``(..., input_dim)`` vectors to quantize.
        :param padding_mask: ``(...)`` bool, ``True`` for real vectors and ``False`` for
            padding, which is excluded from neighbours, losses and perplexities.
        """
        config = self.config

        if x.size(-1) != self.input_dim:
            raise ValueError(
                f"The quantizer expects vectors of dimension {self.input_dim}, but got shape {tuple(x.shape)}."
            )

        leading_shape = x.shape[:-1]

        if padding_mask is not None:
            if padding_mask.shape != leading_shape:
                raise ValueError(
                    f"`padding_mask` must have shape {tuple(leading_shape)}, but has {tuple(padding_mask.shape)}."
                )

            mask: Tensor | None = padding_mask.reshape(-1).to(torch.bool)
        else:
            mask = None

        if self.input_proj is not None:
            x = self.input_proj(x)

        num_vectors = leading_shape.numel()

        # Autocast off: quantizer math in float32 (meta tensors know no autocast).
        if torch.amp.autocast_mode.is_autocast_available(x.device.type):
            float32_math: AbstractContextManager[object] = torch.autocast(device_type=x.device.type, enabled=False)
        else:
            float32_math = nullcontext()

        with float32_math:
            z = x.float().reshape(num_vectors, config.num_codebooks, config.codebook_dim)

            codebook = self.codebook().float()

            if config.spec.smoothed:
                output = self._quantize_smoothed(z, codebook, mask)
            else:
                output = self._quantize_hard(z, codebook, mask)

        if self.training and self.gumbel_step is not None:
            self.gumbel_step.add_(1)

        output.quantized = output.quantized.reshape(*leading_shape, config.output_dim)
        output.codes = output.codes.reshape(*leading_shape, config.num_codebooks)

        if output.probs is not None and output.log_probs is not None:
            probs_shape = (*leading_shape, config.num_codebooks, config.codebook_size)

            output.probs = output.probs.reshape(probs_shape)
            output.log_probs = output.log_probs.reshape(probs_shape)

        return output

    def _quantize_smoothed(self, z: Tensor, codebook: Tensor, mask: Tensor | None) -> QuantizerOutput:
        config, spec = self.config, self.config.spec

        temperature = self.temperature()

        logits = cosine_logits(z, codebook, temperature)

        log_probs = log_softmax(logits, dim=-1)

        probs = log_probs.exp()

        if not self.training:
            codes = logits.argmax(dim=-1)

            quantized = gather_codes(codebook, codes)
        else:
            if spec.assignment == "softmax":
                smoothed = probs

                codes = logits.argmax(dim=-1)
            else:
                smoothed, codes = gumbel_softmax(logits, self.gumbel_tau(), hard=spec.assignment == "gumbel-hard")

            quantized = torch.einsum("ngm,gmd->ngd", smoothed, codebook)

        # With Gumbel noise the regularizers see pi, not the noisy samples (section 3).
        if spec.regularizer == "knn":
            assert spec.knn_metric is not None

            loss = knn_loss(log_probs, config.knn_k, spec.knn_metric, mask=mask)
        else:
            loss = perplexity_loss(probs, mask=mask)

        return QuantizerOutput(
            quantized=quantized.flatten(1),
            codes=codes,
            probs=probs,
            log_probs=log_probs,
            loss=loss,
            hard_perplexity=self._hard_perplexity(codes, mask),
            soft_perplexity=perplexity(probs.detach(), mask=mask),
            temperature=temperature.detach(),
        )

    def _quantize_hard(self, z: Tensor, codebook: Tensor, mask: Tensor | None) -> QuantizerOutput:
        config, spec = self.config, self.config.spec

        if spec.distance == "cosine":
            z = normalize(z, dim=-1)

            codebook = normalize(codebook, dim=-1)

        with torch.no_grad():
            codes = nearest_codes(z, codebook, spec.distance)

        q = gather_codes(codebook, codes)

        # The codebook learns from the codebook loss alone (eq. 10), as in the baselines the
        # paper follows (van den Oord et al., 2017; Zhu et al., 2025): the main loss reaches z
        # only, through the identity (eq. 2) or the scaled rotation (eq. 3-4).
        if not self.training:
            quantized = q
        elif spec.estimator == "rotation":
            quantized = rotation_trick(z, q)
        else:
            quantized = straight_through(q.detach(), z)

        row_mask = None if mask is None else mask.repeat_interleave(config.num_codebooks)

        # Rows are (vector, codebook) pairs: the mean over rows is the mean over codebooks of
        # each codebook's loss.
        loss = commitment_codebook_loss(z.flatten(0, 1), q.flatten(0, 1), config.commitment_beta, mask=row_mask)

        return QuantizerOutput(
            quantized=quantized.flatten(1),
            codes=codes,
            probs=None,
            log_probs=None,
            loss=loss,
            hard_perplexity=self._hard_perplexity(codes, mask),
            soft_perplexity=None,
            temperature=None,
        )

    def _hard_perplexity(self, codes: Tensor, mask: Tensor | None) -> Tensor:
        """:returns: ``(G,)`` perplexity of the code histogram of ``codes`` ``(N, G)``."""
        # (N, G) -> (1, N, G) -> (G, M)
        counts = code_counts(
            codes.unsqueeze(0), self.config.codebook_size, None if mask is None else mask.unsqueeze(0)
        )[0]

        return code_perplexity(counts)

    def extra_repr(self) -> str:
        config = self.config

        return (
            f"method={config.method}, num_codebooks={config.num_codebooks}, "
            f"codebook_size={config.codebook_size}, codebook_dim={config.codebook_dim}"
        )
