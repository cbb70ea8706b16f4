"""Smoothed quantization (softmax and Gumbel-softmax, eq. 5-8) with its regularizer
(eq. 11-13), dense or in chunks of rows.

The chunked pass never holds an ``(N, G, M)`` tensor: the forward pass computes the logits of
``chunk_size`` rows at a time and keeps from them only what is ``(N, G, D)``, ``(N, G)`` or
``(K, G, M)`` sized (quantized vectors, codes, individual perplexities, the running top-K
candidates of every vertex, the sum of the assignment probabilities). The backward pass
recomputes each chunk and back-propagates the chunk's share of the loss, which for the KNN
cross-entropy of row i is ``(c_i p_i - 1_{S_i}) / (M K)`` with ``S_i`` the vertices that
selected it. Gumbel noise is drawn from a generator seeded per chunk, so the recomputation
sees the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.nn.functional import log_softmax

from w2v_knnvq.quantizer.assign import cosine_logits, gather_codes, gumbel_softmax
from w2v_knnvq.quantizer.config import Assignment, KnnMetric
from w2v_knnvq.quantizer.knn import (
    KnnSelection,
    column_maxima,
    knn_scores,
    local_candidates,
    merge_candidates,
    restrict_to_vertices,
    select_neighbours,
)
from w2v_knnvq.quantizer.metrics import distribution_perplexity


@dataclass(kw_only=True)
class SmoothedSettings:
    """What a smoothed quantization pass does besides its tensors."""

    assignment: Assignment
    """``softmax``, ``gumbel-soft`` or ``gumbel-hard``."""

    knn_metric: KnnMetric | None
    """The KNN regularizer's metric; ``None`` for the perplexity regularizer."""

    knn_k: int

    gumbel_tau: float

    training: bool
    """In eval mode every row takes its argmax code, without noise."""

    process_group: dist.ProcessGroup | None = None
    """The ranks whose samples the KNN selects among; ``None`` for this rank's only."""

    vertex_subset: Tensor | None = None
    """``(G, M')`` the vertices the KNN regularizes; ``None`` for all."""

    noise_seed: int = 0
    """Seeds the Gumbel noise of chunk c with ``noise_seed + c`` (chunked pass only)."""


@dataclass(kw_only=True)
class SmoothedResult:
    """N vectors, G codebooks of M entries of dimension D."""

    quantized: Tensor
    """``(N, G, D)``."""

    codes: Tensor
    """``(N, G)``."""

    loss: Tensor
    """The regularizer (eq. 11-12 or 13), averaged over codebooks."""

    individual_perplexity: Tensor
    """``(N, G)`` ``exp(-sum_m p_m log p_m)`` of each row (Table 2)."""

    mean_probs: Tensor
    """``(G, M)`` batch-mean assignment probabilities ``pi`` of the unmasked rows (detached)."""

    num_samples: int
    """The unmasked rows of this rank."""

    num_loss_samples: int
    """The number of samples the loss averages: all ranks' for a global KNN."""

    log_probs: Tensor | None = None
    """``(N, G, M)``; dense pass only."""

    probs: Tensor | None = None
    """``(N, G, M)`` ``exp(log_probs)``; dense pass only."""


