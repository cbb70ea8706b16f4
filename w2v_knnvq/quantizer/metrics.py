"""Codebook usage over an evaluation set (Tables 1-3, Figure 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PERPLEXITY_QUANTILES: tuple[float, ...] = (0.75, 0.90, 0.99, 1.0)


def distribution_perplexity(probs: Tensor) -> Tensor:
    """Return ``exp(-sum_m p_m log p_m)`` of distributions over M codes, with ``0 log 0 = 0``.

    :param probs: ``(..., M)``, each row summing to 1.

    :returns: ``(...)``, in ``[1, M]``: 1 for a onehot vector, M for the uniform distribution.
    """
    # p log p -> 0 as p -> 0; the floor inside the logarithm keeps its gradient finite there
    # (xlogy's is -inf at 0, and 0 x -inf is NaN further back).
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)

    return entropy.exp()


def individual_perplexity(log_probs: Tensor) -> Tensor:
    """Return ``exp(-sum_m p_m log p_m)`` of each smoothed quantizer (Table 2).

    :param log_probs: ``(..., M)``; ``-inf`` entries (underflowed probabilities) count 0.

    :returns: ``(...)``, in ``[1, M]``: 1 for a onehot vector, M for the simplex centre.
    """
    log_probs = log_probs.float()

    # p_m = 0 where log p_m = -inf: the floor keeps 0 x log p_m at 0.
    entropy = -(log_probs.exp() * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(dim=-1)

    return entropy.clamp_min(0.0).exp()


def code_counts(codes: Tensor, codebook_size: int, padding_mask: Tensor | None = None) -> Tensor:
    """Counts how often each code occurs in each of B samples.

    :param codes: ``(B, T, G)`` integer codes of B samples of T frames in G codebooks.
    :param padding_mask: ``(B, T)`` bool, ``True`` for real frames; other frames are not counted.

    :returns: ``(B, G, M)`` int64 counts, on the device of ``codes``.
    """
    batch_size, _, num_codebooks = codes.shape

    # (B, T, G) -> (B, G, T)
    codes = codes.transpose(1, 2).to(torch.int64)

    if padding_mask is None:
        weights = torch.ones_like(codes)
    else:
        weights = padding_mask.to(codes.device, torch.int64).unsqueeze(1).expand_as(codes)

        # Padding frames may hold any value, e.g. -1; count them nowhere.
        codes = codes.clamp(0, codebook_size - 1)

    counts = codes.new_zeros((batch_size, num_codebooks, codebook_size))

    return counts.scatter_add_(2, codes, weights)


def code_usage(counts: Tensor) -> Tensor:
    """:param counts: ``(..., G, M)`` code counts. :returns: ``(..., G)`` float64 fraction of
    the M codes of each codebook that occur at least once (the usage of Tables 1 and 3)."""
    return (counts > 0).double().mean(dim=-1)


def code_perplexity(counts: Tensor) -> Tensor:
    """:param counts: ``(..., G, M)`` code counts. :returns: ``(..., G)`` perplexity of the code
    histogram of each codebook (fairseq2's ``code_perplexity`` per codebook); 1 if empty."""
    counts = counts.double()

    frequencies = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)

    return distribution_perplexity(frequencies).float()


@dataclass
class CodebookUsageReport:
    """Codebook usage statistics of an evaluation set of S samples, per codebook."""

    usage: Tensor
    """``(G,)`` fraction of the M codes used at least once in the whole set (Tables 1, 3)."""

    per_sample_usage: Tensor
    """``(S, G)`` fraction of the M codes used at least once within each sample (Figure 2 top)."""

    popularity: Tensor
    """``(G, M)`` fraction of samples that contain each code (Figure 2 bottom)."""

    code_counts: Tensor
    """``(G, M)`` number of frames assigned to each code."""

    perplexity_percentiles: Tensor | None
    """``(G, 4)`` the 75th, 90th, 99th percentiles and maximum of the individual perplexity of
    every frame (Table 2); ``None`` when no probabilities were given."""


def _quantiles(values: Tensor, quantiles: tuple[float, ...]) -> Tensor:
    """Return the quantiles of ``values`` ``(N, G)`` along N with linear interpolation, as
    :func:`torch.quantile` does, without its limit on the input size.

    :returns: ``(len(quantiles), G)``.
    """
    ordered = values.sort(dim=0).values

    positions = torch.tensor(quantiles, dtype=torch.float64) * (ordered.size(0) - 1)

    lower = positions.floor().long()
    upper = positions.ceil().long()

    weights = (positions - lower).to(ordered.dtype).unsqueeze(-1)

    return ordered[lower] * (1.0 - weights) + ordered[upper] * weights


