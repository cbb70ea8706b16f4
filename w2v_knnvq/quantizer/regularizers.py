"""Regularization losses of vector quantization (eq. 9-13), the functions the quantizer trains with.

Masks weight rows instead of selecting them, so that no count reaches the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from w2v_knnvq.quantizer.config import KnnMetric
from w2v_knnvq.quantizer.knn import (
    candidate_entries,
    column_top_k,
    knn_distances,
    restrict_to_vertices,
    select_neighbours,
)
from w2v_knnvq.quantizer.metrics import distribution_perplexity


@dataclass(kw_only=True)
class KnnLoss:
    """The KNN regularizer of one batch."""

    loss: Tensor
    """The scalar loss of eq. 13 over all ranks' samples, with the gradient of this rank's."""

    num_samples: Tensor
    """The number of samples it averages over, of all ranks (int64 scalar)."""


def knn_candidates(
    distances: Tensor, k: int, *, mask: Tensor | None = None, vertices: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The K nearest rows of every (codebook, vertex) column, ties to the lower row.

    :param distances: ``(N, G, M)`` from :func:`~w2v_knnvq.quantizer.knn.knn_distances`.
    :param mask: ``(N,)`` bool, ``True`` for rows that may be neighbours.
    :param vertices: ``(G, M')`` the vertices to regularize; ``None`` for all.
    :returns: ``(K, G, M')`` detached scores ``-D`` (``-inf`` where padded or masked) and
        ``(K, G, M')`` rows.
    """
    with torch.no_grad():
        scores = -restrict_to_vertices(distances, vertices)

        if mask is not None:
            scores = scores.masked_fill(~mask.view(-1, 1, 1), -math.inf)

        return column_top_k(scores, k)


