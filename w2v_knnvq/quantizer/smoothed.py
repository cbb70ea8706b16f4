"""Smoothed quantization (softmax and Gumbel-softmax, eq. 5-8) with its regularizer
(eq. 11-13), dense or in chunks of rows.

One autograd function does both, from the features (whose normalization and temperature,
:class:`~w2v_knnvq.quantizer.assign.UnitScaling`, it differentiates itself) and the unit
codebook to the quantized vectors and the regularizer, a block of rows at a time: the whole
batch (dense), or ``chunk_size`` rows. Each block goes through one softmax pass
(:func:`softmax_rows`) that keeps what the rest needs of the ``(G, C, M)`` probabilities:
codes, ``log Z``, individual perplexities, probability sums and the KNN candidates. The KNN
cross-entropy needs no log-probabilities: the K nearest samples of vertex m are the K largest
``p_m`` of column m, and their scores ``log p_m = l_m - log Z`` are read off the logits.

The backward pass differentiates the products by hand (the same four matrix products as
autograd), and the regularizer's gradient is added to softmax's own fused backward: for the
cross-entropy, row i gets ``(c_i p_i - 1_{S_i}) / (K M)`` with ``S_i`` the vertices that
selected it and ``c_i = |S_i|``, which costs two scatters (:func:`logits_gradient`). The dense
pass keeps the probabilities for backward. The chunked pass keeps only what is ``(N, G, D)``,
``(N, G)`` or ``(K, G, M)`` sized and recomputes each chunk's logits in backward (one more
matrix product); Gumbel noise is drawn from a generator seeded per chunk, so the
recomputation sees the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.nn.functional import normalize, softmax

from w2v_knnvq.quantizer.assign import (
    UnitScaling,
    cosine_logits,
    gather_codes,
    gumbel_softmax,
    row_max,
    similarity_logits,
)
from w2v_knnvq.quantizer.config import Assignment, KnnMetric
from w2v_knnvq.quantizer.knn import KnnSelection, column_top_k, merge_candidates, select_neighbours, take_entries
from w2v_knnvq.quantizer.metrics import distribution_perplexity, softmax_individual_perplexity

_SAFE_PROBABILITY = 2.0**-100
"""Probabilities at or above it are normal float32 numbers with all their digits, so they rank
samples as their logarithms do; a column whose K-th candidate falls below it is searched again
on log-probabilities."""


@dataclass(kw_only=True)
class SmoothedSettings:
    """What a smoothed quantization pass does besides its tensors."""

    assignment: Assignment
    """``softmax``, ``gumbel-soft`` or ``gumbel-hard``."""

    knn_metric: KnnMetric | None
    """The KNN regularizer's metric; ``None`` for the perplexity regularizer."""

    knn_k: int

    gumbel_tau: float

    training: bool
    """In eval mode every row takes its argmax code, without noise."""

    process_group: dist.ProcessGroup | None = None
    """The ranks whose samples the KNN selects among; ``None`` for this rank's only."""

    vertex_subset: Tensor | None = None
    """``(G, M')`` the vertices the KNN regularizes; ``None`` for all."""

    noise_seed: int = 0
    """Seeds the Gumbel noise of chunk c with ``noise_seed + c``."""


@dataclass(kw_only=True)
class SmoothedResult:
    """N vectors, G codebooks of M entries of dimension D."""

    quantized: Tensor
    """``(N, G, D)``."""

    codes: Tensor
    """``(N, G)``."""

    loss: Tensor
    """The regularizer (eq. 11-12 or 13), averaged over codebooks."""

    individual_perplexity: Tensor
    """``(N, G)`` ``exp(-sum_m p_m log p_m)`` of each row (Table 2)."""

    mean_probs: Tensor
    """``(G, M)`` batch-mean assignment probabilities ``pi`` of the unmasked rows (detached)."""

    num_samples: int
    """The unmasked rows of this rank."""

    num_loss_samples: int
    """The number of samples the loss averages: all ranks' for a global KNN."""

    probs: Tensor | None = None
    """``(N, G, M)`` ``pi``, with their gradient; dense pass only."""

    logits: Callable[[], Tensor] | None = None
    """Recomputes the ``(N, G, M)`` logits with their graph (one more matrix product); dense
    pass only."""


