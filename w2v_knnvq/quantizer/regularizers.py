"""Regularization losses of vector quantization (eq. 9-13)."""

from __future__ import annotations

from torch import Tensor

from w2v_knnvq.quantizer.config import KnnMetric
from w2v_knnvq.quantizer.knn import knn_scores, local_candidates, select_neighbours
from w2v_knnvq.quantizer.metrics import distribution_perplexity


def knn_loss(log_probs: Tensor, k: int, metric: KnnMetric = "ce", *, mask: Tensor | None = None) -> Tensor:
    """Pull the K batch samples nearest to each simplex vertex toward it (eq. 13).

    ``L = (MK)^-1 sum_m sum_k D(e_m, p^(m,k))`` where ``p^(m,k)`` is the k-th nearest sample to
    the vertex ``e_m``. Both metrics reduce to a column-wise top-K of the probability matrix, so
    no pairwise distance matrix is built:

    - ``"ce"``: ``D(e_m, p) = -log p_m``; the K nearest are the K largest ``p_m``.
    - ``"l2"``: ``D(e_m, p) = |e_m - p|^2 = 1 - 2 p_m + |p|^2``; the K nearest are its K smallest.

    With product quantization, ``log_probs`` is ``(N, G, M)`` and the result is the mean of
    the G codebooks' losses.

    :param log_probs: ``(N, M)`` or ``(N, G, M)`` log-probabilities of N samples over M codes
        (log-softmax output, so that underflowing probabilities give finite losses).
    :param k: K. When fewer than K samples are available, all of them are used.
    :param mask: ``(N,)`` bool, ``True`` for samples that may be neighbours.

    :returns: A scalar. Zero when no sample is available.
    """
    if log_probs.ndim not in (2, 3):
        raise ValueError(f"`log_probs` must be (N, M) or (N, G, M), but has shape {tuple(log_probs.shape)}.")

    if k < 1:
        raise ValueError(f"`k` must be at least 1, but is {k}.")

    if metric not in ("ce", "l2"):
        raise ValueError(f"`metric` must be 'ce' or 'l2', but is {metric!r} instead.")

    scores = knn_scores(log_probs if log_probs.ndim == 3 else log_probs.unsqueeze(1), metric)

    if mask is not None:
        scores = scores[mask]

    candidates, _ = local_candidates(scores, k)

    return select_neighbours(candidates, scores.size(0), k, None).local_part(candidates)


def perplexity(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Return the perplexity ``exp(-sum_m pi_m log pi_m)`` of the batch-mean distribution (eq. 11-12).

    :param probs: ``(N, ..., M)`` probabilities of N samples over M codes, e.g. ``(N, G, M)``
        for G codebooks.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average.

    :returns: ``(...)``, each in ``[1, M]``.
    """
    if mask is not None:
        probs = probs[mask]

    mean_probs = probs.mean(dim=0) if probs.size(0) > 0 else probs.new_full(probs.shape[1:], 1.0)

    # 0 log 0 = 0 for codes that no sample visits.
    return distribution_perplexity(mean_probs)


def perplexity_loss(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Return ``1 - ppl / M``, the normalized perplexity regularizer of eq. 11-12 as a loss.

    Its minimum, 0, is reached when the batch-mean assignment is uniform (maximal normalized
    perplexity); it equals wav2vec 2.0's diversity loss ``(M - ppl) / M``, which for G
    codebooks is the mean over codebooks.

    :param probs: ``(N, M)`` or ``(N, G, M)`` assignment probabilities ``pi``.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average.

    :returns: A scalar.
    """
    num_codes = probs.size(-1)

    return (1.0 - perplexity(probs, mask=mask) / num_codes).mean()


def commitment_codebook_loss(z: Tensor, q: Tensor, beta: float = 1.0, *, mask: Tensor | None = None) -> Tensor:
    """Return the commitment and codebook losses of eq. 9-10.

    ``L = N^-1 sum_i (beta |z_i - sg(q_i)|^2 + |sg(z_i) - q_i|^2)``: the first term pulls the
    features toward their codes, the second the codes toward their features.

    :param z: ``(N, D)`` pre-quantized features.
    :param q: ``(N, D)`` the codebook vectors they were assigned to.
    :param mask: ``(N,)`` bool, ``True`` for the samples to average.
    """
    if z.shape != q.shape:
        raise ValueError(f"`z` and `q` must have the same shape, but have {tuple(z.shape)} and {tuple(q.shape)}.")

    if mask is not None:
        z, q = z[mask], q[mask]

    if z.size(0) == 0:
        return (z.sum() + q.sum()) * 0.0

    commitment = (z - q.detach()).square().sum(dim=-1)
    codebook = (z.detach() - q).square().sum(dim=-1)

    return (beta * commitment + codebook).mean()
