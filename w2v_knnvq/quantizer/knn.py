"""The neighbours of eq. 13: distances to the simplex vertices, per-vertex top-K candidates,
their exact selection across data-parallel ranks, and random vertex subsets (section 5.3).

A sample's *score* for vertex ``e_m`` is its negated distance ``-D(e_m, p)``, so the K nearest
samples are the K largest scores of column m. Every rank keeps its own top-K candidates per
(codebook, vertex); the global K nearest are the top-K of the union of those candidates, which
is exactly the top-K over the union of the ranks' samples. Everything stays on the device: no
count or index is read back by the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from w2v_knnvq.quantizer.config import KnnMetric


def knn_distances(log_probs: Tensor, metric: KnnMetric) -> Tensor:
    """Return ``D(e_m, p)`` of every sample to every vertex (eq. 13), without cancellation.

    - ``"ce"``: ``D(e_m, p) = -log p_m``;
    - ``"l2"``: ``D(e_m, p) = |e_m - p|^2 = (1 - p_m)^2 + sum_{j != m} p_j^2``, with
      ``1 - p_m = -expm1(log p_m)`` and the sum over the other entries taken without the
      row's largest one (``|p|^2 - p_m^2`` and ``1 - 2 p_m + |p|^2`` cancel to 0 in float32
      once ``p`` is within ``2^-12`` of ``e_m``, the regime the paper's KNN-L2 reaches).

    :param log_probs: ``(..., M)`` from :func:`~w2v_knnvq.quantizer.assign.accurate_log_softmax`.
    :returns: ``(..., M)``, non-negative.
    """
    if metric == "ce":
        return -log_probs

    if metric != "l2":
        raise ValueError(f"`metric` must be 'ce' or 'l2', but is {metric!r} instead.")

    probs = log_probs.exp()

    with torch.no_grad():
        argmax = log_probs.argmax(dim=-1, keepdim=True)

    is_max = torch.arange(log_probs.size(-1), device=log_probs.device) == argmax

    squares = probs.square()

    top_square = squares.gather(-1, argmax)

    # sum_{j != argmax} p_j^2
    others = squares.masked_fill(is_max, 0.0).sum(dim=-1, keepdim=True)

    # sum_{j != m} p_j^2: the others' sum for the largest entry; for any other m (p_m <= 1/2,
    # so the result is at least p_max^2 >= p_m^2) the largest entry's square joins it.
    rest = others + torch.where(is_max, 0.0, top_square - squares)

    return torch.expm1(log_probs).square() + rest


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

    :returns: ``(G, M')`` vertex indices in increasing order, or ``None`` when ``fraction`` is
        1 (every vertex).
    """
    if fraction >= 1.0:
        return None

    num_vertices = max(1, math.ceil(fraction * codebook_size))

    subset = torch.rand((num_codebooks, codebook_size), device=device).argsort(dim=-1)[:, :num_vertices]

    if process_group is not None:
        dist.broadcast(subset, group_src=0, group=process_group)

    return subset.sort(dim=-1).values


def restrict_to_vertices(scores: Tensor, vertices: Tensor | None) -> Tensor:
    """:param scores: ``(N, G, M)``. :param vertices: ``(G, M')`` or ``None``.
    :returns: ``(N, G, M')`` the columns of the subset's vertices."""
    if vertices is None:
        return scores

    return scores.gather(2, vertices.unsqueeze(0).expand(scores.size(0), -1, -1))


def first_k(values: Tensor, k: int, dim: int) -> Tensor:
    """The indices of the k largest entries along ``dim``, largest first, equal values in index
    order (the first k of a stable descending sort), deterministic on every device.

    A float32 value and its position make one int64 key (the value's bits in an order that
    compares as the numbers do, then the position reversed), so that ``topk`` sees no ties.
    Other dtypes take a stable sort.
    """
    if values.dtype != torch.float32:
        return values.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)

    # + 0.0 turns -0.0 into 0.0; negative floats' bits count down as the numbers go down.
    bits = (values + 0.0).view(torch.int32)

    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)

    size = values.size(dim)

    shape = [1] * values.dim()
    shape[dim] = size

    reversed_position = (size - 1 - torch.arange(size, device=values.device)).view(shape)

    keys = ordered * (1 << 32) + reversed_position

    return keys.topk(k, dim=dim).indices


_BLOCK = 32
"""Rows per block of :func:`column_top_k`'s search (fixed, so that a compiled graph does not
depend on the number of rows)."""