# --- one block of rows ----------------------------------------------------------------------


@dataclass(kw_only=True)
class SoftmaxRows:
    """The softmax of a block of C rows and what is read off it, codebook-major."""

    probs: Tensor
    """``(G, C, M)``."""

    log_normalizer: Tensor
    """``(G, C)`` ``log Z = logsumexp`` of each row's logits."""

    codes: Tensor
    """``(G, C)`` the argmax of each row."""


def softmax_rows(logits: Tensor) -> SoftmaxRows:
    """:param logits: ``(G, C, M)``, no gradient is recorded."""
    probs = softmax(logits, dim=-1)

    top, codes = row_max(logits)

    # The probability at a row's maximum is at least 1/M, so its logarithm is as exact as a
    # log-softmax: log Z = l_max - log p_max.
    log_normalizer = top - probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1).log()

    return SoftmaxRows(probs=probs, log_normalizer=log_normalizer, codes=codes)


def probability_sum(probs: Tensor, keep: Tensor | None) -> Tensor:
    """``(G, C, M) -> (G, M)`` the sum of the kept rows' probabilities."""
    if keep is None:
        return probs.sum(dim=1)

    return torch.matmul(keep.to(probs.dtype), probs)


def knn_candidates(
    logits: Tensor, rows: SoftmaxRows, keep: Tensor | None, settings: SmoothedSettings
) -> tuple[Tensor, Tensor]:
    """This block's K best candidates of every regularized vertex.

    :param logits: ``(G, C, M)``. :param keep: ``(C,)`` bool, ``False`` for rows that are
        never neighbours.
    :returns: ``(K, G, M')`` scores ``-D(e_m, p)`` (``-inf`` where fewer than K rows are
        kept) and ``(K, G, M')`` their rows in the block.
    """
    k, vertices = settings.knn_k, settings.vertex_subset

    if settings.knn_metric == "l2":
        # -|e_m - p|^2 = 2 p_m - |p|^2 - 1.
        scores = 2.0 * rows.probs - torch.linalg.vecdot(rows.probs, rows.probs).unsqueeze(-1) - 1.0

        return column_top_k(_never_kept(scores, keep), k, vertices)

    keys, candidate_rows = column_top_k(_never_kept(rows.probs, keep), k, vertices)

    if bool(((keys >= 0.0) & (keys < _SAFE_PROBABILITY)).any()):
        # Underflowing probabilities tie where their logarithms do not.
        log_probs = logits - rows.log_normalizer.unsqueeze(-1)

        return column_top_k(_never_kept(log_probs, keep), k, vertices)

    # (G, K, M') from here.
    at = candidate_rows.clamp_min(0).transpose(0, 1)

    columns = torch.arange(logits.size(2), device=logits.device) if vertices is None else vertices.unsqueeze(1)

    log_normalizer = rows.log_normalizer.gather(1, at.flatten(1)).view_as(at)

    scores = (take_entries(logits, at, columns) - log_normalizer).transpose(0, 1)

    return scores.masked_fill(keys == -math.inf, -math.inf), candidate_rows


def _never_kept(keys: Tensor, keep: Tensor | None) -> Tensor:
    return keys if keep is None else keys.masked_fill(~keep.view(1, -1, 1), -math.inf)


