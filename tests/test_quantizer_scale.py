"""The quantizer at scale: the chunked path against the dense one, random vertex subsets,
and the global KNN of two gloo processes against one process on the concatenated batch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from w2v_knnvq.quantizer import METHODS, QuantizerConfig, VectorQuantizer
from w2v_knnvq.quantizer.assign import cosine_logits, gumbel_softmax
from w2v_knnvq.quantizer.knn import draw_vertex_subset, knn_scores
from w2v_knnvq.quantizer.smoothed import SmoothedSettings, quantize_smoothed

NOISELESS = [name for name, spec in METHODS.items() if not spec.assignment.startswith("gumbel")]

GUMBEL = [name for name, spec in METHODS.items() if spec.assignment.startswith("gumbel")]


def _quantizer(method: str, num_codebooks: int, **overrides: Any) -> VectorQuantizer:
    torch.manual_seed(0)

    overrides.setdefault("knn_k", 3)

    config = QuantizerConfig.from_method(
        method, input_dim=12, num_codebooks=num_codebooks, codebook_size=16, codebook_dim=6, **overrides
    )

    return VectorQuantizer(config).train()


def _inputs(num_rows: int = 37, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)

    x = torch.randn(num_rows, 12, generator=generator)

    mask = torch.rand(num_rows, generator=generator) > 0.2

    return x, mask


def _step(
    quantizer: VectorQuantizer,
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

    output = quantizer(x, mask)

    weights = torch.linspace(-1.0, 1.0, output.quantized.numel()).view_as(output.quantized)

    objective = 3.0 * output.loss if loss_only else (output.quantized * weights).sum() + 3.0 * output.loss

    if through_probs:
        assert output.probs is not None and output.log_probs is not None

        objective = objective + _probability_terms(output.probs, output.log_probs)

    objective.backward()

    result = {"loss": output.loss.detach(), "x_grad": x.grad.clone()}

    if not loss_only:
        result.update(quantized=output.quantized.detach(), codes=output.codes)

    for name, parameter in quantizer.named_parameters():
        if parameter.grad is not None:
            result[f"{name}_grad"] = parameter.grad.clone()

    return result


def _probability_terms(probs: Tensor, log_probs: Tensor) -> Tensor:
    """A user's loss on the probabilities, which the fused backward pass must add in."""
    weights = torch.linspace(-0.5, 1.0, probs.numel()).view_as(probs)

    return (probs * weights).sum() + 0.1 * (log_probs * weights.flip(0)).sum()


def _assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()

    for name, value in expected.items():
        assert torch.allclose(actual[name].float(), value.float(), atol=atol, rtol=1e-5), name


@pytest.mark.parametrize("method", NOISELESS)
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_chunked_equals_dense(method: str, num_codebooks: int) -> None:
    x, mask = _inputs()

    dense = _step(_quantizer(method, num_codebooks), x, mask)

    chunked = _quantizer(method, num_codebooks, chunk_size=8)
    chunked_result = _step(chunked, x, mask)

    _assert_close(chunked_result, dense)

    if METHODS[method].smoothed:
        output = chunked(x, mask)

        # No (N, G, M) tensor in chunked mode; the tightness is still there.
        assert output.probs is None and output.log_probs is None
        assert output.individual_perplexity is not None and output.individual_perplexity.shape == (37, num_codebooks)


@pytest.mark.parametrize("method", GUMBEL)
def test_chunked_gumbel_has_the_dense_loss_and_regularizer_gradients(method: str) -> None:
    x, mask = _inputs()

    dense = _step(_quantizer(method, 2), x, mask, loss_only=True)

    chunked = _step(_quantizer(method, 2, chunk_size=5), x, mask, loss_only=True)

    _assert_close(chunked, dense)


