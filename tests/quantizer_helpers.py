"""Helpers of the quantizer tests: a small quantizer, inputs with padding, and one training step
that returns the outputs and every gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from w2v_knnvq.quantizer import METHODS, QuantizerConfig, VectorQuantizer

NOISELESS = [name for name, spec in METHODS.items() if not spec.assignment.startswith("gumbel")]

GUMBEL = [name for name, spec in METHODS.items() if spec.assignment.startswith("gumbel")]

INPUT_DIM = 12
CODEBOOK_SIZE = 16
CODEBOOK_DIM = 6


def make_quantizer(method: str, num_codebooks: int, **overrides: Any) -> VectorQuantizer:
    torch.manual_seed(0)

    settings: dict[str, Any] = {"input_dim": INPUT_DIM, "codebook_size": CODEBOOK_SIZE, "codebook_dim": CODEBOOK_DIM}

    settings["knn_k"] = 3

    settings.update(overrides)

    config = QuantizerConfig.from_method(method, num_codebooks=num_codebooks, **settings)

    return VectorQuantizer(config).train()


def make_inputs(num_rows: int = 37, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``(N, 12)`` vectors and an ``(N,)`` mask with about a fifth of the rows padding."""
    generator = torch.Generator().manual_seed(seed)

    x = torch.randn(num_rows, INPUT_DIM, generator=generator)

    mask = torch.rand(num_rows, generator=generator) > 0.2

    return x, mask


def training_step(
    quantizer: torch.nn.Module,
    x: Tensor,
    mask: Tensor | None,
    *,
    loss_only: bool = False,
    through_probs: bool = False,
) -> dict[str, Tensor]:
    """One forward and backward; returns the outputs and every gradient. ``through_probs``
    adds terms of ``output.probs`` and ``output.log_probs`` to the objective."""
    quantizer.zero_grad()

    x = x.clone().requires_grad_()

    output = quantizer(x, mask, return_probs=through_probs)

    weights = torch.linspace(-1.0, 1.0, output.quantized.numel()).view_as(output.quantized)

    objective = 3.0 * output.loss if loss_only else (output.quantized * weights).sum() + 3.0 * output.loss

    if through_probs:
        assert output.probs is not None and output.log_probs is not None

        objective = objective + probability_terms(output.probs, output.log_probs)

    objective.backward()

    assert x.grad is not None

    result = {"loss": output.loss.detach(), "x_grad": x.grad.clone()}

    if not loss_only:
        result.update(quantized=output.quantized.detach(), codes=output.codes)

    for name, parameter in quantizer.named_parameters():
        if parameter.grad is not None:
            result[f"{name}_grad"] = parameter.grad.clone()

    return result


def probability_terms(probs: Tensor, log_probs: Tensor) -> Tensor:
    """A user's loss on the probabilities."""
    weights = torch.linspace(-0.5, 1.0, probs.numel(), dtype=probs.dtype).view_as(probs)

    return (probs * weights).sum() + 0.1 * (log_probs * weights.flip(0)).sum()


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()

    for name, value in expected.items():
        assert torch.allclose(actual[name].float(), value.float(), atol=atol, rtol=1e-5), name
