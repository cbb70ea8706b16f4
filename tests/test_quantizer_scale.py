"""The quantizer at scale: the chunked path against the dense one, random vertex subsets, the
exact top-K search, and the global KNN of 2 and 8 gloo processes (empty ranks included) against
one process on the concatenated batch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from tests.quantizer_helpers import (
    GUMBEL,
    NOISELESS,
    assert_close,
    make_inputs,
    make_quantizer,
    training_step,
)
from w2v_knnvq.quantizer import METHOD_NAMES, METHODS, QuantizerConfig, VectorQuantizer, knn_distances, knn_loss
from w2v_knnvq.quantizer.assign import cosine_logits, gumbel_softmax
from w2v_knnvq.quantizer.knn import column_top_k, draw_vertex_subset
from w2v_knnvq.quantizer.smoothed import SmoothedSettings, quantize_smoothed


@pytest.mark.parametrize("method", NOISELESS)
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_chunked_equals_dense(method: str, num_codebooks: int) -> None:
    x, mask = make_inputs()

    dense = training_step(make_quantizer(method, num_codebooks), x, mask)

    chunked = make_quantizer(method, num_codebooks, chunk_size=8)
    chunked_result = training_step(chunked, x, mask)

    assert_close(chunked_result, dense)

    if METHODS[method].smoothed:
        output = chunked(x, mask, return_probs=True)

        # No (N, G, M) tensor in chunked mode; the tightness is still there.
        assert output.probs is None and output.log_probs is None and output.logits is None
        assert output.individual_perplexity is not None and output.individual_perplexity.shape == (37, num_codebooks)


@pytest.mark.parametrize("method", GUMBEL)
def test_chunked_gumbel_has_the_dense_loss_and_regularizer_gradients(method: str) -> None:
    x, mask = make_inputs()

    dense = training_step(make_quantizer(method, 2), x, mask, loss_only=True)

    chunked = training_step(make_quantizer(method, 2, chunk_size=5), x, mask, loss_only=True)

    assert_close(chunked, dense)


@pytest.mark.parametrize("assignment", ["gumbel-soft", "gumbel-hard"])
def test_chunked_gumbel_recomputes_the_same_noise(assignment: str) -> None:
    """A chunked Gumbel step's outputs and main-loss gradient equal plain autograd through the
    samples that its forward pass drew (the recomputation in backward replays the noise)."""
    x, _ = make_inputs()

    quantizer = make_quantizer("sg-knn-ce", 2)

    codebook = quantizer.codebook().detach()

    temperature = quantizer.temperature().detach()

    settings = SmoothedSettings(assignment=assignment, knn_metric="ce", knn_k=3, gumbel_tau=0.7, training=True)  # type: ignore[arg-type]

    z = x.view(-1, 2, 6).detach().requires_grad_()

    torch.manual_seed(7)

    result = quantize_smoothed(z, codebook, temperature, None, settings, 5)

    weights = torch.arange(result.quantized.numel(), dtype=torch.float32).view_as(result.quantized)

    # Other draws between forward and backward must not change the replayed noise.
    torch.rand(100)

    (result.quantized * weights).sum().backward()

    # The reference: the same noise, chunk by chunk, through plain autograd.
    z_ref = z.detach().requires_grad_()

    torch.manual_seed(7)

    parts, codes = [], []

    for start in range(0, z.size(0), 5):
        logits = cosine_logits(z_ref[start : start + 5], codebook, temperature)

        samples, sample_codes = gumbel_softmax(logits, 0.7, hard=assignment == "gumbel-hard")

        parts.append(torch.einsum("ngm,gmd->ngd", samples, codebook))

        codes.append(sample_codes)

    reference = torch.cat(parts)

    (reference * weights).sum().backward()

    assert torch.allclose(result.quantized, reference.detach(), atol=1e-6)
    assert torch.equal(result.codes, torch.cat(codes))
    assert z.grad is not None and z_ref.grad is not None
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-5)


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

    assert largest < 2048 * config.codebook_size // 8


def test_vertex_subset_loss_is_the_mean_over_its_vertices() -> None:
    torch.manual_seed(3)

    log_probs = torch.randn(40, 2, 16).log_softmax(dim=-1)

    subset = draw_vertex_subset(2, 16, 0.25, device=torch.device("cpu"))

    assert subset is not None and subset.shape == (2, 4)
    assert all(len(set(row.tolist())) == 4 for row in subset)

    # Eq. 13 per vertex: the mean distance of its K = 3 nearest samples.
    per_vertex = -log_probs.topk(3, dim=0).values.mean(dim=0)

    expected = per_vertex.gather(1, subset).mean()

    assert knn_loss(log_probs, 3, "ce", vertices=subset).loss.item() == pytest.approx(expected.item(), rel=1e-6)

    assert draw_vertex_subset(2, 16, 1.0, device=torch.device("cpu")) is None


def test_vertex_subsets_average_to_the_full_loss() -> None:
    x, mask = make_inputs(64)

    full = make_quantizer("softmax-knn-ce", 2)(x, mask).loss.item()

    subsampled = make_quantizer("softmax-knn-ce", 2, knn_vertex_fraction=0.25)

    torch.manual_seed(11)

    losses = [subsampled(x, mask).loss.item() for _ in range(400)]

    mean = sum(losses) / len(losses)

    spread = math.sqrt(sum((loss - mean) ** 2 for loss in losses) / (len(losses) - 1))

    assert min(losses) < full < max(losses)
    assert abs(mean - full) < 4 * spread / math.sqrt(len(losses))


def test_vertex_subsets_work_chunked() -> None:
    x, mask = make_inputs()

    results = []

    for chunk_size in (None, 6):
        quantizer = make_quantizer("softmax-knn-l2", 2, knn_vertex_fraction=0.5, chunk_size=chunk_size)

        torch.manual_seed(5)

        results.append(training_step(quantizer, x, mask))

    assert_close(results[1], results[0])


def test_dense_and_chunked_passes_agree_on_statistics() -> None:
    x, mask = make_inputs()

    quantizer = make_quantizer("softmax-ppl", 2)

    z = x.view(-1, 2, 6)

    settings = SmoothedSettings(assignment="softmax", knn_metric=None, knn_k=1, gumbel_tau=1.0, training=True)

    args = (z, quantizer.codebook().detach(), quantizer.temperature().detach(), mask, settings)

    dense, chunked = quantize_smoothed(*args), quantize_smoothed(*args, 4)

    assert torch.allclose(dense.mean_probs, chunked.mean_probs, atol=1e-6)
    assert torch.allclose(dense.individual_perplexity, chunked.individual_perplexity, atol=1e-5)
    assert int(dense.num_loss_samples) == int(chunked.num_loss_samples) == int(mask.sum())


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_every_method_takes_an_empty_batch(method: str, chunk_size: int | None) -> None:
    """A rank with no vectors (N = 0, or every row padding) gets a finite loss and gradients."""
    quantizer = make_quantizer(method, 2, chunk_size=chunk_size)

    x, _ = make_inputs(9)

    for rows, mask in ((x[:0], None), (x, torch.zeros(9, dtype=torch.bool))):
        result = training_step(quantizer, rows, mask)

        assert all(bool(torch.isfinite(value.float()).all()) for value in result.values()), (method, rows.shape)

        assert quantizer(rows, mask).num_samples.item() == 0


# --- exact top-K ----------------------------------------------------------------------------


def _reference_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(N, G, M)`` -> the K largest scores per column and their rows, ties to the lower row,
    by one stable sort of each whole column."""
    order = scores.sort(dim=0, descending=True, stable=True).indices[:k]

    return scores.gather(0, order), order


