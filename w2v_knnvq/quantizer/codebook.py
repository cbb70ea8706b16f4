"""Codebooks: a plain learnable matrix, or SimVQ's reparameterization (section 2.3)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module, Parameter


class Codebook(Module):
    """G codebooks of M learnable vectors of dimension D."""

    weight: Parameter

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        codebook_dim: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()

        self.weight = Parameter(torch.empty((num_codebooks, codebook_size, codebook_dim), device=device, dtype=dtype))

        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Isotropic, so that the initial cosine similarities between entries are near zero.
        torch.nn.init.normal_(self.weight)

    def forward(self) -> Tensor:
        """:returns: ``(G, M, D)`` codebook vectors."""
        return self.weight


class SimVQCodebook(Module):
    """The codebook ``Q = Q' W`` of SimVQ: a frozen random ``(M, D)`` matrix ``Q'`` times a
    learnable ``(D, D)`` matrix ``W`` per codebook, so that updating one vector moves them all."""

    frozen: Tensor
    projection: Parameter

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        codebook_dim: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()

        frozen = torch.empty((num_codebooks, codebook_size, codebook_dim), device=device, dtype=dtype)

        # Persistent, so that a checkpoint keeps the random basis the projection was trained on.
        self.register_buffer("frozen", frozen)

        self.projection = Parameter(
            torch.empty((num_codebooks, codebook_dim, codebook_dim), device=device, dtype=dtype)
        )

        self.reset_parameters()

    def reset_parameters(self) -> None:
        codebook_dim = self.frozen.size(-1)

        torch.nn.init.normal_(self.frozen, std=codebook_dim**-0.5)

        with torch.no_grad():
            self.projection.copy_(torch.eye(codebook_dim, device=self.projection.device, dtype=self.projection.dtype))

    def forward(self) -> Tensor:
        """:returns: ``(G, M, D)`` codebook vectors ``Q' W``."""
        return torch.bmm(self.frozen, self.projection)
