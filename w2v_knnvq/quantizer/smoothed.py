"""Smoothed quantization (softmax and Gumbel-softmax, eq. 5-8) with its regularizer (eq. 11-13),
dense or in chunks of rows, in plain autograd.

Dense (``chunk_size=None``): the cosine logits, their log-softmax and probabilities exist as
``(N, G, M)`` tensors; the quantized vectors are ``Q^T p`` (or a Gumbel sample's), the KNN
regularizer is :func:`~w2v_knnvq.quantizer.regularizers.knn_loss` and the perplexity regularizer
:func:`~w2v_knnvq.quantizer.regularizers.perplexity_loss`'s parts, and autograd differentiates
them.

Chunked (memory only): a ``no_grad`` pass over chunks of rows finds the codes, the statistics
and the KNN candidates; the neighbours are selected (across ranks for a global KNN); then each
chunk's quantized vectors, probability sum and KNN distances at its selected rows are computed
under :func:`torch.utils.checkpoint.checkpoint`, which recomputes them in backward (one more
matrix product) and replays the random generator, so Gumbel samples are the same twice. No
``(N, G, M)`` tensor is held; the loss and gradients equal the dense pass's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from w2v_knnvq.quantizer.assign import accurate_log_softmax, cosine_logits, gather_codes, gumbel_softmax
from w2v_knnvq.quantizer.config import Assignment, KnnMetric
from w2v_knnvq.quantizer.knn import candidate_entries, knn_distances, merge_candidates, select_neighbours
from w2v_knnvq.quantizer.metrics import individual_perplexity
from w2v_knnvq.quantizer.regularizers import (
    count_rows,
    diversity_loss,
    knn_candidates,
    knn_loss,
    masked_probability_sum,
    mean_of_sum,
    perplexity_of_sum,
)


@dataclass(kw_only=True)
class SmoothedSettings:
    """What a smoothed quantization pass does besides its tensors."""

    assignment: Assignment
    """``softmax``, ``gumbel-soft`` or ``gumbel-hard``."""

    knn_metric: KnnMetric | None
    """The KNN regularizer's metric; ``None`` for the perplexity regularizer."""

    knn_k: int

    gumbel_tau: Tensor | float

    training: bool
    """In eval mode every row takes its argmax code, without noise."""

    process_group: dist.ProcessGroup | None = None
    """The ranks whose samples the KNN selects among; ``None`` for this rank's only."""

    vertex_subset: Tensor | None = None
    """``(G, M')`` the vertices the KNN regularizes; ``None`` for all."""


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
    """``(N, G)`` ``exp(-sum_m p_m log p_m)`` of each row (Table 2), detached."""

    mean_probs: Tensor
    """``(G, M)`` batch-mean assignment probabilities ``pi`` of the unmasked rows (detached)."""

    num_samples: Tensor
    """The unmasked rows of this rank (int64 scalar)."""

    num_loss_samples: Tensor
    """The number of samples the loss averages: all ranks' for a global KNN (int64 scalar)."""

    probs: Tensor | None = None
    """``(N, G, M)`` ``pi``, with their graph; dense pass only."""

    logits: Tensor | None = None
    """``(N, G, M)`` the cosine logits, with their graph; dense pass only."""

    log_probs: Tensor | None = None
    """``(N, G, M)`` ``log pi``, with their graph; dense pass only."""