def knn_loss(
    log_probs: Tensor,
    k: int,
    metric: KnnMetric = "ce",
    *,
    mask: Tensor | None = None,
    vertices: Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> KnnLoss:
    """Pull the K batch samples nearest to each simplex vertex toward it (eq. 13).

    ``L = (MK)^-1 sum_m sum_k D(e_m, p^(m,k))`` where ``p^(m,k)`` is the k-th nearest sample to
    the vertex ``e_m``. Both metrics rank samples column by column, so no pairwise distance
    matrix is built: the K nearest are selected without gradient, then the loss is a gather of
    the distances at the selected (row, vertex) pairs, differentiated by autograd.

    - ``"ce"``: ``D(e_m, p) = -log p_m``; the K nearest are the K largest ``p_m``.
    - ``"l2"``: ``D(e_m, p) = |e_m - p|^2``.

    With product quantization, ``log_probs`` is ``(N, G, M)`` and the loss is the mean of the G
    codebooks' losses.

    :param log_probs: ``(N, M)`` or ``(N, G, M)`` log-probabilities of N samples over M codes,
        from :func:`~w2v_knnvq.quantizer.assign.accurate_log_softmax` (finite, exact near the
        vertices).
    :param k: K. When fewer than K samples are available, all of them are used.
    :param mask: ``(N,)`` bool, ``True`` for samples that may be neighbours.
    :param vertices: ``(G, M')`` a subset of vertices (section 5.3), the loss averaging over
        them; ``None`` for all M.
    :param process_group: The data-parallel ranks to select among: the loss is eq. 13 over the
        union of their batches (each rank all-gathers the others' detached top-K candidates),
        and its gradient reaches this rank's samples. ``None``: this rank's samples only.
    """
    if log_probs.ndim not in (2, 3):
        raise ValueError(f"`log_probs` must be (N, M) or (N, G, M), but has shape {tuple(log_probs.shape)}.")

    if k < 1:
        raise ValueError(f"`k` must be at least 1, but is {k} instead.")

    distances = knn_distances(log_probs if log_probs.ndim == 3 else log_probs.unsqueeze(1), metric)

    scores, rows = knn_candidates(distances, k, mask=mask, vertices=vertices)

    selection = select_neighbours(scores, count_rows(distances, mask), k, process_group)

    return KnnLoss(loss=selection.loss(candidate_entries(distances, rows, vertices)), num_samples=selection.num_samples)


def count_rows(rows: Tensor, mask: Tensor | None) -> Tensor:
    """The number of ``True`` entries of ``mask``, or of the rows of ``rows`` without one, an
    int64 scalar tensor on their device (no count reaches the host)."""
    if mask is None:
        return torch.full((), rows.size(0), dtype=torch.int64, device=rows.device)

    return mask.sum()


def masked_probability_sum(probs: Tensor, mask: Tensor | None) -> Tensor:
    """``(N, ..., M) -> (..., M)`` the sum of the unmasked rows' probabilities."""
    if mask is None:
        return probs.sum(dim=0)

    weights = mask.to(probs.dtype).view(-1, *([1] * (probs.dim() - 1)))

    return (probs * weights).sum(dim=0)


def mean_of_sum(prob_sum: Tensor, num_samples: Tensor) -> Tensor:
    """The batch-mean ``pi = prob_sum / num_samples``; 0 when no sample is left."""
    return prob_sum / num_samples.clamp_min(1).to(prob_sum.dtype)


def perplexity_of_sum(prob_sum: Tensor, num_samples: Tensor) -> Tensor:
    """The perplexity ``exp(-sum_m pi_m log pi_m)`` of the batch-mean ``pi = prob_sum /
    num_samples`` (eq. 11-12); 1 when no sample is left.

    :param prob_sum: ``(..., M)``. :returns: ``(...)``, each in ``[1, M]``.
    """
    # 0 log 0 = 0 for codes that no sample visits.
    return distribution_perplexity(mean_of_sum(prob_sum, num_samples))


def perplexity(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Return the perplexity ``exp(-sum_m pi_m log pi_m)`` of the batch-mean distribution (eq. 11-12).

    :param probs: ``(N, ..., M)`` probabilities of N samples over M codes, e.g. ``(N, G, M)``
        for G codebooks.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average.

    :returns: ``(...)``, each in ``[1, M]``.
    """
    num_samples = count_rows(probs, mask)

    return perplexity_of_sum(masked_probability_sum(probs, mask), num_samples)


def diversity_loss(perplexities: Tensor, num_codes: int) -> Tensor:
    """``mean_g (1 - ppl_g / M)`` of the codebooks' perplexities ``(G,)``: the normalized
    perplexity regularizer of eq. 11-12 as a loss, wav2vec 2.0's diversity loss."""
    return (1.0 - perplexities / num_codes).mean()


def perplexity_loss(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Return ``1 - ppl / M``, the normalized perplexity regularizer of eq. 11-12 as a loss.

    Its minimum, 0, is reached when the batch-mean assignment is uniform (maximal normalized
    perplexity); it equals wav2vec 2.0's diversity loss ``(M - ppl) / M``, which for G
    codebooks is the mean over codebooks.

    :param probs: ``(N, M)`` or ``(N, G, M)`` assignment probabilities ``pi``.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average.

    :returns: A scalar.
    """
    return diversity_loss(perplexity(probs, mask=mask), probs.size(-1))


def commitment_codebook_loss(z: Tensor, q: Tensor, beta: float = 1.0, *, mask: Tensor | None = None) -> Tensor:
    """Return the commitment and codebook losses of eq. 9-10.

    ``L = N^-1 sum_i (beta |z_i - sg(q_i)|^2 + |sg(z_i) - q_i|^2)``: the first term pulls the
    features toward their codes, the second the codes toward their features.

    :param z: ``(N, D)`` pre-quantized features.
    :param q: ``(N, D)`` the codebook vectors they were assigned to.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average. With none left, 0.
    """
    if z.shape != q.shape:
        raise ValueError(f"`z` and `q` must have the same shape, but have {tuple(z.shape)} and {tuple(q.shape)}.")

    commitment = (z - q.detach()).square().sum(dim=-1)
    codebook = (z.detach() - q).square().sum(dim=-1)

    per_row = beta * commitment + codebook

    if mask is not None:
        per_row = torch.where(mask, per_row, 0.0)

    return per_row.sum() / count_rows(z, mask).clamp_min(1)
