"""Gradient estimators of hard quantization (eq. 2-4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import normalize


def straight_through(q: Tensor, z: Tensor) -> Tensor:
    """Return ``q + z - detach(z)`` (eq. 2; eq. 8 with ``q = e``, ``z = p``).

    The forward value is ``q``; the Jacobian with respect to ``z`` is the identity.

    :param q: ``(..., D)`` quantized vectors.
    :param z: ``(..., D)`` pre-quantized vectors.
    """
    return q + (z - z.detach())


def rotation_trick(z: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Return ``detach(|q| / |z| R) z``, the rotation-trick estimator (eq. 3-4).

    ``R = I - 2 r r^T + 2 q^ z^T`` with ``r = (q^ + z^) / |q^ + z^|`` (footnote 1) rotates ``z^``
    onto ``q^``, so the forward value equals ``q`` and the Jacobian with respect to ``z`` is
    ``(|q| / |z|) R``. ``R`` is applied without materializing the ``(D, D)`` matrix.

    :param z: ``(..., D)`` pre-quantized vectors.
    :param q: ``(..., D)`` quantized vectors.
    """
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
        q_norm = q.norm(dim=-1, keepdim=True)

        z_hat = z / z_norm
        q_hat = normalize(q, dim=-1, eps=eps)
        r_hat = normalize(q_hat + z_hat, dim=-1, eps=eps)

        scale = q_norm / z_norm

    rotated = (
        z - 2.0 * r_hat * (r_hat * z).sum(dim=-1, keepdim=True) + 2.0 * q_hat * (z_hat * z).sum(dim=-1, keepdim=True)
    )

    return scale * rotated