def smoothed_log_probs(z: Tensor, codebook: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """:returns: ``(C, G, M)`` cosine logits of ``z`` ``(C, G, D)`` and their log-softmax (eq. 5)."""
    logits = cosine_logits(z, codebook, temperature)

    return logits, accurate_log_softmax(logits)


def assign(logits: Tensor, probs: Tensor, codebook: Tensor, settings: SmoothedSettings) -> tuple[Tensor, Tensor]:
    """The quantized vectors and codes of a block of rows: ``Q^T p`` (eq. 5) or ``Q^T`` of a
    Gumbel sample (eq. 7-8) in training, the argmax code's entry in eval mode.

    :param logits: ``(C, G, M)``. :param probs: ``(C, G, M)`` their softmax.
    :param codebook: ``(G, M, D)``.
    :returns: ``(C, G, D)`` quantized vectors and ``(C, G)`` codes.
    """
    if not settings.training or settings.assignment == "softmax":
        codes = logits.detach().argmax(dim=-1)

        if not settings.training:
            return gather_codes(codebook, codes), codes

        return torch.einsum("ngm,gmd->ngd", probs, codebook), codes

    samples, codes = gumbel_softmax(logits, settings.gumbel_tau, hard=settings.assignment == "gumbel-hard")

    return torch.einsum("ngm,gmd->ngd", samples, codebook), codes


def quantize_smoothed(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    mask: Tensor | None,
    settings: SmoothedSettings,
    chunk_size: int | None = None,
    *,
    return_probs: bool = False,
) -> SmoothedResult:
    """Quantizes ``z`` densely (``chunk_size=None``, or no more rows than it) or ``chunk_size``
    rows at a time (no ``(N, G, M)`` tensor is held).

    :param return_probs: The dense pass returns its probabilities, logits and log-probabilities.

    :param z: ``(N, G, D)`` features. :param codebook: ``(G, M, D)``. :param temperature: ``()``
        or ``(1,)``. :param mask: ``(N,)`` bool, ``True`` for rows that count in the
        regularizer and perplexities.
    """
    if chunk_size is None or z.size(0) <= chunk_size:
        return _quantize_dense(z, codebook, temperature, mask, settings, return_probs)

    return _quantize_chunked(z, codebook, temperature, mask, settings, chunk_size)


def _quantize_dense(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    mask: Tensor | None,
    settings: SmoothedSettings,
    return_probs: bool,
) -> SmoothedResult:
    num_samples = count_rows(z, mask)

    logits, log_probs = smoothed_log_probs(z, codebook, temperature)

    probs = log_probs.exp()

    quantized, codes = assign(logits, probs, codebook, settings)

    knn = settings.knn_metric is not None

    # The perplexity regularizer differentiates the batch sum; for the KNN it is a statistic.
    prob_sum = masked_probability_sum(probs.detach() if knn else probs, mask)

    if settings.knn_metric is not None:
        result = knn_loss(
            log_probs,
            settings.knn_k,
            settings.knn_metric,
            mask=mask,
            vertices=settings.vertex_subset,
            process_group=settings.process_group,
        )

        loss, num_loss_samples = result.loss, result.num_samples
    else:
        loss = diversity_loss(perplexity_of_sum(prob_sum, num_samples), codebook.size(1))

        num_loss_samples = num_samples

    return SmoothedResult(
        quantized=quantized,
        codes=codes,
        loss=loss,
        individual_perplexity=individual_perplexity(log_probs.detach()),
        mean_probs=mean_of_sum(prob_sum.detach(), num_samples),
        num_samples=num_samples,
        num_loss_samples=num_loss_samples,
        probs=probs if return_probs else None,
        logits=logits if return_probs else None,
        log_probs=log_probs if return_probs else None,
    )


# The loop's trip count depends on N, which a compiled graph would specialize on (a recompilation
# per batch size); the chunked pass is for memory, so it stays eager.
@torch.compiler.disable  # type: ignore[untyped-decorator]
def _quantize_chunked(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    mask: Tensor | None,
    settings: SmoothedSettings,
    chunk_size: int,
) -> SmoothedResult:
    num_rows = z.size(0)

    num_samples = count_rows(z, mask)

    starts = range(0, num_rows, chunk_size)

    codes_parts: list[Tensor] = []
    perplexity_parts: list[Tensor] = []

    prob_sum = codebook.new_zeros(codebook.shape[:2])

    best: tuple[Tensor, Tensor] | None = None

    # 1. Codes, statistics and KNN candidates, without a graph.
    with torch.no_grad():
        for start in starts:
            chunk = slice(start, start + chunk_size)

            keep = None if mask is None else mask[chunk]

            logits, log_probs = smoothed_log_probs(z[chunk], codebook, temperature)

            codes_parts.append(logits.argmax(dim=-1))

            perplexity_parts.append(individual_perplexity(log_probs))

            prob_sum += masked_probability_sum(log_probs.exp(), keep)

            if settings.knn_metric is not None:
                distances = knn_distances(log_probs, settings.knn_metric)

                scores, chunk_rows = knn_candidates(
                    distances, settings.knn_k, mask=keep, vertices=settings.vertex_subset
                )

                candidates = (scores, chunk_rows + start)

                best = candidates if best is None else merge_candidates(best, candidates)

    # 2. The neighbours over all ranks.
    selection = None

    if best is not None:
        selection = select_neighbours(best[0], num_samples, settings.knn_k, settings.process_group)

    # 3. What carries a gradient, chunk by chunk, recomputed in backward.
    quantized_parts: list[Tensor] = []

    grad_prob_sum = codebook.new_zeros(codebook.shape[:2])

    knn_scores = codebook.new_zeros(())

    for index, start in enumerate(starts):
        chunk = slice(start, start + chunk_size)

        keep = None if mask is None else mask[chunk]

        rows: Tensor | None = None
        selected: Tensor | None = None

        if selection is not None and best is not None:
            end = min(start + chunk_size, num_rows)

            rows = best[1] - start

            selected = selection.selected & (best[1] >= start) & (best[1] < end)

        quantized, sampled_codes, chunk_prob_sum, chunk_scores = checkpoint(
            _chunk_terms, z[chunk], codebook, temperature, keep, rows, selected, settings, use_reentrant=False
        )

        quantized_parts.append(quantized)

        if settings.training and settings.assignment != "softmax":
            codes_parts[index] = sampled_codes

        grad_prob_sum = grad_prob_sum + chunk_prob_sum

        knn_scores = knn_scores + chunk_scores

    if selection is not None:
        local_part = -knn_scores / selection.num_terms

        loss = selection.value + (local_part - local_part.detach())

        num_loss_samples = selection.num_samples
    else:
        loss = diversity_loss(perplexity_of_sum(grad_prob_sum, num_samples), codebook.size(1))

        num_loss_samples = num_samples

    return SmoothedResult(
        quantized=torch.cat(quantized_parts),
        codes=torch.cat(codes_parts),
        loss=loss,
        individual_perplexity=torch.cat(perplexity_parts),
        mean_probs=mean_of_sum(prob_sum, num_samples),
        num_samples=num_samples,
        num_loss_samples=num_loss_samples,
    )


def _chunk_terms(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    keep: Tensor | None,
    rows: Tensor | None,
    selected: Tensor | None,
    settings: SmoothedSettings,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk's share of what carries a gradient.

    :param rows: ``(K, G, M')`` the candidates' rows, numbered from the chunk's first.
    :param selected: ``(K, G, M')`` bool, the selected candidates that lie in this chunk.
    :returns: ``(C, G, D)`` quantized vectors, ``(C, G)`` codes, the ``(G, M)`` probability
        sum of the kept rows (zeros for the KNN) and the sum of the selected KNN scores
        ``-D`` (0 for the perplexity regularizer).
    """
    logits, log_probs = smoothed_log_probs(z, codebook, temperature)

    probs = log_probs.exp()

    quantized, codes = assign(logits, probs, codebook, settings)

    if settings.knn_metric is None or rows is None or selected is None:
        return quantized, codes, masked_probability_sum(probs, keep), probs.new_zeros(())

    distances = knn_distances(log_probs, settings.knn_metric)

    scores = candidate_entries(distances, rows, settings.vertex_subset)

    return quantized, codes, probs.new_zeros(codebook.shape[:2]), torch.where(selected, scores, 0.0).sum()
