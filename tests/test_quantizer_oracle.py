"""The smoothed quantizer against an independent float64 implementation of eq. 5 and 11-13 in
plain autograd: loss, outputs and every gradient, dense and chunked, warm and cold temperatures,
padding, K above the batch, a user's loss on the probabilities, and the regime next to the
simplex vertices where a float32 ``1 - 2 p_m + |p|^2`` cancels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn.functional import normalize

from tests.quantizer_helpers import make_inputs, make_quantizer, probability_terms, training_step
from w2v_knnvq.quantizer import METHODS, VectorQuantizer, accurate_log_softmax, knn_distances
from w2v_knnvq.quantizer.regularizers import knn_candidates


def _set_temperature(quantizer: VectorQuantizer, temperature: float) -> None:
    assert quantizer.log_temperature is not None

    with torch.no_grad():
        quantizer.log_temperature.fill_(math.log(temperature - quantizer.config.min_temperature))


def _reference_distances(logits: Tensor, metric: str) -> Tensor:
    """``(N, G, M)`` ``D(e_m, p)`` in float64, without cancellation: ``1 - p_m`` as the sum of the
    other entries, ``-log p_max = log1p(sum_{j != max} exp(l_j - l_max))``."""
    num_codes = logits.size(-1)

    others = ~torch.eye(num_codes, dtype=torch.bool)

    # (N, G, M, M): row m holds l_j - l_m for j != m.
    differences = (logits.unsqueeze(-2) - logits.unsqueeze(-1)).masked_fill(~others, -math.inf)

    if metric == "ce":
        # At a row's maximum the differences are <= 0 and their sum is exact; elsewhere
        # log Z - l_m is at least log 2.
        near = torch.log1p(differences.clamp_max(0.0).exp().sum(-1))

        is_max = logits == logits.amax(dim=-1, keepdim=True)

        return torch.where(is_max, near, logits.logsumexp(dim=-1, keepdim=True) - logits)

    probs = logits.softmax(dim=-1)

    rest = probs.unsqueeze(-2).expand(*probs.shape, num_codes).masked_fill(~others, 0.0)

    return rest.sum(-1).square() + rest.square().sum(-1)


def _reference_knn(distances: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Eq. 13 by a stable sort of every column: :returns: the loss and the ``(K', G, M)`` rows."""
    keys = distances.detach()

    if mask is not None:
        keys = keys.masked_fill(~mask.view(-1, 1, 1), math.inf)

    num_neighbours = min(k, int(mask.sum()) if mask is not None else distances.size(0))

    rows = keys.sort(dim=0, stable=True).indices[:num_neighbours]

    if num_neighbours == 0:
        return distances.sum() * 0.0, rows

    return distances.gather(0, rows).mean(), rows


def reference_step(
    quantizer: VectorQuantizer, x: Tensor, mask: Tensor | None, *, loss_only: bool = False, through_probs: bool = False
) -> dict[str, Tensor]:
    """:func:`training_step` of ``quantizer``'s parameters in float64, written from the paper."""
    config, spec = quantizer.config, quantizer.config.spec

    params = {name: p.detach().double().requires_grad_() for name, p in quantizer.named_parameters()}

    x64 = x.double().requires_grad_()

    projected = x64 if quantizer.input_proj is None else x64 @ params["input_proj.weight"].T + params["input_proj.bias"]

    z = projected.view(x.size(0), config.num_codebooks, config.codebook_dim)

    codebook = params["codebook.weight"]

    temperature = config.min_temperature + params["log_temperature"].exp()

    logits = torch.einsum("ngd,gmd->ngm", normalize(z, dim=-1), normalize(codebook, dim=-1)) / temperature

    log_probs = logits.log_softmax(dim=-1)

    probs = log_probs.exp()

    if spec.regularizer == "knn":
        loss, _ = _reference_knn(_reference_distances(logits, spec.knn_metric or "ce"), config.knn_k, mask)
    else:
        weights = torch.ones(x.size(0), dtype=torch.float64) if mask is None else mask.double()

        mean = (probs * weights.view(-1, 1, 1)).sum(0) / weights.sum().clamp_min(1.0)

        perplexity = (-(mean * mean.clamp_min(1e-300).log()).sum(-1)).exp()

        loss = (1.0 - perplexity / config.codebook_size).mean()

    quantized = torch.einsum("ngm,gmd->ngd", probs, codebook).flatten(1)

    weights = torch.linspace(-1.0, 1.0, quantized.numel(), dtype=torch.float64).view_as(quantized)

    objective = 3.0 * loss if loss_only else (quantized * weights).sum() + 3.0 * loss

    if through_probs:
        objective = objective + probability_terms(probs, log_probs)

    objective.backward()

    assert x64.grad is not None

    result = {"loss": loss.detach(), "x_grad": x64.grad}

    if not loss_only:
        result.update(quantized=quantized.detach(), codes=logits.argmax(dim=-1))

    for name, parameter in params.items():
        if parameter.grad is not None:
            result[f"{name}_grad"] = parameter.grad

    return result


