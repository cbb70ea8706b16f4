"""The neighbours of eq. 13: per-vertex top-K candidates, their exact selection across
data-parallel ranks, and random vertex subsets (section 5.3).

A sample's *score* for vertex ``e_m`` is its negated distance ``-D(e_m, p)``, so the K nearest
samples are the K largest scores of column m. Every rank first keeps its own top-K candidates
per (codebook, vertex); the global K nearest are the top-K of the union of those candidates,
which is exactly the top-K over the union of the ranks' samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from w2v_knnvq.quantizer.config import KnnMetric


def knn_scores(log_probs: Tensor, metric: KnnMetric) -> Tensor:
    """Return ``-D(e_m, p)`` for every sample and vertex, larger meaning nearer.

    - ``"ce"``: ``D(e_m, p) = -log p_m``, so the score is ``log p_m``;
    - ``"l2"``: ``D(e_m, p) = |e_m - p|^2 = 1 - 2 p_m + |p|^2``.

    :param log_probs: ``(..., M)`` log-probabilities (log-softmax output).
    :returns: ``(..., M)``.
    """
    if metric == "ce":
        return log_probs

    if metric == "l2":
        probs = log_probs.exp()

        return 2.0 * probs - probs.square().sum(dim=-1, keepdim=True) - 1.0

    raise ValueError(f"`metric` must be 'ce' or 'l2', but is {metric!r} instead.")


def draw_vertex_subset(
    num_codebooks: int,
    codebook_size: int,
    fraction: float,
    *,
    device: torch.device,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor | None:
    """Draw ``ceil(fraction x M)`` distinct vertices per codebook, uniformly at random.

    With a process group, rank 0's draw is broadcast so that every rank regularizes the same
    vertices (required for an exact global KNN).

    :returns: ``(G, M')`` vertex indices, or ``None`` when ``fraction`` is 1 (every vertex).
    """
    if fraction >= 1.0:
        return None

    num_vertices = max(1, math.ceil(fraction * codebook_size))

    subset = torch.rand((num_codebooks, codebook_size), device=device).argsort(dim=-1)[:, :num_vertices]

    if process_group is not None:
        dist.broadcast(subset, group_src=0, group=process_group)

    return subset.sort(dim=-1).values


def restrict_to_vertices(scores: Tensor, subset: Tensor | None) -> Tensor:
    """:param scores: ``(N, G, M)``. :param subset: ``(G, M')`` or ``None``.
    :returns: ``(N, G, M')`` the scores of the subset's vertices."""
    if subset is None:
        return scores

    return scores.gather(2, subset.unsqueeze(0).expand(scores.size(0), -1, -1))


@dataclass(kw_only=True)
class KnnSelection:
    """Which of a rank's candidates are among the K nearest samples of each vertex."""

    value: Tensor
    """The loss of eq. 13 over the union of the ranks' samples (a detached scalar)."""

    selected: Tensor
    """``(K, G, M')`` bool, ``True`` at this rank's candidates that count."""

    num_neighbours: int
    """K_eff = min(K, total number of samples): the neighbours per vertex that count."""

    num_samples: int
    """The number of (unmasked) samples over all ranks."""

    def local_part(self, candidate_scores: Tensor) -> Tensor:
        """This rank's share of the loss, ``-(sum of its selected scores) / (G M' K_eff)``,
        whose gradient is this rank's slice of the gradient of the global loss.

        :param candidate_scores: ``(K, G, M')`` the scores of this rank's candidates, padded
            as in :func:`select_neighbours`.
        """
        return self.mean_distance(self.selected, candidate_scores)

    def mean_distance(self, selected: Tensor, scores: Tensor) -> Tensor:
        """``-(sum of the selected scores) / (G M' K_eff)``: eq. 13 over the selected entries
        of ``scores`` (candidates, all rows, or one chunk of rows)."""
        num_terms = max(1, self.num_neighbours) * self.selected[0].numel()

        return -torch.where(selected, scores, 0.0).sum() / num_terms

    def loss(self, candidate_scores: Tensor) -> Tensor:
        """The loss value of all ranks with the gradient of this rank's samples."""
        local_part = self.local_part(candidate_scores)

        return self.value + (local_part - local_part.detach())

    def loss_from_maxima(self, scores: Tensor, candidate_scores: Tensor) -> Tensor:
        """:meth:`loss` from all scores and their tie-free column maxima (:func:`column_maxima`).

        The gradient flows into ``scores`` at the rows of the selected maxima, found again by
        comparison in the backward pass, so no ``(K, N, G, M')`` tensor is kept.

        :param scores: ``(N, G, M')`` with their gradient.
        :param candidate_scores: ``(K, G, M')`` detached.
        """
        num_terms = max(1, self.num_neighbours) * self.selected[0].numel()

        # Function.apply is untyped in torch.
        selected_sum = _SelectedScoreSum.apply(scores, candidate_scores, self.selected)  # type: ignore[no-untyped-call]

        local_part = selected_sum / -num_terms

        return self.value + (local_part - local_part.detach())


class _SelectedScoreSum(torch.autograd.Function):
    """``sum`` of the selected column maxima of ``scores``; the gradient is 1 at their rows."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, maxima: Tensor, selected: Tensor) -> Tensor:
        ctx.save_for_backward(scores, maxima, selected)

        return torch.where(selected, maxima, 0.0).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        scores, maxima, selected = ctx.saved_tensors

        num_columns = selected[0].numel()

        num_selected = int(selected.sum())

        prefix = num_selected // num_columns

        if num_selected == prefix * num_columns and bool(selected[:prefix].all()):
            # The first `prefix` maxima of every column: one comparison with the last of
            # them, since the maxima are tie-free and exactly those rows reach it.
            if prefix == 0:
                return torch.zeros_like(scores), None, None

            mask = scores >= maxima[prefix - 1]
        else:
            mask = torch.zeros_like(scores, dtype=torch.bool)

            for step in range(maxima.size(0)):
                mask |= (scores == maxima[step]) & selected[step]

        return mask.to(scores.dtype) * grad, None, None


def local_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Return the top-K scores of each column of ``scores`` and their rows, padded to K rows
    with ``-inf`` (and row -1) when there are fewer than K samples.

    :param scores: ``(N, G, M')``.
    :returns: ``(K, G, M')`` scores (with their gradient) and ``(K, G, M')`` int64 rows.
    """
    num_samples = scores.size(0)

    values, rows = scores.topk(min(k, num_samples), dim=0)

    if values.size(0) < k:
        padding = k - values.size(0)

        values = torch.cat([values, values.new_full((padding, *values.shape[1:]), -math.inf)])

        rows = torch.cat([rows, rows.new_full((padding, *rows.shape[1:]), -1)])

    return values, rows


def column_maxima(scores: Tensor, k: int) -> Tensor | None:
    """The top-K scores of each column by K column maxima.

    Reductions across rows are fast where a ``topk`` across rows is not (it is strided). The
    rows that hold the maxima are not kept: :meth:`KnnSelection.loss_from_maxima` finds them
    by comparison, which needs distinct scores, so equal scores at or above a column's K-th
    maximum make this return ``None`` (the caller then takes :func:`local_candidates`).

    :param scores: ``(N, G, M')``, no ``-inf``.
    :returns: ``(K, G, M')`` detached scores, padded with ``-inf`` below N rows.
    """
    num_samples = scores.size(0)

    num_steps = min(k, num_samples)

    remaining = scores.detach()

    values = []

    for step in range(num_steps):
        maxima = remaining.amax(dim=0)

        values.append(maxima)

        if step + 1 < num_steps:
            remaining = remaining.masked_fill(remaining == maxima, -math.inf)

    if num_steps > 0:
        # Ties that use up a column's rows leave -inf among its maxima.
        if not bool(torch.isfinite(values[-1]).all()):
            return None

        # Without ties, exactly `num_steps` rows per column reach the last maximum.
        if int((scores.detach() >= values[-1]).sum()) != num_steps * values[-1].numel():
            return None

    for _ in range(k - len(values)):
        values.append(torch.full_like(scores[0], -math.inf))

    return torch.stack(values)


def merge_candidates(best: tuple[Tensor, Tensor], scores: Tensor, row_offset: int) -> tuple[Tensor, Tensor]:
    """Fold a chunk of rows into running top-K candidates.

    :param best: ``(K, G, M')`` scores and rows so far.
    :param scores: ``(C, G, M')`` the scores of rows ``row_offset .. row_offset + C - 1``.
    """
    best_values, best_rows = best

    k = best_values.size(0)

    rows = torch.arange(row_offset, row_offset + scores.size(0), device=scores.device)

    all_values = torch.cat([best_values, scores])

    all_rows = torch.cat([best_rows, rows.view(-1, 1, 1).expand_as(scores)])

    values, order = all_values.topk(k, dim=0)

    return values, all_rows.gather(0, order)


def select_neighbours(
    candidate_scores: Tensor, num_samples: int, k: int, process_group: dist.ProcessGroup | None
) -> KnnSelection:
    """Select the K nearest samples of every vertex among the candidates of all ranks.

    Each rank all-gathers the detached candidate scores (R x K x G x M' values) and the
    number of its samples. The candidates are ordered by rank, then by their order on the
    rank; equal scores go to the earlier one, so exactly K_eff candidates count per vertex on
    all ranks together.

    :param candidate_scores: ``(K, G, M')`` this rank's top-K scores, ``-inf`` where it has
        fewer than K samples.
    :param num_samples: The number of this rank's (unmasked) samples.
    :param process_group: ``None`` selects among this rank's samples only.
    """
    scores = candidate_scores.detach()

    k, num_codebooks, num_vertices = scores.shape

    if process_group is None or dist.get_world_size(process_group) == 1:
        num_neighbours = min(k, num_samples)

        selected = torch.zeros_like(scores, dtype=torch.bool)

        selected[:num_neighbours] = True

        value = -scores[:num_neighbours].sum() / max(1, num_neighbours * num_codebooks * num_vertices)

        return KnnSelection(value=value, selected=selected, num_neighbours=num_neighbours, num_samples=num_samples)

    world_size = dist.get_world_size(process_group)

    rank = dist.get_rank(process_group)

    # One message per rank: the candidate scores, then the sample count.
    message = torch.cat([scores.flatten(), scores.new_tensor([float(num_samples)])])

    gathered = [torch.empty_like(message) for _ in range(world_size)]

    dist.all_gather(gathered, message, group=process_group)

    counts = [int(m[-1].item()) for m in gathered]

    total = sum(counts)

    num_neighbours = min(k, total)

    # (R x K, G, M') in rank order.
    all_scores = torch.cat([m[:-1].view(k, num_codebooks, num_vertices) for m in gathered])

    order = all_scores.sort(dim=0, descending=True, stable=True).indices[:num_neighbours]

    top_scores = all_scores.gather(0, order)

    value = -top_scores.sum() / max(1, num_neighbours * num_codebooks * num_vertices)

    selected = torch.zeros((world_size * k, num_codebooks, num_vertices), dtype=torch.bool, device=scores.device)

    selected.scatter_(0, order, True)

    return KnnSelection(
        value=value,
        selected=selected[rank * k : (rank + 1) * k],
        num_neighbours=num_neighbours,
        num_samples=total,
    )