def column_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K largest scores of every column and their rows, exactly, ties going to the lower row.

    A top-K across the rows of every column reads the whole ``(N, G, M')`` tensor in a strided
    order; a column maximum reads it once, fast. So the rows go in blocks of 32: the K blocks
    with the largest maxima (ties to the earlier block) hold the column's top K (each of them
    holds an entry that ranks before every entry of an unchosen block), and only their
    ``K x 32`` rows are ranked.

    :param scores: ``(N, G, M')``, no NaN; ``-inf`` marks rows that are never neighbours.
    :returns: ``(K, G, M')`` scores, ``-inf`` below K rows (and where rows are masked), and
        ``(K, G, M')`` int64 rows (``N`` and beyond where padded).
    """
    num_rows = scores.size(0)

    if num_rows < k:
        padding = scores.new_full((k - num_rows, *scores.shape[1:]), -math.inf)

        scores, num_rows = torch.cat([scores, padding]), k

    num_full = num_rows // _BLOCK

    maxima = [scores[: num_full * _BLOCK].view(num_full, _BLOCK, *scores.shape[1:]).amax(dim=1)]

    if num_full * _BLOCK < num_rows:
        maxima.append(scores[num_full * _BLOCK :].amax(dim=0, keepdim=True))

    # (blocks, G, M')
    block_maxima = torch.cat(maxima)

    # The chosen blocks in row order, so that ties below go to the lower row.
    blocks = first_k(block_maxima, min(k, block_maxima.size(0)), dim=0).sort(dim=0).values

    offsets = torch.arange(_BLOCK, device=scores.device).view(1, _BLOCK, 1, 1)

    rows = (blocks.unsqueeze(1) * _BLOCK + offsets).flatten(0, 1)

    values = scores.gather(0, rows.clamp_max(num_rows - 1)).masked_fill(rows >= num_rows, -math.inf)

    order = first_k(values, k, dim=0)

    return values.gather(0, order), rows.gather(0, order)


def merge_candidates(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Fold the candidates of later rows into running top-K candidates.

    :param best: ``(K, G, M')`` scores and rows so far. :param new: the same of rows that all
        come after them, so that ties go to the earlier rows.
    """
    values = torch.cat([best[0], new[0]])

    order = first_k(values, best[0].size(0), dim=0)

    return values.gather(0, order), torch.cat([best[1], new[1]]).gather(0, order)


@dataclass(kw_only=True)
class KnnSelection:
    """Which of a rank's candidates are among the K nearest samples of each vertex."""

    value: Tensor
    """The loss of eq. 13 over the union of the ranks' samples (a detached scalar)."""

    selected: Tensor
    """``(K, G, M')`` bool, ``True`` at this rank's candidates that count."""

    num_terms: Tensor
    """``K_eff x G x M'`` (at least 1), with ``K_eff = min(K, all ranks' samples)``: the loss
    is ``-(sum of all ranks' selected scores) / num_terms``."""

    num_samples: Tensor
    """The number of unmasked samples of all ranks (int64 scalar)."""

    def local_part(self, scores: Tensor) -> Tensor:
        """``-(sum of this rank's selected scores) / num_terms``, whose gradient is this
        rank's slice of the gradient of the global loss.

        :param scores: ``(K, G, M')`` the scores of this rank's candidates, with their graph.
        """
        return -torch.where(self.selected, scores, 0.0).sum() / self.num_terms

    def loss(self, scores: Tensor) -> Tensor:
        """The loss value of all ranks with the gradient of this rank's samples."""
        local_part = self.local_part(scores)

        return self.value + (local_part - local_part.detach())


def select_neighbours(
    candidate_scores: Tensor, num_samples: Tensor, k: int, process_group: dist.ProcessGroup | None
) -> KnnSelection:
    """Select the K nearest samples of every vertex among the candidates of all ranks.

    Each rank all-gathers its detached candidate scores (K x G x M' values) and the number of
    its samples in one message. The candidates are ordered by rank, then by their order on the
    rank; equal scores go to the earlier one, so exactly ``K_eff`` candidates count per vertex
    on all ranks together. A rank without samples takes part with ``-inf`` candidates.

    :param candidate_scores: ``(K, G, M')`` this rank's top-K scores, ``-inf`` where it has
        fewer than K samples.
    :param num_samples: The number of this rank's (unmasked) samples, an integer scalar tensor.
    :param process_group: ``None`` selects among this rank's samples only.
    """
    scores = candidate_scores.detach()

    k, num_codebooks, num_vertices = scores.shape

    offset: int | None

    if process_group is None or dist.get_world_size(process_group) == 1:
        all_scores, total, offset = scores, num_samples, None
    else:
        world_size = dist.get_world_size(process_group)

        # One message per rank: the candidate scores, then the sample count (exact in float32
        # up to 2^24 samples per rank).
        message = torch.cat([scores.flatten(), num_samples.to(scores.dtype).reshape(1)])

        gathered = message.new_empty(world_size * message.numel())

        dist.all_gather_into_tensor(gathered, message, group=process_group)

        gathered = gathered.view(world_size, message.numel())

        total = gathered[:, -1].round().to(torch.int64).sum()

        # (R x K, G, M') in rank order.
        all_scores = gathered[:, :-1].reshape(world_size * k, num_codebooks, num_vertices)

        offset = dist.get_rank(process_group) * k

    order = first_k(all_scores, k, dim=0)

    top_scores = all_scores.gather(0, order)

    # -inf marks padding and masked rows; every real score is finite.
    counts = top_scores > -math.inf

    if offset is None:
        selected = counts
    else:
        chosen = torch.zeros_like(all_scores, dtype=torch.bool).scatter_(0, order, counts)

        selected = chosen[offset : offset + k]

    num_terms = (total.clamp(max=k).clamp(min=1) * (num_codebooks * num_vertices)).to(scores.dtype)

    value = -torch.where(counts, top_scores, 0.0).sum() / num_terms

    return KnnSelection(value=value, selected=selected, num_terms=num_terms, num_samples=total)


def candidate_entries(distances: Tensor, rows: Tensor, vertices: Tensor | None) -> Tensor:
    """``-distances`` at the candidates: entry ``[k, g, m]`` is ``-distances[rows[k, g, m], g,
    vertex m]``, with its graph; rows beyond ``distances`` read row 0 (their candidates never
    count).

    :param distances: ``(C, G, M)``. :param rows: ``(K, G, M')`` rows of ``distances``.
    """
    num_rows = distances.size(0)

    restricted = restrict_to_vertices(distances, vertices)

    if num_rows == 0:
        # Zeros that stay in the graph: an empty rank still sends (zero) gradients.
        return restricted.sum() + restricted.new_zeros(rows.shape)

    return -restricted.gather(0, rows.clamp(0, num_rows - 1))