def test_chunked_gumbel_recomputes_the_same_noise() -> None:
    """The main-loss gradient of a chunked Gumbel step matches autograd through the samples
    that its own forward pass drew."""
    x, _ = _inputs()

    quantizer = _quantizer("sg-knn-ce", 2, chunk_size=5)

    z = x.view(-1, 2, 6).detach().requires_grad_()

    codebook = quantizer.codebook().detach()

    temperature = quantizer.temperature().detach()

    settings = SmoothedSettings(
        assignment="gumbel-soft", knn_metric="ce", knn_k=3, gumbel_tau=1.0, training=True, noise_seed=7
    )

    result = quantize_smoothed(z, codebook, temperature, None, settings, 5)

    (result.quantized * torch.arange(result.quantized.numel()).view_as(result.quantized)).sum().backward()

    # The reference: the same noise, chunk by chunk, through plain autograd.
    z_ref = z.detach().requires_grad_()

    parts = []

    for index, start in enumerate(range(0, z.size(0), 5)):
        logits = cosine_logits(z_ref[start : start + 5], codebook, temperature)

        generator = torch.Generator().manual_seed(settings.noise_seed + index)

        samples, _ = gumbel_softmax(logits, 1.0, hard=False, generator=generator)

        parts.append(torch.einsum("ngm,gmd->ngd", samples, codebook))

    (torch.cat(parts) * torch.arange(result.quantized.numel()).view_as(result.quantized)).sum().backward()

    assert z.grad is not None and z_ref.grad is not None
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)


def test_chunked_path_holds_no_n_by_m_tensor() -> None:
    """Nothing of N x M elements is saved for backward."""
    torch.manual_seed(0)

    config = QuantizerConfig.from_method(
        "softmax-knn-ce", input_dim=8, num_codebooks=1, codebook_size=512, codebook_dim=8, knn_k=2, chunk_size=64
    )

    quantizer = VectorQuantizer(config).train()

    x = torch.randn(2048, 8, requires_grad=True)

    largest = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal largest

        largest = max(largest, tensor.numel())

        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = quantizer(x)

    output.loss.backward()

    assert largest < 2048 * 512 // 8


def test_vertex_subset_loss_is_the_mean_over_its_vertices() -> None:
    torch.manual_seed(3)

    log_probs = torch.randn(40, 2, 16).log_softmax(dim=-1)

    subset = draw_vertex_subset(2, 16, 0.25, device=torch.device("cpu"))

    assert subset is not None and subset.shape == (2, 4)
    assert all(len(set(row.tolist())) == 4 for row in subset)

    # Eq. 13 per vertex: the mean distance of its K = 3 nearest samples.
    per_vertex = -knn_scores(log_probs, "ce").topk(3, dim=0).values.mean(dim=0)

    expected = per_vertex.gather(1, subset).mean()

    settings = SmoothedSettings(
        assignment="softmax", knn_metric="ce", knn_k=3, gumbel_tau=1.0, training=True, vertex_subset=subset
    )

    assert _subset_loss(log_probs, settings).item() == pytest.approx(expected.item(), rel=1e-6)

    assert draw_vertex_subset(2, 16, 1.0, device=torch.device("cpu")) is None


def _subset_loss(log_probs: Tensor, settings: SmoothedSettings) -> Tensor:
    from w2v_knnvq.quantizer.knn import local_candidates, restrict_to_vertices, select_neighbours

    assert settings.knn_metric is not None

    scores = restrict_to_vertices(knn_scores(log_probs, settings.knn_metric), settings.vertex_subset)

    candidates, _ = local_candidates(scores, settings.knn_k)

    return select_neighbours(candidates, log_probs.size(0), settings.knn_k, None).loss(candidates)


def test_vertex_subsets_average_to_the_full_loss() -> None:
    x, mask = _inputs(64)

    full = _quantizer("softmax-knn-ce", 2)(x, mask).loss.item()

    subsampled = _quantizer("softmax-knn-ce", 2, knn_vertex_fraction=0.25)

    torch.manual_seed(11)

    losses = [subsampled(x, mask).loss.item() for _ in range(400)]

    mean = sum(losses) / len(losses)

    spread = math.sqrt(sum((loss - mean) ** 2 for loss in losses) / (len(losses) - 1))

    assert min(losses) < full < max(losses)
    assert abs(mean - full) < 4 * spread / math.sqrt(len(losses))