def _assert_near(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float) -> None:
    """Each float32 value within ``rtol`` of the float64 one, relative to its largest entry; the
    temperature's gradient, a sum of terms up to ``1/t`` times larger that cancel at cold
    temperatures, within 1%."""
    assert actual.keys() == expected.keys()

    for name, value in expected.items():
        if name == "codes":
            assert torch.equal(actual[name], value), name
            continue

        scale = value.abs().max().item()

        tolerance = max(rtol, 1e-2) if name == "log_temperature_grad" else rtol

        error = (actual[name].double() - value).abs().max().item()

        assert error <= 1e-7 + tolerance * scale, (name, error, scale)


@pytest.mark.parametrize("method", ["softmax-knn-ce", "softmax-knn-l2", "softmax-ppl"])
@pytest.mark.parametrize("num_codebooks", [1, 2])
@pytest.mark.parametrize("num_rows", [2, 37])
@pytest.mark.parametrize("temperature", [0.1, 0.002])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_loss_outputs_and_gradients_equal_a_float64_reference(
    method: str, num_codebooks: int, num_rows: int, temperature: float, chunk_size: int | None
) -> None:
    """With padding rows and K = 3 above the two-row batch; at t = 0.002 (logits up to 500) most
    probabilities underflow. The dense pass also takes a loss on ``probs`` and ``log_probs``."""
    x, mask = make_inputs(num_rows, seed=num_rows)

    mask[0] = True

    quantizer = make_quantizer(method, num_codebooks, chunk_size=chunk_size)

    _set_temperature(quantizer, temperature)

    through_probs = chunk_size is None

    actual = training_step(quantizer, x, mask, through_probs=through_probs)

    expected = reference_step(quantizer, x, mask, through_probs=through_probs)

    # float32 logits of up to 500 carry errors of 500 x 2^-24, which the softmax's gradient
    # multiplies by up to 1/t.
    _assert_near(actual, expected, rtol=1e-4 if temperature >= 0.1 else 1e-3)


@pytest.mark.parametrize("method", ["sg-knn-ce", "hg-knn-l2", "hg-ppl"])
@pytest.mark.parametrize("temperature", [0.1, 0.002])
def test_gumbel_regularizer_gradients_equal_a_float64_reference(method: str, temperature: float) -> None:
    """The Gumbel methods regularize pi, not their noisy samples: the regularizer's gradients
    equal the reference's whatever noise was drawn."""
    x, mask = make_inputs(37, seed=4)

    quantizer = make_quantizer(method, 2)

    _set_temperature(quantizer, temperature)

    actual = training_step(quantizer, x, mask, loss_only=True)

    expected = reference_step(quantizer, x, mask, loss_only=True)

    _assert_near(actual, expected, rtol=1e-4 if temperature >= 0.1 else 1e-3)