@pytest.mark.parametrize("num_rows", [0, 1, 3, 31, 32, 33, 37, 64, 1000])
def test_column_top_k_is_exact_with_ties_and_masked_rows(num_rows: int) -> None:
    """The block search gives the K best rows of every column as one stable sort of the whole
    column does: with ties (rounded scores), rows that never count (-inf), K above N, and row
    counts below, at and above multiples of the block."""
    generator = torch.Generator().manual_seed(num_rows)

    scores = (torch.rand(num_rows, 2, 9, generator=generator) * 6).round()

    scores[torch.rand(num_rows, generator=generator) < 0.2] = -math.inf

    for k in (1, 2, 5):
        values, rows = column_top_k(scores, k)

        assert values.shape == rows.shape == (k, 2, 9)

        real = min(k, num_rows)

        expected_values, expected_rows = _reference_top_k(scores, real)

        assert torch.equal(values[:real], expected_values)

        # Rows of -inf scores never count; where the scores are real, the rows are the stable sort's.
        finite = expected_values > -math.inf

        assert torch.equal(rows[:real][finite], expected_rows[finite])

        # Below K rows: padded.
        assert bool((values[real:] == -math.inf).all()) and bool((rows[real:] >= num_rows).all())


def test_tied_scores_select_exactly_k_neighbours() -> None:
    """Triplicated inputs tie in every column: each path counts exactly K neighbours per
    vertex (the loss value), and the duplicates share the gradient however the tie is broken."""
    x, _ = make_inputs(12)

    x = torch.cat([x, x, x])

    dense = training_step(make_quantizer("softmax-knn-ce", 2, knn_k=4), x, None)

    chunked = training_step(make_quantizer("softmax-knn-ce", 2, knn_k=4, chunk_size=7), x, None)

    # Eq. 13 by hand: per column the 4 largest log-probabilities of the 36 rows, ties included.
    quantizer = make_quantizer("softmax-knn-ce", 2, knn_k=4)

    with torch.no_grad():
        log_probs = quantizer(x, return_probs=True).log_probs

    assert log_probs is not None

    expected = -log_probs.sort(dim=0, descending=True).values[:4].mean()

    for result in (dense, chunked):
        assert result["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    for name in dense:
        if name == "x_grad":
            # Copies may round apart in products of other shapes: compare them summed.
            assert torch.allclose(chunked[name].view(3, 12, 12).sum(0), dense[name].view(3, 12, 12).sum(0), atol=1e-5)
        elif name != "loss":
            assert torch.allclose(chunked[name], dense[name], atol=1e-5), name


# --- global KNN across processes ----------------------------------------------------------

GLOBAL_K = 4

# (method, G, chunk_size, rows per rank): CE and L2, softmax and Gumbel, G = 1 and 2, dense and
# chunked, ranks with fewer rows than K and ranks with none.
GLOBAL_CASES: dict[int, list[tuple[str, int, int | None, tuple[int, ...]]]] = {
    2: [
        ("softmax-knn-ce", 1, None, (21, 16)),
        ("softmax-knn-l2", 2, None, (21, 16)),
        ("sg-knn-ce", 2, None, (21, 16)),
        ("hg-knn-l2", 1, 7, (21, 16)),
        ("softmax-knn-ce", 2, 5, (21, 16)),
        ("softmax-knn-ce", 2, None, (2, 3)),
        ("softmax-knn-ce", 2, None, (0, 9)),
        ("softmax-knn-l2", 1, 4, (9, 0)),
        ("hg-knn-ce", 2, None, (0, 9)),
    ],
    8: [
        ("softmax-knn-ce", 2, None, (5, 7, 0, 3, 9, 1, 6, 4)),
        ("softmax-knn-l2", 1, 3, (2, 0, 8, 5, 1, 7, 3, 6)),
    ],
}


def _global_case(world_size: int, case: int, *, chunk: bool = True) -> tuple[VectorQuantizer, Tensor, Tensor]:
    method, num_codebooks, chunk_size, rows = GLOBAL_CASES[world_size][case]

    quantizer = make_quantizer(method, num_codebooks, knn_k=GLOBAL_K, chunk_size=chunk_size if chunk else None)

    x, mask = make_inputs(sum(rows), seed=10 + case)

    return quantizer, x, mask


def _rank_slice(rows: tuple[int, ...], rank: int) -> slice:
    start = sum(rows[:rank])

    return slice(start, start + rows[rank])


def _global_worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    try:
        for case, (_, _, _, rows) in enumerate(GLOBAL_CASES[world_size]):
            quantizer, x, mask = _global_case(world_size, case)

            part = _rank_slice(rows, rank)

            result = training_step(quantizer, x[part], mask[part], loss_only=True)

            result["num_loss_samples"] = quantizer(x[part], mask[part]).num_loss_samples.clone()

            # Without a group (a data-parallel gang of one process in a larger world), each
            # rank selects among its own samples.
            alone = VectorQuantizer(quantizer.config, process_group=None).train()

            alone.load_state_dict(quantizer.state_dict())

            result["alone_loss"] = alone(x[part], mask[part]).loss.detach()

            # Eval mode selects per rank, with no collective (rank 1 skips it).
            if rank == 0:
                quantizer.eval()

                result["eval_loss"] = quantizer(x[part], mask[part]).loss.detach()

            torch.save(result, Path(result_dir, f"case{case}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.e2e
def test_global_knn_of_several_processes_equals_one_process(tmp_path: Path, world_size: int) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    mp.start_processes(  # type: ignore[attr-defined]  # torch does not re-export it in __all__
        _global_worker,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="fork",
    )

    for case, (method, _, _, rows) in enumerate(GLOBAL_CASES[world_size]):
        quantizer, x, mask = _global_case(world_size, case, chunk=False)

        reference = training_step(quantizer, x, mask, loss_only=True)

        results = [torch.load(tmp_path / f"case{case}_rank{rank}.pt") for rank in range(world_size)]

        for rank, result in enumerate(results):
            # Every rank reports the loss of the whole batch, an empty one too ...
            assert result["loss"].item() == pytest.approx(reference["loss"].item(), abs=1e-6), (method, rank)

            # ... and gets its own slice of the gradient.
            own = _rank_slice(rows, rank)

            assert torch.allclose(result["x_grad"], reference["x_grad"][own], atol=1e-6), (method, rank)

            assert int(result["num_loss_samples"]) == int(mask.sum()), (method, rank)

            expected_alone = quantizer(x[own], mask[own]).loss

            assert result["alone_loss"].item() == pytest.approx(expected_alone.item(), abs=1e-6), (method, rank)

        for name, value in reference.items():
            if name.endswith("_grad") and name != "x_grad":
                summed = sum(result[name] for result in results)

                assert torch.allclose(summed, value, atol=1e-6), (method, name)

        # Eval mode: rank 0's own K nearest, as a per-rank KNN would take them.
        quantizer.eval()

        first = _rank_slice(rows, 0)

        expected_eval = quantizer(x[first], mask[first]).loss

        assert results[0]["eval_loss"].item() == pytest.approx(expected_eval.item(), abs=1e-6), method


def test_knn_distances_of_the_two_metrics_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1]])

    distances = knn_distances(probs.log(), "l2")

    # |e_m - p|^2 column by column.
    expected = torch.stack([(torch.eye(3)[m] - probs[0]).square().sum() for m in range(3)])

    assert torch.allclose(distances[0], expected, atol=1e-6)
    assert torch.allclose(knn_distances(probs.log(), "ce"), -probs.log())

    with pytest.raises(ValueError, match="`metric` must be 'ce' or 'l2'"):
        knn_distances(probs.log(), "cosine")  # type: ignore[arg-type]
