"""Assignment of features to codes: nearest neighbours, softmax and Gumbel-softmax (eq. 5-8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import normalize, one_hot, softmax

from w2v_knnvq.quantizer.config import Distance
from w2v_knnvq.quantizer.estimators import straight_through


def cosine_logits(z: Tensor, codebook: Tensor, temperature: Tensor) -> Tensor:
    """Return ``Q^T z / t`` with L2-normalized features and codebook (Appendix A.1).

    :param z: ``(N, G, D)`` features, one group per codebook.
    :param codebook: ``(G, M, D)`` codebook vectors.
    :param temperature: scalar temperature t shared across the codebook.

    :returns: ``(N, G, M)`` logits, bounded by ``1 / t`` in magnitude, laid out codebook-major:
        ``logits.transpose(0, 1)`` is a contiguous ``(G, N, M)`` tensor (one matrix product
        per codebook), whose columns the KNN search reduces over.
    """
    return similarity_logits(scaled_unit_features(z, temperature), normalize(codebook, dim=-1)).transpose(0, 1)


_NORM_EPS = 1e-12
"""``normalize``'s floor under the norm."""


def scaled_unit_features(z: Tensor, temperature: Tensor) -> Tensor:
    """``z / (max(|z|, eps) t)`` ``(N, G, D)``: the features' factor of :func:`cosine_logits`.

    Scaling the (N, G, D) features rather than the (N, G, M) similarities saves a pass over the
    larger tensor in both directions.
    """
    return z * _inverse_scale(_norm(z), temperature)


def _norm(z: Tensor) -> Tensor:
    return torch.linalg.vector_norm(z, dim=-1, keepdim=True)


def _inverse_scale(norm: Tensor, temperature: Tensor) -> Tensor:
    """``(N, G, 1)`` ``1 / (max(|z|, eps) t)`` of the ``(N, G, 1)`` norms."""
    return norm.clamp_min(_NORM_EPS).mul(temperature).reciprocal()


@dataclass(kw_only=True)
class UnitScaling:
    """:func:`scaled_unit_features` computed without a graph, and what its backward pass needs."""

    scaled: Tensor
    """``(N, G, D)`` ``z / (max(|z|, eps) t)``."""

    inverse: Tensor
    """``(N, G, 1)`` ``1 / (max(|z|, eps) t)``."""

    radial: Tensor
    """``(N, G, 1)`` ``t / |z|`` where ``|z| > eps`` (the norm's own gradient), else 0."""

    temperature: Tensor

    @staticmethod
    def of(z: Tensor, temperature: Tensor) -> UnitScaling:
        with torch.no_grad():
            norm = _norm(z)

            inverse = _inverse_scale(norm, temperature)

            radial = torch.where(norm > _NORM_EPS, inverse * temperature.square(), 0.0)

            return UnitScaling(scaled=z * inverse, inverse=inverse, radial=radial, temperature=temperature.detach())

    def backward(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """The gradients w.r.t. ``z`` and ``t`` of ``scaled`` given ``grad`` ``(N, G, D)``, which
        becomes the former.

        With ``u = z / |z| = t s`` for ``s = scaled``: ``d s / d z`` takes ``g`` to
        ``(g - u (u . g)) / (|z| t) = g / (|z| t) - s (s . g) t / |z|``, and
        ``d s / d t = -s / t``.
        """
        dot = torch.linalg.vecdot(self.scaled, grad).unsqueeze(-1)

        grad_temperature = (-dot.sum() / self.temperature).reshape(self.temperature.shape)

        return grad.mul_(self.inverse).addcmul_(self.scaled, dot.mul_(self.radial), value=-1.0), grad_temperature


def similarity_logits(scaled_z: Tensor, unit_codebook: Tensor) -> Tensor:
    """:param scaled_z: ``(C, G, D)`` from :func:`scaled_unit_features`.
    :param unit_codebook: ``(G, M, D)`` L2-normalized.
    :returns: ``(G, C, M)`` logits, one matrix product per codebook."""
    return torch.bmm(scaled_z.transpose(0, 1), unit_codebook.transpose(1, 2))


_ARGMAX_BLOCK = 32


def row_max(values: Tensor) -> tuple[Tensor, Tensor]:
    """``values.max(dim=-1)``: the maximum of each row and the first index that holds it.

    On a CPU, a maximum with its index is about twice as slow as one without, so the
    search goes by blocks of 32 columns: the maxima of every block (``amax``), the first block
    that holds the row's maximum, and the first index in it.

    :param values: ``(..., M)``, no NaN.
    :returns: ``(...)`` maxima and ``(...)`` int64 indices.
    """
    num_columns = values.size(-1)

    if values.device.type != "cpu" or num_columns % _ARGMAX_BLOCK != 0 or num_columns == _ARGMAX_BLOCK:
        top, indices = values.max(dim=-1)

        return top, indices

    blocks = values.reshape(*values.shape[:-1], num_columns // _ARGMAX_BLOCK, _ARGMAX_BLOCK)

    top, block = blocks.amax(dim=-1).max(dim=-1)

    within = blocks.gather(-2, block[..., None, None].expand(*block.shape, 1, _ARGMAX_BLOCK)).squeeze(-2)

    return top, block * _ARGMAX_BLOCK + within.argmax(dim=-1)


def nearest_codes(z: Tensor, codebook: Tensor, distance: Distance) -> Tensor:
    """Return the index of the nearest codebook entry of each feature, ``argmin_m D(z, q_m)``.

    :param z: ``(N, G, D)`` features.
    :param codebook: ``(G, M, D)`` codebook vectors.

    :returns: ``(N, G)`` codes.
    """
    if distance == "cosine":
        scores = torch.einsum("ngd,gmd->ngm", normalize(z, dim=-1), normalize(codebook, dim=-1))
    else:
        # -|z - q|^2 up to the constant |z|^2.
        scores = 2.0 * torch.einsum("ngd,gmd->ngm", z, codebook) - codebook.square().sum(-1)

    return row_max(scores)[1]


def gather_codes(codebook: Tensor, codes: Tensor) -> Tensor:
    """Look up codebook vectors.

    :param codebook: ``(G, M, D)``.
    :param codes: ``(N, G)``.

    :returns: ``(N, G, D)``.
    """
    group_index = torch.arange(codebook.size(0), device=codes.device)

    return codebook[group_index, codes]


def gumbel_softmax(
    logits: Tensor, tau: float, *, hard: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample a smoothed quantizer with Gumbel noise (eq. 6-8).

    ``p = softmax((g + log pi) / tau)``; ``log pi`` differs from the logits by a per-row
    constant, which softmax ignores. With ``hard`` the forward value is the onehot vector of
    ``argmax p`` and the gradient is that of ``p`` (eq. 8).

    :param logits: ``(..., M)`` unnormalized log assignment probabilities.

    :returns: ``(..., M)`` samples and ``(...)`` the sampled codes.
    """
    uniform = torch.rand(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator)

    # u in (0, 1) exactly: both logs stay finite.
    tiny = torch.finfo(logits.dtype).tiny
    gumbels = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))

    samples = softmax((logits + gumbels) / tau, dim=-1)

    codes = row_max(samples)[1]

    if hard:
        onehot = one_hot(codes, logits.size(-1)).to(samples.dtype)

        samples = straight_through(onehot, samples)

    return samples, codes