def _near_vertex_quantizer(method: str) -> tuple[VectorQuantizer, Tensor]:
    """1 x 8 codes of dimension 12 whose pairwise cosines are 2/3, at t = 0.02, and 24 inputs
    next to the codes: each p is within about ``1e-6`` of its vertex, so eq. 13's distances are
    about ``1e-12``."""
    torch.manual_seed(0)

    quantizer = make_quantizer(method, 1, input_dim=12, codebook_size=8, codebook_dim=12)

    _set_temperature(quantizer, 0.02)

    basis = torch.linalg.qr(torch.randn(12, 12)).Q

    # q_m = sqrt(2) u + v_m for orthonormal u, v_m: |q_m|^2 = 3, q_m . q_n = 2.
    codebook = math.sqrt(2.0) * basis[0] + basis[1:9]

    with torch.no_grad():
        quantizer.codebook.weight.copy_(codebook.unsqueeze(0))

    x = codebook.repeat(3, 1) + 1e-3 * torch.randn(24, 12)

    return quantizer, x


@pytest.mark.parametrize("metric", ["l2", "ce"])
def test_knn_is_exact_next_to_the_vertices(metric: str) -> None:
    """The paper's KNN-L2 regime (individual perplexity 1.00): loss, selected neighbours and
    gradients within 1e-3 of float64, where ``1 - 2 p_m + |p|^2`` in float32 reads 0."""
    quantizer, x = _near_vertex_quantizer(f"softmax-knn-{metric}")

    actual = training_step(quantizer, x, None, loss_only=True)

    expected = reference_step(quantizer, x, None, loss_only=True)

    # CE: about s = 1 - p_m; L2: about s^2.
    low, high = (1e-14, 1e-9) if metric == "l2" else (1e-8, 1e-5)

    assert low < expected["loss"].item() < high

    assert actual["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-3)

    _assert_near(actual, expected, rtol=1e-3)

    # The selected neighbours are the float64 ones.
    with torch.no_grad():
        output = quantizer(x, return_probs=True)

        assert output.log_probs is not None and output.logits is not None

        _, rows = knn_candidates(knn_distances(output.log_probs, metric), quantizer.config.knn_k)  # type: ignore[arg-type]

        _, expected_rows = _reference_knn(
            _reference_distances(output.logits.double(), metric), quantizer.config.knn_k, None
        )

    assert torch.equal(rows, expected_rows)

    if metric == "l2":
        # What the accurate distance replaces: the expanded square is wrong by more than half.
        probs = output.log_probs.exp()

        naive = (1.0 - 2.0 * probs + probs.square().sum(-1, keepdim=True)).gather(0, rows).mean()

        assert abs(naive.item() - expected["loss"].item()) > 0.5 * expected["loss"].item()


def test_accurate_log_softmax_keeps_the_distance_to_the_vertex() -> None:
    """``log p_max = -log1p(s)`` where a log-sum-exp gives 0: s = 3e-9 survives."""
    logits = torch.tensor([[0.0, -20.0, -21.0, -40.0]])

    s = math.exp(-20.0) + math.exp(-21.0) + math.exp(-40.0)

    log_probs = accurate_log_softmax(logits)

    assert torch.log_softmax(logits, dim=-1)[0, 0].item() == 0.0
    assert log_probs[0, 0].item() == pytest.approx(-math.log1p(s), rel=1e-6)
    assert torch.allclose(log_probs, torch.log_softmax(logits.double(), dim=-1).float(), rtol=1e-6)


def test_underflowing_probabilities_rank_neighbours_by_their_logarithm() -> None:
    """At a temperature near the floor most probabilities underflow to 0 and tie; the K nearest
    samples of such a vertex are still the K largest log-probabilities, as in eq. 13."""
    torch.manual_seed(0)

    logits = torch.randn(50, 1, 8) * 400.0

    log_probs = accurate_log_softmax(logits)

    assert bool((log_probs.exp() == 0.0).any())

    scores, rows = knn_candidates(knn_distances(log_probs, "ce"), 3)

    # The float64 log-probabilities rounded to float32: where a log-sum-exp reads 0, a
    # dominant entry's -1e-32 still ranks below an exact 0.
    reference = (-_reference_distances(logits.double(), "ce")).float()

    expected_rows = reference.sort(dim=0, descending=True, stable=True).indices[:3]

    assert torch.equal(rows, expected_rows)
    assert torch.allclose(scores, reference.gather(0, expected_rows), rtol=1e-5)


def test_every_smoothed_method_is_covered() -> None:
    smoothed = {name for name, spec in METHODS.items() if spec.smoothed}

    assert len(smoothed) == 9
