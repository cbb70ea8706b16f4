"""Codebook usage reports of any modality: the histograms of Figure 2 and the Markdown tables
in the layout of Tables 1 and 2.

The histograms take a :class:`~w2v_knnvq.quantizer.CodebookUsageReport`; the tables take one
:class:`UsageTableRow` per evaluated model (built from a report by
:meth:`UsageTableRow.from_report`, or from a stored evaluation) and the modality's own score
columns (rMSE, FID, IS for images).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

from w2v_knnvq.quantizer import CodebookUsageReport

MISSING: Final = "—"
"""The table cell of a score or K that does not apply."""


@dataclass(frozen=True, kw_only=True)
class SampleNoun:
    """How a report names one sample of the evaluation set (an image, an utterance)."""

    singular: str
    """E.g. ``"image"``; it also names the per-sample histogram ``per_image_usage.png``."""

    article: str = "a"

    @property
    def plural(self) -> str:
        return f"{self.singular}s"


IMAGE: Final = SampleNoun(singular="image", article="an")

UTTERANCE: Final = SampleNoun(singular="utterance", article="an")


def save_usage_histograms(
    report: CodebookUsageReport, output_dir: Path, *, title: str, sample: SampleNoun
) -> list[Path]:
    """Write Figure 2's histograms as PNG to ``output_dir``.

    ``per_{sample}_usage.png`` shows the fraction of codes used within each sample (the mean
    over the G codebooks of ``report.per_sample_usage`` ``(S, G)``); ``code_popularity.png``
    the fraction of samples that contain each code (all G x M entries of ``report.popularity``).

    :returns: The two files.
    :raises RuntimeError: if matplotlib is not installed.
    """
    per_sample_usage = [100.0 * usage for usage in report.per_sample_usage.mean(dim=-1).tolist()]

    popularity = [100.0 * value for row in report.popularity.tolist() for value in row]

    noun = sample.plural.capitalize()

    return [
        _save_histogram(
            output_dir / f"per_{sample.singular}_usage.png",
            per_sample_usage,
            xlabel=f"Codes used within {sample.article} {sample.singular} (%)",
            ylabel=noun,
            title=title,
        ),
        _save_histogram(
            output_dir / "code_popularity.png",
            popularity,
            xlabel=f"{noun} containing the code (%)",
            ylabel="Codes",
            title=title,
        ),
    ]


def _save_histogram(file: Path, percentages: Sequence[float], *, xlabel: str, ylabel: str, title: str) -> Path:
    """Write a 50-bin histogram of ``percentages`` over ``[0, 100]`` to ``file``."""
    plt = _pyplot()

    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.hist(percentages, bins=50, range=(0.0, 100.0), color="tab:blue")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()

    figure.savefig(file, dpi=120)
    plt.close(figure)

    return file


def _pyplot() -> ModuleType:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")

        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("The usage plots need matplotlib: pip install matplotlib") from None

    return plt


@dataclass(frozen=True, kw_only=True)
class ScoreColumn:
    """A column of Table 1 after "Code Use", e.g. rMSE."""

    key: str
    """The score's key in :attr:`UsageTableRow.scores`."""

    title: str

    pattern: str
    """The :meth:`str.format` pattern of a value, e.g. ``"{:.3f}"``."""

    def cell(self, scores: Mapping[str, float | None]) -> str:
        """The table cell of this column's score in ``scores``."""
        value = scores.get(self.key)

        return MISSING if value is None else self.pattern.format(value)


@dataclass(frozen=True, kw_only=True)
class UsageTableRow:
    """The scores of one model in one column group of Tables 1 and 2."""

    method: str

    knn_k: int | None
    """K of a KNN-regularized method; ``None`` for the others."""

    group: str
    """The column group, e.g. the feature map and codebook size ``"16x16x32; 1024"``."""

    code_use: Sequence[float]
    """``(G,)`` fraction of codes used in the whole set (``CodebookUsageReport.usage``)."""

    perplexity_percentiles: Sequence[Sequence[float]] | None
    """``(G, 4)`` percentiles of the individual perplexity; ``None`` for hard methods."""

    scores: Mapping[str, float | None]
    """The values of the modality's :class:`ScoreColumn` keys; ``None`` if not computed."""

    @staticmethod
    def from_report(
        report: CodebookUsageReport,
        *,
        method: str,
        knn_k: int | None,
        group: str,
        scores: Mapping[str, float | None],
    ) -> UsageTableRow:
        """The row of a model whose evaluation set gave ``report``."""
        percentiles = report.perplexity_percentiles

        return UsageTableRow(
            method=method,
            knn_k=knn_k,
            group=group,
            code_use=report.usage.tolist(),
            perplexity_percentiles=None if percentiles is None else percentiles.tolist(),
            scores=scores,
        )

    @property
    def key(self) -> tuple[str, str]:
        """The table row: method and K."""
        return self.method, MISSING if self.knn_k is None else str(self.knn_k)


_Rows = dict[tuple[str, str], dict[str, UsageTableRow]]