@dataclass(kw_only=True)
class Neighbours:
    """The (codebook, row, vertex) triples of this rank's selected neighbours."""

    codebooks: Tensor

    rows: Tensor

    vertices: Tensor

    num_terms: int
    """K_eff x G x M': the loss is ``-(sum of all ranks' selected scores) / num_terms``."""

    @staticmethod
    def of(selection: KnnSelection, candidate_rows: Tensor, vertex_subset: Tensor | None) -> Neighbours:
        """:param candidate_rows: ``(K, G, M')`` the row of each candidate of ``selection``."""
        _, codebooks, columns = selection.selected.nonzero(as_tuple=True)

        vertices = columns if vertex_subset is None else vertex_subset[codebooks, columns]

        return Neighbours(
            codebooks=codebooks,
            rows=candidate_rows[selection.selected],
            vertices=vertices,
            num_terms=max(1, selection.num_neighbours) * selection.selected[0].numel(),
        )

    def within(self, start: int, end: int) -> Neighbours:
        """The neighbours among rows ``start .. end - 1``, numbered from ``start``."""
        inside = (self.rows >= start) & (self.rows < end)

        return Neighbours(
            codebooks=self.codebooks[inside],
            rows=self.rows[inside] - start,
            vertices=self.vertices[inside],
            num_terms=self.num_terms,
        )

    def counts(self, num_codebooks: int, num_rows: int, dtype: torch.dtype) -> Tensor:
        """``(G, C)`` how many vertices selected each row, c_i."""
        counts = torch.zeros(num_codebooks * num_rows, dtype=dtype, device=self.rows.device)

        counts.index_add_(0, self.codebooks * num_rows + self.rows, torch.ones_like(self.rows, dtype=dtype))

        return counts.view(num_codebooks, num_rows)


def logits_gradient(
    probs: Tensor,
    grad_probs: Tensor | None,
    codes: Tensor | None,
    *,
    neighbours: Neighbours | None = None,
    metric: KnnMetric | None = None,
    grad_loss: Tensor | None = None,
) -> Tensor:
    """The gradient w.r.t. the logits of ``probs = softmax(logits)`` given the gradient
    w.r.t. ``probs`` and that of the KNN loss of the selected ``neighbours``.

    Per selected (row i, vertex m), the cross-entropy ``-log p_m / n`` adds ``(p_i - e_m) / n``
    to the logits' gradient of row i: ``c_i p_i / n`` is ``p_i (g - sum(p_i g))`` for a
    ``g`` that is ``-c_i / (n p_ij)`` at one entry j, taken at the row's argmax (``p_ij >= 1/M``)
    and folded into softmax's backward kernel, plus ``c_i / n`` at that entry afterwards; the
    ``-e_m / n`` are a scatter. The L2 ``|e_m - p_i|^2 / n`` adds ``2 (p_i - e_m) / n`` to the
    probabilities' gradient.

    :param probs: ``(G, C, M)``. :param grad_probs: ``(G, C, M)`` or ``None``; modified in place.
    :param codes: ``(G, C)`` the argmax of each row of ``probs``; ``None`` to find it.
    """
    knn = neighbours is not None and grad_loss is not None and neighbours.rows.numel() > 0

    if not knn:
        return _softmax_backward(probs, grad_probs)

    assert neighbours is not None and grad_loss is not None

    counts = neighbours.counts(probs.size(0), probs.size(1), probs.dtype)

    if metric == "l2":
        scale = 2.0 * grad_loss / neighbours.num_terms

        scaled_counts = counts.unsqueeze(-1) * scale

        grad_probs = probs * scaled_counts if grad_probs is None else grad_probs.addcmul_(probs, scaled_counts)

        _scatter_add(grad_probs, neighbours, -scale)

        return _softmax_backward(probs, grad_probs)

    scale = grad_loss / neighbours.num_terms

    if grad_probs is None:
        grad = probs * (counts.unsqueeze(-1) * scale)
    else:
        codebooks, rows = counts.nonzero(as_tuple=True)

        if codes is None:
            codes = row_max(probs)[1]

        argmax = (codebooks, rows, codes[codebooks, rows])

        row_terms = counts[codebooks, rows] * scale

        grad_probs.index_put_(argmax, -row_terms / probs[argmax], accumulate=True)

        grad = _softmax_backward(probs, grad_probs)

        grad.index_put_(argmax, row_terms, accumulate=True)

    _scatter_add(grad, neighbours, -scale)

    return grad


