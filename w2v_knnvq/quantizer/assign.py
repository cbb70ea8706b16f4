"""Assignment of features to codes: nearest neighbours, softmax and Gumbel-softmax (eq. 5-8).

Everything here is plain autograd; the quantizer's matrix products run in IEEE float32 under
:func:`ieee_float32`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.functional import normalize, one_hot, softmax

from w2v_knnvq.quantizer.config import Distance
from w2v_knnvq.quantizer.estimators import straight_through


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Runs the float32 matrix products inside it in IEEE float32, not TF32, whatever the
    process-wide setting (fairseq2 turns TF32 on for CUDA by default; its 10-bit mantissa moves
    cosine logits at ``t = 0.01`` by ``3e-2`` and flips argmaxes). No effect on a CPU."""
    previous = torch.backends.cuda.matmul.allow_tf32

    torch.backends.cuda.matmul.allow_tf32 = False

    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def cosine_logits(z: Tensor, codebook: Tensor, temperature: Tensor) -> Tensor:
    """Return ``cos(q_m, z) / t``: L2-normalized features and codebook (Appendix A.1).

    :param z: ``(N, G, D)`` features, one group per codebook.
    :param codebook: ``(G, M, D)`` codebook vectors.
    :param temperature: scalar (or ``(1,)``) temperature t shared across the codebook.

    :returns: ``(N, G, M)`` logits, bounded by ``1 / t`` in magnitude.
    """
    # Dividing the (N, G, D) features rather than the (N, G, M) similarities by t is one
    # pass over the smaller tensor.
    scaled = normalize(z, dim=-1) / temperature.reshape(())

    return torch.einsum("ngd,gmd->ngm", scaled, normalize(codebook, dim=-1))


def accurate_log_softmax(logits: Tensor) -> Tensor:
    """``log softmax(logits)`` over the last dimension, exact also where ``p_m`` is within
    float32's epsilon of 1 (the vertices the KNN regularizer pulls samples onto).

    With ``l*`` a row's maximum and ``s = sum_{j != argmax} exp(l_j - l*)``,
    ``log p_m = (l_m - l*) - log1p(s)``. A log-sum-exp that adds the maximum's ``1`` to ``s``
    loses ``s`` below ``2^-24``, so ``log p_max`` would read 0 and ``1 - p_max`` would vanish;
    here ``log p_max = -log1p(s)`` keeps it (and ``1 - p_m = -expm1(log p_m)``).

    :param logits: ``(..., M)`` finite.
    :returns: ``(..., M)`` finite log-probabilities.
    """
    with torch.no_grad():
        argmax = logits.argmax(dim=-1, keepdim=True)

    is_max = torch.arange(logits.size(-1), device=logits.device) == argmax

    # 0 at the maximum without a gradient of its own there: l* - l* would send +g and -g to
    # l*, whose sum loses the row's tiny 1 - p_max in float32 (a cancellation in backward).
    shifted = (logits - logits.gather(-1, argmax)).masked_fill(is_max, 0.0)

    others = shifted.exp().masked_fill(is_max, 0.0).sum(dim=-1, keepdim=True)

    return shifted - torch.log1p(others)


def nearest_codes(z: Tensor, codebook: Tensor, distance: Distance) -> Tensor:
    """Return the index of the nearest codebook entry of each feature, ``argmin_m D(z, q_m)``
    (the first one on ties).

    :param z: ``(N, G, D)`` features.
    :param codebook: ``(G, M, D)`` codebook vectors.

    :returns: ``(N, G)`` codes.
    """
    if distance == "cosine":
        scores = torch.einsum("ngd,gmd->ngm", normalize(z, dim=-1), normalize(codebook, dim=-1))
    else:
        # -|z - q|^2 up to the constant |z|^2.
        scores = 2.0 * torch.einsum("ngd,gmd->ngm", z, codebook) - codebook.square().sum(-1)

    return scores.argmax(dim=-1)


def gather_codes(codebook: Tensor, codes: Tensor) -> Tensor:
    """Look up codebook vectors.

    :param codebook: ``(G, M, D)``.
    :param codes: ``(N, G)``.

    :returns: ``(N, G, D)``.
    """
    group_index = torch.arange(codebook.size(0), device=codes.device)

    return codebook[group_index, codes]


def uniform_noise(like: Tensor) -> Tensor:
    """Uniform samples in ``[0, 1)`` of the shape, dtype and device of ``like``: the one place
    the quantizer draws noise (torch's generator of the device; a check that compares devices
    replaces it with the CPU's)."""
    return torch.rand_like(like)


def gumbel_softmax(logits: Tensor, tau: Tensor | float, *, hard: bool) -> tuple[Tensor, Tensor]:
    """Sample a smoothed quantizer with Gumbel noise (eq. 6-8).

    ``p = softmax((g + log pi) / tau)``; ``log pi`` differs from the logits by a per-row
    constant, which softmax ignores. With ``hard`` the forward value is the onehot vector of
    ``argmax p`` and the gradient is that of ``p`` (eq. 8). The noise comes from torch's
    random generator of the logits' device (``torch.utils.checkpoint`` replays it).

    :param logits: ``(..., M)`` unnormalized log assignment probabilities.

    :returns: ``(..., M)`` samples and ``(...)`` the sampled codes.
    """
    uniform = uniform_noise(logits)

    # u in (0, 1) exactly: both logs stay finite.
    tiny = torch.finfo(logits.dtype).tiny
    gumbels = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))

    samples = softmax((logits + gumbels) / tau, dim=-1)

    codes = samples.detach().argmax(dim=-1)

    if hard:
        onehot = one_hot(codes, logits.size(-1)).to(samples.dtype)

        samples = straight_through(onehot, samples)

    return samples, codes