def test_vertex_subsets_work_chunked() -> None:
    x, mask = _inputs()

    results = []

    for chunk_size in (None, 6):
        quantizer = _quantizer("softmax-knn-l2", 2, knn_vertex_fraction=0.5, chunk_size=chunk_size)

        torch.manual_seed(5)

        results.append(_step(quantizer, x, mask))

    _assert_close(results[1], results[0])


def test_dense_and_chunked_settings_agree_on_mean_probabilities() -> None:
    x, mask = _inputs()

    quantizer = _quantizer("softmax-ppl", 2)

    z = x.view(-1, 2, 6)

    settings = SmoothedSettings(assignment="softmax", knn_metric=None, knn_k=1, gumbel_tau=1.0, training=True)

    args = (z, quantizer.codebook().detach(), quantizer.temperature().detach(), mask, settings)

    dense, chunked = quantize_smoothed(*args), quantize_smoothed(*args, 4)

    assert torch.allclose(dense.mean_probs, chunked.mean_probs, atol=1e-6)
    assert torch.allclose(dense.individual_perplexity, chunked.individual_perplexity, atol=1e-5)
    assert dense.num_loss_samples == chunked.num_loss_samples == int(mask.sum())


# --- global KNN across two processes ------------------------------------------------------

WORLD_SIZE = 2

# (method, G, chunk_size, rows per rank): CE and L2, softmax and Gumbel, G = 1 and 2, dense and
# chunked; the last case gives each rank fewer rows than K.
GLOBAL_CASES = [
    ("softmax-knn-ce", 1, None, (21, 16)),
    ("softmax-knn-l2", 2, None, (21, 16)),
    ("sg-knn-ce", 2, None, (21, 16)),
    ("hg-knn-l2", 1, 7, (21, 16)),
    ("softmax-knn-ce", 2, 5, (21, 16)),
    ("softmax-knn-ce", 2, None, (2, 3)),
]

GLOBAL_K = 4


def _global_case(case: int, *, chunk: bool = True) -> tuple[VectorQuantizer, Tensor, Tensor]:
    method, num_codebooks, chunk_size, rows = GLOBAL_CASES[case]

    quantizer = _quantizer(method, num_codebooks, knn_k=GLOBAL_K, chunk_size=chunk_size if chunk else None)

    x, mask = _inputs(sum(rows), seed=10 + case)

    return quantizer, x, mask


