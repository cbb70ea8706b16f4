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


def local_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Return the top-K scores of each column of ``scores`` and their rows, padded to K rows
    with ``-inf`` (and row -1) when there are fewer than K samples.

    :param scores: ``(N, G, M')``.
    :returns: ``(K, G, M')`` scores (with their gradient) and ``(K, G, M')`` int64 rows.
    """
    values, rows = scores.topk(min(k, scores.size(0)), dim=0)

    return _padded(values, rows, k)


def column_top_k(keys: Tensor, k: int, vertices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The K largest keys of every column and their rows, exactly, ties going to the lower row.

    A top-K across rows is slow where it is strided, and a column maximum is fast, so the
    search goes through blocks of B rows: one pass takes every block's column maxima, the K
    blocks with the largest maxima (ties to the earlier block) hold the column's top K, and
    only those K x B rows are sorted. The k-th best entry lies in one of them: each of the K
    chosen blocks holds an entry that ranks before every entry of an unchosen block.

    :param keys: ``(G, N, M)`` codebook-major, no NaN; ``-inf`` marks rows that never count.
    :param vertices: ``(G, M')`` the columns to search; ``None`` for all M.
    :returns: ``(K, G, M')`` keys, padded with ``-inf`` below K rows, and ``(K, G, M')`` int64
        rows (-1 where padded).
    """
    num_codebooks, num_rows, num_columns = keys.shape

    width = num_columns if vertices is None else vertices.size(1)

    if num_rows == 0:
        return _padded(
            keys.new_empty((0, num_codebooks, width)), keys.new_empty((0, num_codebooks, width), dtype=torch.int64), k
        )

    block = _block_size(num_rows, k)

    num_full = num_rows // block

    maxima = []

    if num_full > 0:
        maxima.append(keys[:, : num_full * block].reshape(num_codebooks, num_full, block, num_columns).amax(dim=2))

    if num_full * block < num_rows:
        maxima.append(keys[:, num_full * block :].amax(dim=1, keepdim=True))

    # (G, blocks, M')
    block_maxima = torch.cat(maxima, dim=1) if len(maxima) > 1 else maxima[0]

    if vertices is None:
        columns = torch.arange(num_columns, device=keys.device).expand(num_codebooks, 1, num_columns)
    else:
        columns = vertices.unsqueeze(1)

        block_maxima = block_maxima.gather(2, columns.expand(-1, block_maxima.size(1), -1))

    # The chosen blocks in row order, so that ties below go to the lower row.
    blocks = first_k(block_maxima, min(k, block_maxima.size(1)), dim=1).sort(dim=1).values

    offsets = torch.arange(block, device=keys.device).view(1, 1, block, 1)

    rows = (blocks.unsqueeze(2) * block + offsets).flatten(1, 2)

    beyond = rows >= num_rows

    rows = rows.clamp_max(num_rows - 1)

    # All columns: one gather along the rows, faster than the flat-index take of a subset.
    values = keys.gather(1, rows) if vertices is None else take_entries(keys, rows, columns)

    values = values.masked_fill(beyond, -math.inf)

    order = first_k(values, min(k, num_rows), dim=1)

    top_values, top_rows = values.gather(1, order), rows.gather(1, order)

    return _padded(top_values.transpose(0, 1), top_rows.transpose(0, 1), k)


def first_k(values: Tensor, k: int, dim: int) -> Tensor:
    """The indices of the k largest entries along ``dim``, largest first, equal values in
    index order: the first k of a stable descending sort.

    ``topk`` gives them unless equal values meet at or above the k-th, which a check of the
    (few) values finds; only then does a stable sort run.
    """
    top = values.topk(k, dim=dim)

    kth = top.values.narrow(dim, k - 1, 1)

    distinct = bool((top.values.narrow(dim, 0, k - 1) > top.values.narrow(dim, 1, k - 1)).all())

    if distinct and bool(((values >= kth).sum(dim) == k).all()):
        return top.indices

    return values.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)


def take_entries(values: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """``values[g, rows[g, ...], columns[g, ...]]`` of a ``(G, N, M)`` tensor, by flat
    index (advanced indexing with three index tensors is several times slower).

    :param rows: ``(G, ...)`` or broadcastable. :param columns: broadcastable with ``rows``.
    """
    num_codebooks, num_rows, num_columns = values.shape

    codebooks = torch.arange(num_codebooks, device=values.device).view(-1, *([1] * (rows.dim() - 1)))

    return values.take((codebooks * num_rows + rows) * num_columns + columns)


def _block_size(num_rows: int, k: int) -> int:
    """About ``sqrt(N / K)`` rows, a power of two: as many blocks as rows to sort."""
    return 1 << max(0, round(math.log2(max(1.0, math.sqrt(num_rows / k)))))


def _padded(values: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(K', G, M')`` candidates padded to K with ``-inf`` and row -1."""
    padding = k - values.size(0)

    if padding <= 0:
        return values, rows

    values = torch.cat([values, values.new_full((padding, *values.shape[1:]), -math.inf)])

    rows = torch.cat([rows, rows.new_full((padding, *rows.shape[1:]), -1)])

    return values, rows


def merge_candidates(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Fold the candidates of later rows into running top-K candidates.

    :param best: ``(K, G, M')`` scores and rows so far. :param new: the same of rows that all
        come after them, so that a stable sort leaves ties to the earlier rows.
    """
    values = torch.cat([best[0], new[0]])

    order = first_k(values, best[0].size(0), dim=0)

    return values.gather(0, order), torch.cat([best[1], new[1]]).gather(0, order)


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