def _softmax_backward(probs: Tensor, grad_probs: Tensor | None) -> Tensor:
    if grad_probs is None:
        return torch.zeros_like(probs)

    # The fused kernel of softmax's own backward pass: p * (g - sum(p * g)).
    return torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def _scatter_add(target: Tensor, neighbours: Neighbours, value: Tensor) -> None:
    target.index_put_(
        (neighbours.codebooks, neighbours.rows, neighbours.vertices),
        value.to(target.dtype).expand(neighbours.rows.numel()),
        accumulate=True,
    )


def perplexity_regularizer(mean_probs: Tensor) -> Tensor:
    """``mean_g (1 - ppl(pi_g) / M)`` of the batch-mean distributions ``(G, M)`` (eq. 11-12)."""
    return (1.0 - distribution_perplexity(mean_probs) / mean_probs.size(-1)).mean()


def mean_probabilities(prob_sum: Tensor, num_samples: int) -> Tensor:
    """The batch-mean distribution; the uniform perplexity-1 stand-in ``1`` when no sample is left."""
    if num_samples == 0:
        return torch.ones_like(prob_sum)

    return prob_sum / num_samples


def quantize_smoothed(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    mask: Tensor | None,
    settings: SmoothedSettings,
    chunk_size: int | None = None,
) -> SmoothedResult:
    """Quantizes ``z`` densely (``chunk_size=None``: the probabilities are kept for backward
    and returned) or ``chunk_size`` rows at a time (no ``(N, G, M)`` tensor is held).

    :param z: ``(N, G, D)`` features. :param codebook: ``(G, M, D)``. :param mask: ``(N,)``
        bool, ``True`` for rows that count in the regularizer and perplexities.
    """
    # The codebook's normalization is (G, M, D) sized: autograd takes it. The function
    # differentiates the features' (N, G, D) normalization and temperature itself, in two
    # passes where autograd takes six.
    unit_codebook = normalize(codebook, dim=-1)

    num_samples = z.size(0) if mask is None else int(mask.sum())

    # torch leaves `Function.apply` unannotated.
    outputs = _SmoothedQuantization.apply(  # type: ignore[no-untyped-call]
        z, temperature, unit_codebook, codebook, mask, num_samples, settings, chunk_size
    )

    quantized, loss, codes, individual_perplexity, mean_probs, num_loss_samples, probs = outputs

    dense = chunk_size is None

    return SmoothedResult(
        quantized=quantized,
        codes=codes,
        loss=loss,
        individual_perplexity=individual_perplexity,
        mean_probs=mean_probs,
        num_samples=num_samples,
        num_loss_samples=int(num_loss_samples),
        probs=probs.transpose(0, 1) if dense else None,
        logits=(lambda: cosine_logits(z, codebook, temperature)) if dense else None,
    )


def _chunks(num_rows: int, chunk_size: int | None) -> Iterator[tuple[int, int, int]]:
    """:returns: ``(index, start, end)`` of each chunk; one for ``None``."""
    step = max(1, num_rows if chunk_size is None else chunk_size)

    for index, start in enumerate(range(0, max(1, num_rows), step)):
        yield index, start, min(start + step, num_rows)


def _generator(settings: SmoothedSettings, chunk_index: int, device: torch.device) -> torch.Generator | None:
    if not settings.training or settings.assignment == "softmax":
        return None

    return torch.Generator(device=device).manual_seed(settings.noise_seed + chunk_index)


@dataclass(kw_only=True)
class _Forward:
    """What the forward pass keeps for backward besides its saved tensors."""

    neighbours: Neighbours | None

    mean_probs: Tensor

    num_samples: int
    """The unmasked rows of this rank."""