def assign(
    logits: Tensor, probs: Tensor, settings: SmoothedSettings, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """:returns: The smoothed assignment ``(N, G, M)`` (softmax or Gumbel sample) and the
    ``(N, G)`` codes of a training step."""
    if settings.assignment == "softmax":
        return probs, logits.max(dim=-1).indices

    return gumbel_softmax(logits, settings.gumbel_tau, hard=settings.assignment == "gumbel-hard", generator=generator)


def _quantize_rows(
    logits: Tensor, probs: Tensor, codebook: Tensor, settings: SmoothedSettings, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """:returns: ``(C, G, D)`` quantized vectors and ``(C, G)`` codes of a block of rows."""
    if not settings.training:
        codes = logits.max(dim=-1).indices

        return gather_codes(codebook, codes), codes

    smoothed, codes = assign(logits, probs, settings, generator)

    return torch.einsum("ngm,gmd->ngd", smoothed, codebook), codes


def row_perplexity(probs: Tensor, log_probs: Tensor) -> Tensor:
    """``exp(-sum_m p_m log p_m)`` of each row, ``(N, G, M) -> (N, G)``, as one contraction.

    ``log_probs`` comes from log-softmax of bounded logits, so it is finite and an underflowed
    ``p_m = 0`` adds ``0``.
    """
    return torch.einsum("ngm,ngm->ng", probs.detach(), log_probs.detach()).neg().exp()


def perplexity_regularizer(mean_probs: Tensor) -> Tensor:
    """``mean_g (1 - ppl(pi_g) / M)`` of the batch-mean distributions ``(G, M)`` (eq. 11-12)."""
    return (1.0 - distribution_perplexity(mean_probs) / mean_probs.size(-1)).mean()


def mean_probabilities(prob_sum: Tensor, num_samples: int) -> Tensor:
    """The batch-mean distribution; the uniform perplexity-1 stand-in ``1`` when no sample is left."""
    if num_samples == 0:
        return torch.ones_like(prob_sum)

    return prob_sum / num_samples


def quantize_dense(
    z: Tensor, codebook: Tensor, temperature: Tensor, mask: Tensor | None, settings: SmoothedSettings
) -> SmoothedResult:
    """The whole batch at once: ``(N, G, M)`` logits, probabilities and scores.

    :param z: ``(N, G, D)`` features. :param codebook: ``(G, M, D)``. :param mask: ``(N,)``
        bool, ``True`` for rows that count in the regularizer and perplexities.
    """
    logits = cosine_logits(z, codebook, temperature)

    log_probs = log_softmax(logits, dim=-1)

    probs = log_probs.exp()

    quantized, codes = _quantize_rows(logits, probs, codebook, settings, None)

    kept_probs = probs if mask is None else probs[mask]

    num_samples = kept_probs.size(0)

    mean_probs = mean_probabilities(kept_probs.sum(dim=0), num_samples)

    # With Gumbel noise the regularizers see pi, not the noisy samples (section 3).
    if settings.knn_metric is not None:
        loss, num_loss_samples = _dense_knn_loss(log_probs, mask, num_samples, settings)
    else:
        loss = perplexity_regularizer(mean_probs)

        num_loss_samples = num_samples

    return SmoothedResult(
        quantized=quantized,
        codes=codes,
        loss=loss,
        individual_perplexity=row_perplexity(probs, log_probs),
        mean_probs=mean_probs.detach(),
        num_samples=num_samples,
        num_loss_samples=num_loss_samples,
        log_probs=log_probs,
        probs=probs,
    )


def _dense_knn_loss(
    log_probs: Tensor, mask: Tensor | None, num_samples: int, settings: SmoothedSettings
) -> tuple[Tensor, int]:
    """:returns: The KNN loss (eq. 13) and the number of samples it averages over all ranks."""
    assert settings.knn_metric is not None

    scores = restrict_to_vertices(knn_scores(log_probs, settings.knn_metric), settings.vertex_subset)

    if mask is not None:
        scores = scores[mask]

    maxima = column_maxima(scores, settings.knn_k)

    if maxima is not None:
        selection = select_neighbours(maxima, num_samples, settings.knn_k, settings.process_group)

        return selection.loss_from_maxima(scores, maxima), selection.num_samples

    candidates, _ = local_candidates(scores, settings.knn_k)

    selection = select_neighbours(candidates, num_samples, settings.knn_k, settings.process_group)

    return selection.loss(candidates), selection.num_samples


def quantize_chunked(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    mask: Tensor | None,
    settings: SmoothedSettings,
    chunk_size: int,
) -> SmoothedResult:
    """The same result as :func:`quantize_dense` (up to the order of the Gumbel noise),
    ``chunk_size`` rows at a time, without ``log_probs``."""
    # torch leaves `Function.apply` unannotated.
    outputs = _ChunkedSmoothed.apply(z, codebook, temperature, mask, settings, chunk_size)  # type: ignore[no-untyped-call]

    quantized, loss, codes, individual_perplexity, mean_probs, num_loss_samples = outputs

    return SmoothedResult(
        quantized=quantized,
        codes=codes,
        loss=loss,
        individual_perplexity=individual_perplexity,
        mean_probs=mean_probs,
        num_samples=z.size(0) if mask is None else int(mask.sum()),
        num_loss_samples=int(num_loss_samples),
    )


def _chunks(num_rows: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """:returns: ``(index, start, end)`` of each chunk."""
    for index, start in enumerate(range(0, num_rows, chunk_size)):
        yield index, start, min(start + chunk_size, num_rows)


def _generator(settings: SmoothedSettings, chunk_index: int, device: torch.device) -> torch.Generator | None:
    if not settings.training or settings.assignment == "softmax":
        return None

    return torch.Generator(device=device).manual_seed(settings.noise_seed + chunk_index)


@dataclass(kw_only=True)
class _Forward:
    """What the chunked forward pass keeps for backward."""

    selection: KnnSelection | None

    candidate_rows: Tensor | None
    """``(K, G, M')`` the row of each candidate."""

    mean_probs: Tensor

    num_samples: int
    """The unmasked rows of this rank."""


class _ChunkedSmoothed(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        z: Tensor,
        codebook: Tensor,
        temperature: Tensor,
        mask: Tensor | None,
        settings: SmoothedSettings,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        num_rows, num_codebooks, dim = z.shape

        quantized = z.new_empty((num_rows, num_codebooks, dim))
        codes = torch.empty((num_rows, num_codebooks), dtype=torch.int64, device=z.device)
        individual_perplexity = z.new_empty((num_rows, num_codebooks))

        prob_sum = codebook.new_zeros(codebook.shape[:2])

        best: tuple[Tensor, Tensor] | None = None

        for index, start, end in _chunks(num_rows, chunk_size):
            logits = cosine_logits(z[start:end], codebook, temperature)

            log_probs = log_softmax(logits, dim=-1)

            probs = log_probs.exp()

            chunk_quantized, chunk_codes = _quantize_rows(
                logits, probs, codebook, settings, _generator(settings, index, z.device)
            )

            quantized[start:end] = chunk_quantized
            codes[start:end] = chunk_codes

            individual_perplexity[start:end] = row_perplexity(probs, log_probs)

            keep = None if mask is None else mask[start:end]

            prob_sum += (probs if keep is None else probs[keep]).sum(dim=0)

            if settings.knn_metric is not None:
                scores = restrict_to_vertices(knn_scores(log_probs, settings.knn_metric), settings.vertex_subset)

                if keep is not None:
                    # Masked rows are never candidates.
                    scores = scores.masked_fill(~keep.view(-1, 1, 1), -torch.inf)

                if best is None:
                    best = local_candidates(scores, settings.knn_k)
                else:
                    best = merge_candidates(best, scores, start)

        num_samples = num_rows if mask is None else int(mask.sum())

        mean_probs = mean_probabilities(prob_sum, num_samples)

        selection = None

        if settings.knn_metric is not None:
            if best is None:
                vertices = prob_sum.shape if settings.vertex_subset is None else settings.vertex_subset.shape

                best = local_candidates(prob_sum.new_full((0, *vertices), -torch.inf), settings.knn_k)

            selection = select_neighbours(best[0], num_samples, settings.knn_k, settings.process_group)

            loss = selection.value
            num_loss_samples = selection.num_samples
        else:
            loss = perplexity_regularizer(mean_probs)
            num_loss_samples = num_samples

        ctx.save_for_backward(z, codebook, temperature)

        ctx.mask = mask  # type: ignore[attr-defined]

        ctx.settings = settings  # type: ignore[attr-defined]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.saved = _Forward(  # type: ignore[attr-defined]
            selection=selection,
            candidate_rows=None if best is None else best[1],
            mean_probs=mean_probs,
            num_samples=num_samples,
        )

        ctx.mark_non_differentiable(codes, individual_perplexity)

        return (
            quantized,
            loss,
            codes,
            individual_perplexity,
            mean_probs,
            torch.tensor(num_loss_samples),
        )

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_quantized, grad_loss = grads[0], grads[1]

        z, codebook, temperature = ctx.saved_tensors

        mask: Tensor | None = ctx.mask

        settings: SmoothedSettings = ctx.settings
        saved: _Forward = ctx.saved

        grad_z = torch.zeros_like(z)
        grad_codebook = torch.zeros_like(codebook)
        grad_temperature = torch.zeros_like(temperature)

        # The perplexity regularizer reaches each row through the batch mean pi.
        grad_mean_probs = None

        if grad_loss is not None and saved.selection is None and saved.num_samples > 0:
            with torch.set_grad_enabled(True):
                mean_probs = saved.mean_probs.detach().requires_grad_()

                (grad_mean_probs,) = torch.autograd.grad(perplexity_regularizer(mean_probs), mean_probs)

            grad_mean_probs = grad_mean_probs * grad_loss / saved.num_samples

        for index, start, end in _chunks(z.size(0), ctx.chunk_size):
            with torch.set_grad_enabled(True):
                chunk_z = z[start:end].detach().requires_grad_()
                chunk_codebook = codebook.detach().requires_grad_()
                chunk_temperature = temperature.detach().requires_grad_()

                surrogate = _chunk_surrogate(
                    chunk_z,
                    chunk_codebook,
                    chunk_temperature,
                    None if mask is None else mask[start:end],
                    start,
                    index,
                    settings,
                    saved,
                    grad_quantized,
                    grad_loss,
                    grad_mean_probs,
                )

                if surrogate is None:
                    continue

                dz, dcodebook, dtemperature = torch.autograd.grad(
                    surrogate, (chunk_z, chunk_codebook, chunk_temperature), allow_unused=True
                )

            if dz is not None:
                grad_z[start:end] = dz
            if dcodebook is not None:
                grad_codebook += dcodebook
            if dtemperature is not None:
                grad_temperature += dtemperature

        return grad_z, grad_codebook, grad_temperature, None, None, None


def _chunk_surrogate(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    keep: Tensor | None,
    start: int,
    index: int,
    settings: SmoothedSettings,
    saved: _Forward,
    grad_quantized: Tensor | None,
    grad_loss: Tensor | None,
    grad_mean_probs: Tensor | None,
) -> Tensor | None:
    """Recomputes one chunk and returns a scalar whose gradient is the chunk's share of the
    gradient of ``grad_quantized . quantized + grad_loss * loss``; ``None`` if it has none."""
    logits = cosine_logits(z, codebook, temperature)

    log_probs = log_softmax(logits, dim=-1)

    probs = log_probs.exp()

    terms: list[Tensor] = []

    if grad_quantized is not None:
        quantized, _ = _quantize_rows(logits, probs, codebook, settings, _generator(settings, index, z.device))

        terms.append((quantized * grad_quantized[start : start + z.size(0)]).sum())

    if grad_loss is not None and saved.selection is not None and saved.candidate_rows is not None:
        assert settings.knn_metric is not None

        scores = restrict_to_vertices(knn_scores(log_probs, settings.knn_metric), settings.vertex_subset)

        selected = _selected_in_chunk(saved.selection.selected, saved.candidate_rows, start, z.size(0))

        terms.append(saved.selection.mean_distance(selected, scores) * grad_loss)

    if grad_mean_probs is not None:
        kept = probs if keep is None else probs[keep]

        terms.append((kept.sum(dim=0) * grad_mean_probs).sum())

    if not terms:
        return None

    return torch.stack(terms).sum()


def _selected_in_chunk(selected: Tensor, rows: Tensor, start: int, num_rows: int) -> Tensor:
    """:param selected: ``(K, G, M')`` bool. :param rows: ``(K, G, M')`` the candidates' rows.
    :returns: ``(C, G, M')`` bool, ``True`` where row ``start + c`` is a selected neighbour."""
    in_chunk = selected & (rows >= start) & (rows < start + num_rows)

    counts = torch.zeros((num_rows, *rows.shape[1:]), dtype=torch.int64, device=rows.device)

    counts.scatter_add_(0, (rows - start).clamp(0, num_rows - 1), in_chunk.long())

    return counts > 0