def format_usage_tables(rows: Iterable[UsageTableRow], columns: Sequence[ScoreColumn], *, score_caption: str) -> str:
    """Markdown tables in the layout of the paper's Table 1 (code use and ``columns``) and
    Table 2 (individual perplexity percentiles of smoothed methods), one column group per
    :attr:`UsageTableRow.group`, one row per method and K, in the order they first appear.

    :param score_caption: What ``columns`` measure, e.g. ``"reconstruction quality"``.
    """
    by_key, groups = _group_rows(rows)

    return (
        f"Table 1 layout: codebook usage and {score_caption}.\n\n"
        f"{_usage_table(by_key, groups, columns)}\n\n"
        "Table 2 layout: individual perplexity of the smoothed quantizers (first codebook).\n\n"
        f"{_perplexity_table(by_key, groups)}\n"
    )


def speech_table_row(record: Mapping[str, object]) -> UsageTableRow:
    """The Table 3 row of a pretraining evaluation's JSON record (``evaluation.json`` of
    ``recipes.wav2vec2_knnvq.ssl.evaluate``), in the column group of its split.

    :raises KeyError: if ``record`` lacks ``method``, ``split`` or ``codebook_usage``.
    """
    knn_k = record.get("knn_k")

    percentiles = record.get("perplexity_percentiles")

    usage = record["codebook_usage"]

    if not isinstance(usage, list):
        raise TypeError(f"`codebook_usage` must be a list, but is {type(usage).__name__} instead.")

    return UsageTableRow(
        method=str(record["method"]),
        knn_k=knn_k if isinstance(knn_k, int) else None,
        group=str(record["split"]),
        code_use=[float(value) for value in usage],
        perplexity_percentiles=percentiles if isinstance(percentiles, list) and percentiles else None,
        scores={},
    )


def format_codebook_table(rows: Iterable[UsageTableRow]) -> str:
    """Markdown tables in the layout of the paper's Table 3 (the usage of each codebook, one
    column group per :attr:`UsageTableRow.group`, e.g. a split) and Table 2 (individual
    perplexity percentiles), one row per method and K."""
    by_key, groups = _group_rows(rows)

    num_codebooks = max((len(row.code_use) for by_group in by_key.values() for row in by_group.values()), default=1)

    header = ["Method", "K"]
    for group in groups:
        header += [f"Codebook {g + 1} ({group})" for g in range(num_codebooks)]

    lines = _header_lines(header)

    for (method, knn_k), by_group in by_key.items():
        cells = [method, knn_k]

        for group in groups:
            group_row = by_group.get(group)
            usage = [] if group_row is None else [f"{100.0 * value:.1f}%" for value in group_row.code_use]
            cells += usage + [""] * (num_codebooks - len(usage))

        lines.append(_line(cells))

    return (
        "Table 3 layout: the fraction of each codebook's entries used over the whole set.\n\n"
        + "\n".join(lines)
        + "\n\nTable 2 layout: individual perplexity of the smoothed quantizers (first codebook).\n\n"
        + _perplexity_table(by_key, groups)
        + "\n"
    )


def _group_rows(rows: Iterable[UsageTableRow]) -> tuple[_Rows, list[str]]:
    """:returns: The rows by (method, K) and group, and the groups in the order they first appear."""
    by_key: _Rows = {}
    groups: list[str] = []

    for row in rows:
        if row.group not in groups:
            groups.append(row.group)

        by_key.setdefault(row.key, {})[row.group] = row

    return by_key, groups


def _usage_table(by_key: _Rows, groups: Sequence[str], columns: Sequence[ScoreColumn]) -> str:
    header = ["Method", "K"]
    for group in groups:
        header += [f"Code Use ({group})", *(column.title for column in columns)]

    lines = _header_lines(header)

    for (method, knn_k), by_group in by_key.items():
        cells = [method, knn_k]

        for group in groups:
            row = by_group.get(group)
            if row is None:
                cells += [""] * (1 + len(columns))
                continue

            code_use = sum(row.code_use) / len(row.code_use)

            cells += [f"{100.0 * code_use:.1f}%", *(column.cell(row.scores) for column in columns)]

        lines.append(_line(cells))

    return "\n".join(lines)


def _perplexity_table(by_key: _Rows, groups: Sequence[str]) -> str:
    header = ["Method", "K"]
    for group in groups:
        header += [f"75% ({group})", "90%", "99%", "Max"]

    lines = _header_lines(header)

    for (method, knn_k), by_group in by_key.items():
        if not any(row.perplexity_percentiles for row in by_group.values()):
            continue

        cells = [method, knn_k]

        for group in groups:
            row = by_group.get(group)
            if row is None or not row.perplexity_percentiles:
                cells += ["", "", "", ""]
                continue

            cells += [f"{value:.2f}" for value in row.perplexity_percentiles[0]]

        lines.append(_line(cells))

    return "\n".join(lines)


def _header_lines(header: Sequence[str]) -> list[str]:
    return [_line(header), "|" + "---|" * len(header)]


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