class _SmoothedQuantization(torch.autograd.Function):
    """``(N, G, D)`` features, the temperature, the ``(G, M, D)`` unit and plain codebooks,
    the ``(N,)`` mask and its count of rows ->
    quantized vectors, the regularizer, codes, individual perplexities, the mean
    probabilities, the loss's sample count and (dense) the ``(G, N, M)`` probabilities."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        z: Tensor,
        temperature: Tensor,
        unit_codebook: Tensor,
        codebook: Tensor,
        mask: Tensor | None,
        num_samples: int,
        settings: SmoothedSettings,
        chunk_size: int | None,
    ) -> tuple[Tensor, ...]:
        # Outputs nothing depends on (probabilities, the codebook's in eval mode) send no gradient.
        ctx.set_materialize_grads(False)

        scaling = UnitScaling.of(z, temperature)

        scaled_z = scaling.scaled

        num_rows, num_codebooks = scaled_z.shape[:2]

        quantized = codebook.new_empty((num_rows, num_codebooks, codebook.size(2)))
        codes = torch.empty((num_rows, num_codebooks), dtype=torch.int64, device=codebook.device)
        individual_perplexity = codebook.new_empty((num_rows, num_codebooks))

        prob_sum = codebook.new_zeros(codebook.shape[:2])

        best: tuple[Tensor, Tensor] | None = None

        kept: list[Tensor] = []

        for index, start, end in _chunks(num_rows, chunk_size):
            logits = similarity_logits(scaled_z[start:end], unit_codebook)

            rows = softmax_rows(logits)

            keep = None if mask is None else mask[start:end]

            quantized[start:end], codes[start:end] = _quantize_block(
                logits, rows, codebook, settings, _generator(settings, index, codebook.device)
            )

            prob_sum += probability_sum(rows.probs, keep)

            if settings.knn_metric is not None:
                scores, candidate_rows = knn_candidates(logits, rows, keep, settings)

                chunk_best = (scores, torch.where(candidate_rows >= 0, candidate_rows + start, -1))

                best = chunk_best if best is None else merge_candidates(best, chunk_best)

            if chunk_size is None:
                # Dense: backward takes the probabilities (and the Gumbel methods' logits).
                kept = [rows.probs] if settings.assignment == "softmax" else [rows.probs, logits]

            # Last: this may overwrite the logits.
            individual_perplexity[start:end] = softmax_individual_perplexity(
                logits, rows.probs, rows.log_normalizer, overwrite_logits=not any(t is logits for t in kept)
            ).t()

        mean_probs = mean_probabilities(prob_sum, num_samples)

        neighbours = None

        if settings.knn_metric is not None:
            assert best is not None

            selection = select_neighbours(best[0], num_samples, settings.knn_k, settings.process_group)

            neighbours = Neighbours.of(selection, best[1], settings.vertex_subset)

            loss = selection.value
            num_loss_samples = selection.num_samples
        else:
            loss = perplexity_regularizer(mean_probs)
            num_loss_samples = num_samples

        ctx.save_for_backward(scaled_z, scaling.inverse, scaling.radial, scaling.temperature, unit_codebook, codebook, codes, *kept)  # fmt: skip

        ctx.mask = mask  # type: ignore[attr-defined]
        ctx.settings = settings  # type: ignore[attr-defined]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.saved = _Forward(neighbours=neighbours, mean_probs=mean_probs, num_samples=num_samples)  # type: ignore[attr-defined]

        probs = kept[0] if kept else codebook.new_empty(0)

        ctx.mark_non_differentiable(codes, individual_perplexity, mean_probs)

        return quantized, loss, codes, individual_perplexity, mean_probs, torch.tensor(num_loss_samples), probs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_quantized, grad_loss, grad_probs = grads[0], grads[1], grads[6]

        scaled_z, inverse, radial, temperature, unit_codebook, codebook, codes, *kept = ctx.saved_tensors

        mask: Tensor | None = ctx.mask

        settings: SmoothedSettings = ctx.settings
        saved: _Forward = ctx.saved

        grad_scaled_z = torch.zeros_like(scaled_z)
        grad_unit_codebook = torch.zeros_like(unit_codebook)
        grad_codebook = torch.zeros_like(codebook)

        neighbours = saved.neighbours if grad_loss is not None else None

        grad_prob_sum = _grad_prob_sum(saved, grad_loss)

        for index, start, end in _chunks(scaled_z.size(0), ctx.chunk_size):
            block_z = scaled_z[start:end].transpose(0, 1)

            if kept:
                probs, logits = kept[0], (kept[1] if len(kept) > 1 else None)
            else:
                logits = torch.bmm(block_z, unit_codebook.transpose(1, 2))

                probs = softmax(logits, dim=-1)

            block = _Block(
                probs=probs,
                logits=logits,
                codes=codes[start:end].t(),
                keep=None if mask is None else mask[start:end],
                generator=_generator(settings, index, codebook.device),
            )

            # (G, C, D)
            block_grad = None if grad_quantized is None else grad_quantized[start:end].transpose(0, 1)

            grad_logits = _block_logits_gradient(
                block,
                codebook,
                grad_codebook,
                settings,
                block_grad,
                grad_probs,
                grad_prob_sum,
                None if neighbours is None else neighbours.within(start, end),
                grad_loss,
            )

            if grad_logits is None:
                continue

            # logits = z_s Q_u^T per codebook.
            grad_scaled_z[start:end] = torch.bmm(grad_logits, unit_codebook).transpose(0, 1)

            grad_unit_codebook.baddbmm_(grad_logits.transpose(1, 2), block_z)

        scaling = UnitScaling(scaled=scaled_z, inverse=inverse, radial=radial, temperature=temperature)

        grad_z, grad_temperature = scaling.backward(grad_scaled_z)

        return grad_z, grad_temperature, grad_unit_codebook, grad_codebook, None, None, None, None


def _grad_prob_sum(saved: _Forward, grad_loss: Tensor | None) -> Tensor | None:
    """The perplexity regularizer's gradient w.r.t. the batch sum of pi ``(G, M)``."""
    if grad_loss is None or saved.neighbours is not None or saved.num_samples == 0:
        return None

    with torch.set_grad_enabled(True):
        mean_probs = saved.mean_probs.detach().requires_grad_()

        (grad_mean_probs,) = torch.autograd.grad(perplexity_regularizer(mean_probs), mean_probs)

    return grad_mean_probs * grad_loss / saved.num_samples


