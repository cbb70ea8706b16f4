"""The vector quantizer: every method of the paper behind one module."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Linear, Module, Parameter
from torch.nn.functional import normalize

from w2v_knnvq.quantizer.assign import gather_codes, ieee_float32, nearest_codes
from w2v_knnvq.quantizer.codebook import Codebook, SimVQCodebook
from w2v_knnvq.quantizer.config import QuantizerConfig
from w2v_knnvq.quantizer.estimators import rotation_trick, straight_through
from w2v_knnvq.quantizer.knn import draw_vertex_subset
from w2v_knnvq.quantizer.metrics import code_counts, code_perplexity, distribution_perplexity
from w2v_knnvq.quantizer.regularizers import commitment_codebook_loss, count_rows
from w2v_knnvq.quantizer.smoothed import SmoothedSettings, quantize_smoothed


@dataclass
class QuantizerOutput:
    """Holds the output of a :class:`VectorQuantizer` for inputs of leading shape ``(...)``."""

    quantized: Tensor
    """``(..., G * D)`` quantized vectors, float32."""

    codes: Tensor
    """``(..., G)`` the code of each vector in each codebook."""

    probs: Tensor | None
    """``(..., G, M)`` assignment probabilities ``pi`` of the smoothed methods, with their graph,
    when asked for (``return_probs=True``); ``None`` for hard ones and with ``chunk_size`` set
    (no ``(N, G, M)`` tensor exists then)."""

    loss: Tensor
    """Scalar regularization loss of the method, averaged over codebooks; not weighted. With a
    global KNN its value is the loss over all data-parallel ranks' samples and its gradient
    reaches this rank's samples only (their slice of the gradient of that loss)."""

    hard_perplexity: Tensor
    """``(G,)`` perplexity of the batch's code histogram per codebook."""

    soft_perplexity: Tensor | None
    """``(G,)`` perplexity of the batch-mean ``pi`` per codebook (eq. 11-12 without the ``1/M``)."""

    temperature: Tensor | None
    """Scalar learned temperature t of the cosine logits (detached); ``None`` for hard methods."""

    num_samples: Tensor
    """This rank's unmasked vectors (int64 scalar)."""

    num_loss_samples: Tensor
    """The number of vectors ``loss`` averages over (int64 scalar): ``num_samples``, or all
    data-parallel ranks' vectors with a global KNN in training."""

    individual_perplexity: Tensor | None = None
    """``(..., G)`` ``exp(-sum_m p_m log p_m)`` of each vector's smoothed quantizer (Table 2's
    tightness), also in chunked mode; ``None`` for hard methods."""

    logits: Tensor | None = None
    """``(..., G, M)`` the cosine logits whose softmax is ``probs``, with their graph; ``None``
    where ``probs`` is."""

    log_probs: Tensor | None = None
    """``(..., G, M)`` ``log pi``, finite and exact near the simplex vertices, with their graph;
    ``None`` where ``probs`` is."""

    def loss_times(self, num_targets: float | Tensor) -> Tensor:
        """``loss * num_targets`` for a sum-reduced training loss of ``num_targets`` targets
        (frames, images) on this rank.

        With a global KNN the gradient of ``loss`` reaches this rank's vectors only; it is
        scaled here by the ranks' vectors per own vector, so that dividing the gradients summed
        over ranks by all ranks' targets (fairseq2's normalization under DDP) gives the update
        of one process on the whole batch. The ratio stays on the device.
        """
        loss = self.loss.detach()

        ratio = self.num_loss_samples.to(loss.dtype) / self.num_samples.clamp_min(1).to(loss.dtype)

        return loss * num_targets + (self.loss - loss) * (ratio * num_targets)