def _global_worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)

    try:
        for case in range(len(GLOBAL_CASES)):
            quantizer, x, mask = _global_case(case)

            rows = GLOBAL_CASES[case][3]

            start = sum(rows[:rank])

            part = slice(start, start + rows[rank])

            result = _step(quantizer, x[part], mask[part], loss_only=True)

            output = quantizer(x[part], mask[part])

            result["num_loss_samples"] = torch.tensor(output.num_loss_samples)

            # Eval mode selects per rank, with no collective (rank 1 skips it).
            if rank == 0:
                quantizer.eval()

                result["eval_loss"] = quantizer(x[part], mask[part]).loss.detach()

            torch.save(result, Path(result_dir, f"case{case}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_knn_of_two_processes_equals_one_process(tmp_path: Path) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    mp.start_processes(  # type: ignore[attr-defined]  # torch does not re-export it in __all__
        _global_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork"
    )

    for case, (method, _, _, rows) in enumerate(GLOBAL_CASES):
        quantizer, x, mask = _global_case(case, chunk=False)

        reference = _step(quantizer, x, mask, loss_only=True)

        results = [torch.load(tmp_path / f"case{case}_rank{rank}.pt") for rank in range(WORLD_SIZE)]

        starts = [0, rows[0]]

        for rank, result in enumerate(results):
            # Every rank reports the loss of the whole batch ...
            assert result["loss"].item() == pytest.approx(reference["loss"].item(), abs=1e-6), (method, rank)

            # ... and gets its own slice of the gradient.
            own = slice(starts[rank], starts[rank] + rows[rank])

            assert torch.allclose(result["x_grad"], reference["x_grad"][own], atol=1e-6), (method, rank)

            assert int(result["num_loss_samples"]) == int(mask.sum()), (method, rank)

        for name, value in reference.items():
            if name.endswith("_grad") and name != "x_grad":
                summed = sum(result[name] for result in results)

                assert torch.allclose(summed, value, atol=1e-6), (method, name)

        # Eval mode: rank 0's own K nearest, as a per-rank KNN would take them.
        quantizer.eval()

        expected_eval = quantizer(x[: rows[0]], mask[: rows[0]]).loss

        assert results[0]["eval_loss"].item() == pytest.approx(expected_eval.item(), abs=1e-6), method


def test_tied_scores_select_exactly_k_neighbours() -> None:
    """Triplicated inputs tie in every column: each path counts exactly K neighbours per
    vertex (the loss value), and the duplicates share the gradient however the tie is broken."""
    x, _ = _inputs(12)

    x = torch.cat([x, x, x])

    dense = _step(_quantizer("softmax-knn-ce", 2, knn_k=4), x, None)

    chunked = _step(_quantizer("softmax-knn-ce", 2, knn_k=4, chunk_size=7), x, None)

    # Eq. 13 by hand: per column the 4 largest log-probabilities of the 36 rows, ties included.
    quantizer = _quantizer("softmax-knn-ce", 2, knn_k=4)

    with torch.no_grad():
        log_probs = quantizer(x).log_probs

    assert log_probs is not None

    expected = -log_probs.sort(dim=0, descending=True).values[:4].mean()

    for result in (dense, chunked):
        assert result["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    for name in dense:
        if name == "x_grad":
            # (3 copies, 12, 12) -> summed over the copies.
            assert torch.allclose(chunked[name].view(3, 12, 12).sum(0), dense[name].view(3, 12, 12).sum(0), atol=1e-5)
        elif name != "loss":
            assert torch.allclose(chunked[name], dense[name], atol=1e-5), name


def _reference_top_k(keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(G, N, M)`` -> the K largest keys per column and their rows, ties to the lower row,
    by one stable sort of each whole column."""
    order = keys.sort(dim=1, descending=True, stable=True).indices[:, :k]

    return keys.gather(1, order).transpose(0, 1), order.transpose(0, 1)


@pytest.mark.parametrize("num_rows", [1, 3, 37, 64, 1000])
def test_column_top_k_is_exact_with_ties_and_masked_rows(num_rows: int) -> None:
    """The block search gives the K best rows of every column as one stable sort of the whole
    column does: with ties (rounded keys), rows that never count (-inf), K above N and a vertex
    subset."""
    from w2v_knnvq.quantizer.knn import column_top_k

    generator = torch.Generator().manual_seed(num_rows)

    keys = (torch.rand(2, num_rows, 9, generator=generator) * 6).round()

    keys[:, torch.rand(num_rows, generator=generator) < 0.2] = -math.inf

    for k in (1, 2, 5):
        values, rows = column_top_k(keys, k)

        expected_values, expected_rows = _reference_top_k(keys, min(k, num_rows))

        assert torch.equal(values[: min(k, num_rows)], expected_values)
        assert torch.equal(rows[: min(k, num_rows)], expected_rows)

        # Below K rows: padded.
        assert bool((values[num_rows:] == -math.inf).all()) and bool((rows[num_rows:] == -1).all())

        subset = torch.tensor([[0, 4, 8], [1, 2, 7]])

        subset_values, subset_rows = column_top_k(keys, k, subset)

        assert torch.equal(subset_values, values.gather(2, subset.expand(k, -1, -1)))
        assert torch.equal(subset_rows, rows.gather(2, subset.expand(k, -1, -1)))


def test_row_max_is_max_with_the_first_index() -> None:
    """The block search gives ``max(dim=-1)``'s values and first indices: ties within and across
    blocks, rows of ``-inf``, widths that are and are not multiples of the block."""
    from w2v_knnvq.quantizer.assign import row_max

    generator = torch.Generator().manual_seed(5)

    for width in (32, 64, 320, 1024, 100):
        values = torch.randint(0, 4, (3, 50, width), generator=generator).float()

        values[0, 7] = -math.inf
        values[1, 3, width // 2] = 9.0
        values[1, 4, width - 1] = 9.0

        top, indices = row_max(values)

        expected = values.max(dim=-1)

        assert torch.equal(top, expected.values) and torch.equal(indices, expected.indices)

        assert torch.equal(indices, (values == top.unsqueeze(-1)).int().argmax(dim=-1))


def test_unit_scaling_backward_equals_autograd_through_normalize() -> None:
    """The hand-written gradient of ``z / (max(|z|, eps) t)`` w.r.t. ``z`` and ``t`` is that of
    ``normalize(z) / t``, also for rows whose norm is 0 or under ``normalize``'s floor."""
    from w2v_knnvq.quantizer.assign import UnitScaling

    generator = torch.Generator().manual_seed(3)

    z = torch.randn(9, 2, 5, generator=generator, dtype=torch.float64)

    z[0, 1] = 0.0
    z[3, 0] = 1e-14

    log_temperature = torch.tensor(-1.7, dtype=torch.float64, requires_grad=True)

    grad = torch.randn(9, 2, 5, generator=generator, dtype=torch.float64)

    z_ref = z.clone().requires_grad_()

    reference = torch.nn.functional.normalize(z_ref, dim=-1) / log_temperature.exp()

    expected_z, expected_t = torch.autograd.grad(reference, [z_ref, log_temperature], grad)

    scaling = UnitScaling.of(z, log_temperature.exp())

    assert torch.allclose(scaling.scaled, reference, rtol=1e-12, atol=0.0)

    grad_z, grad_temperature = scaling.backward(grad.clone())

    (grad_log_temperature,) = torch.autograd.grad(log_temperature.exp(), log_temperature, grad_temperature)

    assert torch.allclose(grad_z, expected_z, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_log_temperature, expected_t, rtol=1e-10)

    # Below the floor the norm is a constant: the gradient is g / (eps t), no radial term.
    assert torch.allclose(grad_z[0, 1], grad[0, 1] / (1e-12 * log_temperature.exp().detach()))


@pytest.mark.parametrize("method", ["softmax-knn-ce", "softmax-knn-l2"])
@pytest.mark.parametrize("num_codebooks", [1, 2])
@pytest.mark.parametrize("num_rows", [2, 37])
@pytest.mark.parametrize("temperature", [None, 0.002])
def test_dense_loss_and_gradients_equal_autograd_through_top_k(
    method: str, num_codebooks: int, num_rows: int, temperature: float | None
) -> None:
    """The fused gradient of the dense pass (softmax backward plus the sparse KNN term) equals
    plain autograd through log-softmax, ``topk`` and eq. 13 (:func:`knn_loss`), for every
    parameter and the input, with padding rows, K = 3 above the two-row batch, and a loss on
    ``output.probs`` and ``output.log_probs`` too. At a temperature near the floor (logits up
    to 500) most probabilities underflow."""
    from w2v_knnvq.quantizer import knn_loss

    x, mask = _inputs(num_rows, seed=num_rows)

    mask[0] = True

    quantizer = _quantizer(method, num_codebooks)

    if temperature is not None:
        with torch.no_grad():
            quantizer.log_temperature.fill_(math.log(temperature - quantizer.config.min_temperature))

    fused = _step(quantizer, x, mask, through_probs=True)

    # The reference: the same quantizer's logits through autograd only.
    quantizer.zero_grad()

    x_ref = x.clone().requires_grad_()

    projected = x_ref if quantizer.input_proj is None else quantizer.input_proj(x_ref)

    z = projected.view(num_rows, num_codebooks, 6)

    logits = cosine_logits(z, quantizer.codebook(), quantizer.temperature())

    probs = torch.softmax(logits, dim=-1)

    quantized = torch.einsum("ngm,gmd->ngd", probs, quantizer.codebook()).flatten(1)

    loss = knn_loss(torch.log_softmax(logits, dim=-1), 3, METHODS[method].knn_metric or "ce", mask=mask)

    weights = torch.linspace(-1.0, 1.0, quantized.numel()).view_as(quantized)

    objective = (quantized * weights).sum() + 3.0 * loss + _probability_terms(probs, torch.log_softmax(logits, dim=-1))

    objective.backward()

    assert x_ref.grad is not None

    reference = {
        "loss": loss.detach(),
        "x_grad": x_ref.grad,
        "quantized": quantized.detach(),
        "codes": logits.argmax(dim=-1),
    }

    for name, parameter in quantizer.named_parameters():
        if parameter.grad is not None:
            reference[f"{name}_grad"] = parameter.grad

    if temperature is None:
        _assert_close(fused, reference)
    else:
        # Gradients of up to 1/t = 500 times the warm ones: float32 rounding of their size.
        assert fused.keys() == reference.keys()

        for name, value in reference.items():
            error = (fused[name].float() - value.float()).abs().max()

            assert error <= 1e-5 + 1e-6 * value.float().abs().max(), name


@pytest.mark.parametrize("method", ["sg-knn-ce", "hg-knn-ce", "hg-knn-l2"])
def test_gumbel_regularizer_and_probability_gradients_equal_autograd(method: str) -> None:
    """With Gumbel samples, whose codes are not the argmax, the regularizer's and a loss on
    ``output.probs``'s gradients still equal plain autograd's, at a cold temperature too."""
    from w2v_knnvq.quantizer import knn_loss

    x, mask = _inputs(37, seed=4)

    for temperature in (0.1, 0.002):
        quantizer = _quantizer(method, 2)

        with torch.no_grad():
            quantizer.log_temperature.fill_(math.log(temperature - quantizer.config.min_temperature))

        fused = _step(quantizer, x, mask, loss_only=True, through_probs=True)

        quantizer.zero_grad()

        x_ref = x.clone().requires_grad_()

        logits = cosine_logits(x_ref.view(37, 2, 6), quantizer.codebook(), quantizer.temperature())

        log_probs = torch.log_softmax(logits, dim=-1)

        loss = knn_loss(log_probs, 3, METHODS[method].knn_metric or "ce", mask=mask)

        (3.0 * loss + _probability_terms(log_probs.exp(), log_probs)).backward()

        assert x_ref.grad is not None and quantizer.codebook.weight.grad is not None

        for name, expected in (("x_grad", x_ref.grad), ("codebook.weight_grad", quantizer.codebook.weight.grad)):
            error = (fused[name] - expected).abs().max()

            assert error <= 1e-5 + 1e-6 * expected.abs().max(), (name, temperature)


def test_underflowing_probabilities_rank_neighbours_by_their_logarithm() -> None:
    """At a temperature near the floor most probabilities underflow to 0 and tie; the K nearest
    samples of such a vertex are still the K largest log-probabilities, as in eq. 13."""
    from w2v_knnvq.quantizer.smoothed import SoftmaxRows, knn_candidates, softmax_rows

    torch.manual_seed(0)

    logits = torch.randn(1, 50, 8) * 400.0

    settings = SmoothedSettings(assignment="softmax", knn_metric="ce", knn_k=3, gumbel_tau=1.0, training=True)

    rows: SoftmaxRows = softmax_rows(logits)

    assert bool((rows.probs == 0.0).any())

    scores, candidate_rows = knn_candidates(logits, rows, None, settings)

    expected_scores, expected_rows = _reference_top_k(torch.log_softmax(logits, dim=-1), 3)

    assert torch.equal(candidate_rows, expected_rows)
    assert torch.allclose(scores, expected_scores, rtol=1e-5)