@dataclass(kw_only=True)
class _Block:
    """A block of C rows in backward."""

    probs: Tensor
    """``(G, C, M)``."""

    logits: Tensor | None
    """``(G, C, M)``; ``None`` where only the softmax assignment needs them (dense)."""

    codes: Tensor
    """``(G, C)`` the forward pass's codes."""

    keep: Tensor | None

    generator: torch.Generator | None


def _quantize_block(
    logits: Tensor, rows: SoftmaxRows, codebook: Tensor, settings: SmoothedSettings, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """:param logits: ``(G, C, M)``.
    :returns: ``(C, G, D)`` quantized vectors and ``(C, G)`` codes of a block of rows."""
    if not settings.training:
        return gather_codes(codebook, rows.codes.t()), rows.codes.t()

    if settings.assignment == "softmax":
        return torch.bmm(rows.probs, codebook).transpose(0, 1), rows.codes.t()

    # The noise is drawn in (C, G, M) order.
    samples, codes = gumbel_softmax(
        logits.transpose(0, 1), settings.gumbel_tau, hard=settings.assignment == "gumbel-hard", generator=generator
    )

    return torch.bmm(samples.transpose(0, 1), codebook).transpose(0, 1), codes


def _block_logits_gradient(
    block: _Block,
    codebook: Tensor,
    grad_codebook: Tensor,
    settings: SmoothedSettings,
    grad_quantized: Tensor | None,
    grad_probs: Tensor | None,
    grad_prob_sum: Tensor | None,
    neighbours: Neighbours | None,
    grad_loss: Tensor | None,
) -> Tensor | None:
    """The gradient w.r.t. one block's ``(G, C, M)`` logits; the quantized vectors' gradient
    w.r.t. the codebook is added to ``grad_codebook``.

    :param grad_quantized: ``(G, C, D)``. :param grad_probs: ``(G, C, M)`` (dense only).
    """
    probs = block.probs

    # Gradient that reaches the logits other than through pi: the Gumbel samples'.
    grad_sample_logits = None

    # The gradient w.r.t. pi, built in a tensor of this function's own.
    own_grad_probs = None

    if grad_quantized is not None:
        if not settings.training:
            # quantized = Q[codes]: the codebook's rows take the gradient.
            codebooks = torch.arange(block.codes.size(0), device=codebook.device).unsqueeze(1).expand_as(block.codes)

            grad_codebook.index_put_((codebooks, block.codes), grad_quantized, accumulate=True)
        elif settings.assignment == "softmax":
            own_grad_probs = torch.bmm(grad_quantized, codebook.transpose(1, 2))

            grad_codebook.baddbmm_(probs.transpose(1, 2), grad_quantized)
        else:
            assert block.logits is not None

            grad_sample_logits = _gumbel_logits_gradient(block.logits, codebook, grad_codebook, block.generator, settings, grad_quantized)  # fmt: skip

    if grad_probs is not None:
        own_grad_probs = grad_probs.clone() if own_grad_probs is None else own_grad_probs.add_(grad_probs)

    if grad_prob_sum is not None:
        own_grad_probs = _add_row_gradient(own_grad_probs, grad_prob_sum, block.keep, probs)

    if own_grad_probs is None and neighbours is None:
        return grad_sample_logits

    # The forward pass's codes are the rows' argmax unless they are Gumbel samples.
    argmax = block.codes if not settings.training or settings.assignment == "softmax" else None

    grad = logits_gradient(
        probs, own_grad_probs, argmax, neighbours=neighbours, metric=settings.knn_metric, grad_loss=grad_loss
    )

    return grad if grad_sample_logits is None else grad.add_(grad_sample_logits)


def _add_row_gradient(grad_probs: Tensor | None, grad_prob_sum: Tensor, keep: Tensor | None, probs: Tensor) -> Tensor:
    """Adds the gradient of ``probability_sum`` ``(G, M)`` to each kept row's."""
    per_row = grad_prob_sum.unsqueeze(1).expand_as(probs)

    if keep is not None:
        per_row = per_row * keep.to(probs.dtype).view(1, -1, 1)

    return per_row.clone() if grad_probs is None else grad_probs.add_(per_row)


def _gumbel_logits_gradient(
    logits: Tensor,
    codebook: Tensor,
    grad_codebook: Tensor,
    generator: torch.Generator | None,
    settings: SmoothedSettings,
    grad_quantized: Tensor,
) -> Tensor:
    """The Gumbel samples' share of the ``(G, C, M)`` logits' gradient, with the noise that
    the forward pass drew (the same generator seed, the same ``(C, G, M)`` order)."""
    with torch.set_grad_enabled(True):
        leaf = logits.transpose(0, 1).detach().requires_grad_()

        samples, _ = gumbel_softmax(
            leaf, settings.gumbel_tau, hard=settings.assignment == "gumbel-hard", generator=generator
        )

        by_codebook = samples.transpose(0, 1)

        grad_codebook.baddbmm_(by_codebook.detach().transpose(1, 2), grad_quantized)

        (grad,) = torch.autograd.grad(by_codebook, leaf, torch.bmm(grad_quantized, codebook.transpose(1, 2)))

    return grad.transpose(0, 1)