class CodebookUsage:
    """Accumulates the codes of an evaluation set, one sample (utterance, image) per row.

    Memory grows with the number of samples (one ``(G, M)`` presence row each is reduced on
    the fly to counts, and one usage row of G values is kept) and, when probabilities are given,
    with the number of frames (one perplexity value per frame and codebook).
    """

    def __init__(self, num_codebooks: int, codebook_size: int) -> None:
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size

        self._code_counts = torch.zeros((num_codebooks, codebook_size), dtype=torch.int64)
        self._sample_counts = torch.zeros((num_codebooks, codebook_size), dtype=torch.int64)
        self._per_sample_usage: list[Tensor] = []
        self._perplexities: list[Tensor] = []

    def update(
        self,
        codes: Tensor,
        padding_mask: Tensor | None = None,
        log_probs: Tensor | None = None,
        *,
        perplexity: Tensor | None = None,
    ) -> None:
        """
        :param codes: ``(B, T, G)`` codes of B samples of T frames.
        :param padding_mask: ``(B, T)`` bool, ``True`` for real frames.
        :param log_probs: ``(B, T, G, M)`` log assignment probabilities of smoothed methods.
        :param perplexity: ``(B, T, G)`` the frames' individual perplexities, e.g.
            ``QuantizerOutput.individual_perplexity`` (which chunked quantizers also give);
            instead of ``log_probs``.
        """
        if codes.ndim != 3 or codes.size(-1) != self.num_codebooks:
            raise ValueError(f"`codes` must be (B, T, {self.num_codebooks}), but has shape {tuple(codes.shape)}.")

        codes = codes.detach().to("cpu", torch.int64)

        batch_size, seq_len, _ = codes.shape

        if padding_mask is None:
            mask = torch.ones((batch_size, seq_len), dtype=torch.bool)
        else:
            if padding_mask.shape != (batch_size, seq_len):
                raise ValueError(
                    f"`padding_mask` must have shape {(batch_size, seq_len)}, but has {tuple(padding_mask.shape)}."
                )

            mask = padding_mask.detach().to("cpu", torch.bool)

        # Padding frames may hold any code (e.g. -1); the real ones must be codes.
        real_codes = codes[mask]

        if real_codes.numel() > 0 and (real_codes.min() < 0 or real_codes.max() >= self.codebook_size):
            raise ValueError(f"`codes` must lie in [0, {self.codebook_size}) at real frames.")

        # presence[b, g, m] counts the frames of sample b assigned to code m of codebook g.
        presence = code_counts(codes, self.codebook_size, mask)

        self._code_counts += presence.sum(dim=0)

        used = presence > 0

        self._sample_counts += used.sum(dim=0)

        self._per_sample_usage.append(code_usage(presence))

        if log_probs is not None:
            if log_probs.shape != (*codes.shape, self.codebook_size):
                raise ValueError(
                    f"`log_probs` must have shape {(*codes.shape, self.codebook_size)}, but has {tuple(log_probs.shape)}."
                )

            perplexity = individual_perplexity(log_probs.detach())

        if perplexity is not None:
            if perplexity.shape != codes.shape:
                raise ValueError(
                    f"`perplexity` must have shape {tuple(codes.shape)}, but has {tuple(perplexity.shape)}."
                )

            perplexities = perplexity.detach().float()

            self._perplexities.append(perplexities[mask.to(perplexities.device)].cpu())

    @property
    def num_samples(self) -> int:
        return sum(usage.size(0) for usage in self._per_sample_usage)

    def compute(self) -> CodebookUsageReport:
        num_samples = self.num_samples

        if num_samples == 0:
            raise ValueError("No sample was accumulated; the evaluation set is empty.")

        if self._perplexities:
            perplexities = torch.cat(self._perplexities)

            percentiles: Tensor | None = _quantiles(perplexities, PERPLEXITY_QUANTILES).t()
        else:
            percentiles = None

        return CodebookUsageReport(
            usage=code_usage(self._code_counts),
            per_sample_usage=torch.cat(self._per_sample_usage),
            popularity=self._sample_counts.double() / num_samples,
            code_counts=self._code_counts.clone(),
            perplexity_percentiles=percentiles,
        )