KnnGroup = dist.ProcessGroup | None | Literal["default"]
"""The ranks of a global KNN: a process group, ``None`` for this rank alone, or ``"default"``
for torch's default group when one is initialized."""


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
        process_group: KnnGroup = "default",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        :param process_group: The data-parallel ranks of a global KNN (fairseq2's
            data-parallel gang as a process group); ``None`` for this rank alone (a
            data-parallel gang of one process in a larger world of tensor or pipeline
            parallelism); ``"default"`` for torch's default group when one is initialized.
        """
        super().__init__()

        self.process_group = process_group

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
            # Of shape (1,), not a scalar: FSDP2 shards no 0-d parameter.
            self.log_temperature = Parameter(torch.empty((1,), device=device, dtype=torch.float32))
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
        return self.config.min_temperature + self.log_temperature.float().exp().reshape(())

    def gumbel_tau(self) -> Tensor | float:
        """:returns: The current Gumbel-softmax temperature tau: a float32 scalar tensor on the
        device of the step counter when annealed (never read back by the host)."""
        if self.gumbel_step is None or self.config.gumbel_tau_anneal is None:
            return self.config.gumbel_tau

        max_tau, min_tau, decay = self.config.gumbel_tau_anneal

        tau = max_tau * torch.exp(self.gumbel_step.double() * math.log(decay))

        return tau.clamp_min(min_tau).float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before the temperature had shape (1,) hold a scalar.
        key = f"{prefix}log_temperature"

        value = state_dict.get(key)

        if isinstance(value, Tensor) and value.ndim == 0:
            state_dict[key] = value.reshape(1)

        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, *, return_probs: bool = False) -> QuantizerOutput:
        """
        :param x: ``(..., input_dim)`` vectors to quantize.
        :param padding_mask: ``(...)`` bool, ``True`` for real vectors and ``False`` for
            padding, which is excluded from neighbours, losses and perplexities.
        :param return_probs: Also return the ``(..., G, M)`` ``probs``, ``logits`` and
            ``log_probs`` of a dense smoothed pass, with their graph. Off, a compiled step
            never writes them out whole.
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

        num_vectors = leading_shape.numel()

        # Autocast off and no TF32: quantizer math in IEEE float32. (An autocast region that
        # switches nothing off still splits a compiled graph's fusions: it is entered only when
        # autocast is on.)
        if torch.is_autocast_enabled(x.device.type):
            float32_math: AbstractContextManager[object] = torch.autocast(device_type=x.device.type, enabled=False)
        else:
            float32_math = nullcontext()

        with float32_math, ieee_float32():
            # The projection too runs in float32 (in the weights' own dtype if the module
            # is kept in half precision), whatever the autocast dtype of `x`.
            x = x.float()

            if self.input_proj is not None:
                x = self.input_proj(x.to(self.input_proj.weight.dtype)).float()

            z = x.reshape(num_vectors, config.num_codebooks, config.codebook_dim)

            codebook = self.codebook().float()

            if config.spec.smoothed:
                output = self._quantize_smoothed(z, codebook, mask, return_probs)
            else:
                output = self._quantize_hard(z, codebook, mask)

        if self.training and self.gumbel_step is not None:
            self.gumbel_step.add_(1)

        output.quantized = output.quantized.reshape(*leading_shape, config.output_dim)
        output.codes = output.codes.reshape(*leading_shape, config.num_codebooks)

        if output.individual_perplexity is not None:
            output.individual_perplexity = output.individual_perplexity.reshape(*leading_shape, config.num_codebooks)

        probs_shape = (*leading_shape, config.num_codebooks, config.codebook_size)

        for name in ("probs", "logits", "log_probs"):
            value = getattr(output, name)

            if value is not None:
                setattr(output, name, value.reshape(probs_shape))

        return output

    def _quantize_smoothed(
        self, z: Tensor, codebook: Tensor, mask: Tensor | None, return_probs: bool
    ) -> QuantizerOutput:
        config = self.config

        temperature = self.temperature()

        settings = self._smoothed_settings(z.device)

        result = quantize_smoothed(
            z, codebook, temperature, mask, settings, config.chunk_size, return_probs=return_probs
        )

        return QuantizerOutput(
            quantized=result.quantized.flatten(1),
            codes=result.codes,
            probs=result.probs,
            logits=result.logits,
            log_probs=result.log_probs,
            loss=result.loss,
            hard_perplexity=self._hard_perplexity(result.codes, mask),
            soft_perplexity=distribution_perplexity(result.mean_probs),
            temperature=temperature.detach(),
            individual_perplexity=result.individual_perplexity,
            num_samples=result.num_samples,
            num_loss_samples=result.num_loss_samples,
        )

    def _smoothed_settings(self, device: torch.device) -> SmoothedSettings:
        config, spec = self.config, self.config.spec

        knn = self.training and spec.regularizer == "knn"

        # The ranks select neighbours together only in training: a validation reader may
        # leave a rank without a batch, and a collective would then hang.
        process_group = self._knn_process_group() if knn else None

        if knn:
            vertex_subset = draw_vertex_subset(
                config.num_codebooks,
                config.codebook_size,
                config.knn_vertex_fraction,
                device=device,
                process_group=process_group,
            )
        else:
            vertex_subset = None

        return SmoothedSettings(
            assignment=spec.assignment,
            knn_metric=spec.knn_metric if spec.regularizer == "knn" else None,
            knn_k=config.knn_k,
            gumbel_tau=self.gumbel_tau(),
            training=self.training,
            process_group=process_group,
            vertex_subset=vertex_subset,
        )

    def _knn_process_group(self) -> dist.ProcessGroup | None:
        """The data-parallel ranks of a global KNN; ``None`` for a per-rank KNN or one process."""
        if self.config.knn_scope != "global":
            return None

        group = self.process_group

        if group == "default":
            if not (dist.is_available() and dist.is_initialized()):
                return None

            group = dist.group.WORLD

        if group is None or dist.get_world_size(group) == 1:
            return None

        return group

    def _quantize_hard(self, z: Tensor, codebook: Tensor, mask: Tensor | None) -> QuantizerOutput:
        config, spec = self.config, self.config.spec

        if spec.distance == "cosine":
            z = normalize(z, dim=-1)

            codebook = normalize(codebook, dim=-1)

        with torch.no_grad():
            codes = self._nearest_codes(z, codebook)

        q = gather_codes(codebook, codes)

        # The codebook learns from the codebook loss alone (eq. 10), as in the baselines the
        # paper follows (van den Oord et al., 2017; Zhu et al., 2025): the main loss reaches z
        # only, through the identity (eq. 2) or the scaled rotation (eq. 3-4).
        if not self.training:
            quantized = q
        elif spec.estimator == "rotation":
            quantized = rotation_trick(z, q)
        else:
            quantized = straight_through(q if config.straight_through_codebook else q.detach(), z)

        row_mask = None if mask is None else mask.repeat_interleave(config.num_codebooks)

        # Rows are (vector, codebook) pairs: the mean over rows is the mean over codebooks of
        # each codebook's loss.
        loss = commitment_codebook_loss(z.flatten(0, 1), q.flatten(0, 1), config.commitment_beta, mask=row_mask)

        num_samples = count_rows(z, mask)

        return QuantizerOutput(
            quantized=quantized.flatten(1),
            codes=codes,
            probs=None,
            loss=loss,
            hard_perplexity=self._hard_perplexity(codes, mask),
            soft_perplexity=None,
            temperature=None,
            num_samples=num_samples,
            num_loss_samples=num_samples,
        )

    def _nearest_codes(self, z: Tensor, codebook: Tensor) -> Tensor:
        """:returns: ``(N, G)`` nearest codes, searched ``chunk_size`` rows at a time if set."""
        distance, chunk_size = self.config.spec.distance, self.config.chunk_size

        if chunk_size is None or z.size(0) <= chunk_size:
            return nearest_codes(z, codebook, distance)

        starts = range(0, z.size(0), chunk_size)

        return torch.cat([nearest_codes(z[start : start + chunk_size], codebook, distance) for start in starts])

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
