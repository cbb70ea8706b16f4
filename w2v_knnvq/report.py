"""Codebook usage reports of any modality: the histograms of Figure 2, the Markdown tables in
the layout of Tables 1-3, and the gathering of evaluations of several runs into one report.

The histograms take a :class:`~w2v_knnvq.quantizer.CodebookUsageReport`; the tables take one
:class:`UsageTableRow` per evaluated model (built from a report by
:meth:`UsageTableRow.from_report`, or from a stored evaluation's JSON record by
:func:`speech_table_row` or :func:`image_table_row`) and the modality's own score columns
(rMSE, FID, IS for images). :func:`gather` reads ``evaluation.json`` files only, so it reports
on runs of any recipe without importing it (the error rates of speech recognition evaluations
in a table of their own)::

    w2v-knnvq-report EVAL_DIR_OR_JSON [...] [-o report.md]

Each argument is an ``evaluation.json`` or a folder searched for them: those of the pretraining
evaluation (one per split) give Table 3 (usage of each codebook, one column group per split)
and Table 2; those of the image evaluation give Table 1 (code use, rMSE, FID, IS, one column
group per feature map and codebook size) and Table 2. The Figure 2 histograms that sit beside
each JSON are listed below the tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final, TypeVar

from w2v_knnvq.quantizer import CodebookUsageReport
from w2v_knnvq.tool import tool_parser

T = TypeVar("T")

EVALUATION_FILE: Final = "evaluation.json"
"""The figures of an evaluation: the run, its checkpoint's step, and one record per split."""

SUMMARY_FILE: Final = "summary.md"
"""The tables of an evaluation, in Markdown."""

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
    ``recipes.wav2vec2_knnvq.ssl.eval``), in the column group of its split.

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


IMAGE_SCORE_COLUMNS: Final = (
    ScoreColumn(key="rmse", title="rMSE [-1, 1]", pattern="{:.3f}"),
    ScoreColumn(key="rmse_imagenet", title="rMSE (ImageNet-std.)", pattern="{:.3f}"),
    ScoreColumn(key="fid", title="FID", pattern="{:.2f}"),
    ScoreColumn(key="inception_score", title="IS", pattern="{:.2f}"),
)
"""The columns of Table 1 after "Code Use" for images."""


def image_table_group(feature_map: object, codebook_size: object) -> str:
    """The column group of an image evaluation, e.g. ``"16x16x32; 1024"``."""
    return f"{feature_map}; {codebook_size}"


def image_table_row(record: Mapping[str, object]) -> UsageTableRow:
    """The table row of an image evaluation's JSON record
    (:meth:`~w2v_knnvq.image.evaluation.ImageVqaeEvaluation.to_json`).

    :raises KeyError: if ``record`` lacks ``method``, ``feature_map``, ``codebook_size`` or
        ``code_use``.
    :raises TypeError: if a field has the wrong type.
    """
    code_use = _optional(record, "code_use", list)
    if code_use is None:
        raise KeyError("code_use")

    return UsageTableRow(
        method=str(record["method"]),
        knn_k=_optional(record, "knn_k", int),
        group=image_table_group(record["feature_map"], record["codebook_size"]),
        code_use=code_use,
        perplexity_percentiles=_optional(record, "perplexity_percentiles", list) or None,
        scores={column.key: _score(record, column.key) for column in IMAGE_SCORE_COLUMNS},
    )


def format_image_tables(rows: Iterable[UsageTableRow]) -> str:
    """Markdown tables in the layout of the paper's Tables 1 (code use, rMSE, FID, IS) and 2
    (individual perplexity percentiles), one column group per feature map and codebook size,
    one row per method and K.

    :param rows: From :meth:`~w2v_knnvq.image.evaluation.ImageVqaeEvaluation.table_row` or
        :func:`image_table_row`.
    """
    return format_usage_tables(
        rows,
        IMAGE_SCORE_COLUMNS,
        score_caption=(
            "reconstruction quality (rMSE on [-1, 1] pixels, the model's space, and on "
            "ImageNet-standardized pixels, the space Table 1's values suggest)"
        ),
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


def _optional(record: Mapping[str, object], name: str, kind: type[T]) -> T | None:
    value = record.get(name)

    if value is None or isinstance(value, kind):
        return value

    raise TypeError(f"`{name}` must be of type `{kind.__name__}`, but is of type `{type(value).__name__}` instead.")


def _score(record: Mapping[str, object], name: str) -> float | None:
    value = record.get(name)

    if value is None or isinstance(value, (int, float)):
        return value

    raise TypeError(f"`{name}` must be a number, but is of type `{type(value).__name__}` instead.")


ERROR_RATE_HEADER: Final = ("Run", "Split", "WER", "CER", "WER, beam search", "CER, beam search")


def error_rate_row(record: Mapping[str, object]) -> list[str]:
    """The row of :func:`format_error_rate_table` of a speech recognition evaluation's record
    (greedy ``wer`` and ``cer`` in percent, ``beam_search`` with its own if it ran).

    :raises KeyError: if ``record`` lacks ``split``, ``wer`` or ``cer``.
    :raises TypeError: if a rate is no number.
    """
    beam = record.get("beam_search")

    rates = [record, beam] if isinstance(beam, Mapping) else [record]

    cells = [f"{_rate(values, name):.2f}" for values in rates for name in ("wer", "cer")]

    return [str(record.get("run_dir", MISSING)), str(record["split"]), *cells, *[MISSING] * (4 - len(cells))]


def _rate(record: Mapping[str, object], name: str) -> float:
    value = record[name]

    if not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, but is of type `{type(value).__name__}` instead.")

    return float(value)


def format_error_rate_table(rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of the word and character error rates (percent) of speech recognition
    evaluations, one row per run and split (:func:`error_rate_row`)."""
    return "\n".join([*_header_lines(ERROR_RATE_HEADER), *(_line(row) for row in rows)]) + "\n"


HISTOGRAMS: Final = ("per_utterance_usage.png", "per_image_usage.png", "code_popularity.png")
"""The Figure 2 histograms that :func:`gather` lists when they sit beside an evaluation."""


def find_evaluations(paths: Sequence[Path]) -> list[Path]:
    """The ``evaluation.json`` files of ``paths``: a file is taken as it is, a folder is
    searched (sorted, recursively).

    :raises FileNotFoundError: naming a path that holds no ``evaluation.json``.
    """
    files: list[Path] = []

    for path in paths:
        found = [path] if path.is_file() else sorted(path.rglob(EVALUATION_FILE))

        if not found:
            raise FileNotFoundError(
                f"{path} holds no evaluation.json; give the output folder of an evaluation or its JSON file."
            )

        files.extend(found)

    return files


def evaluation_records(document: Mapping[str, object]) -> list[dict[str, object]]:
    """The records of an evaluation's JSON document: the document itself (one file per split
    or image set), or each record of its ``splits`` with the document's other fields (the
    run, its checkpoint) added.

    :raises TypeError: if ``splits`` is not a list of JSON objects.
    """
    splits = document.get("splits")

    if splits is None:
        return [dict(document)]

    if not isinstance(splits, list) or not all(isinstance(record, dict) for record in splits):
        raise TypeError("`splits` must be a list of JSON objects")

    shared = {name: value for name, value in document.items() if name != "splits"}

    return [{**shared, **record} for record in splits]


def gather(files: Sequence[Path]) -> str:
    """One Markdown report of the evaluation records ``files``: a speech section (Tables 3 and
    2), an image section (Tables 1 and 2), a speech recognition section (WER and CER) and the
    Figure 2 histograms beside the files (or in a folder per split).

    :raises ValueError: naming a file that is no evaluation record.
    """
    speech: list[UsageTableRow] = []
    image: list[UsageTableRow] = []
    recognition: list[list[str]] = []
    plots: list[str] = []

    for file in files:
        try:
            document = json.loads(file.read_text(encoding="utf-8"))

            if not isinstance(document, dict):
                raise TypeError(f"a JSON object is expected, but the file holds a {type(document).__name__}")

            records = evaluation_records(document)

            for record in records:
                if "feature_map" in record:
                    image.append(image_table_row(record))
                elif "wer" in record and "codebook_usage" not in record:
                    recognition.append(error_rate_row(record))
                else:
                    speech.append(speech_table_row(record))
        except (json.JSONDecodeError, KeyError, TypeError) as ex:
            raise ValueError(
                f"{file} is no evaluation record ({ex!r}); give files written by the speech or image evaluation."
            ) from None

        folders = [file.parent] + [file.parent / str(record["split"]) for record in records if "split" in record]

        plots += [
            f"- {folder / name}"
            for folder in dict.fromkeys(folders)
            for name in HISTOGRAMS
            if (folder / name).is_file()
        ]

    sections = []

    if speech:
        sections.append("## Speech\n\n" + format_codebook_table(speech))

    if image:
        sections.append("## Images\n\n" + format_image_tables(image))

    if recognition:
        sections.append("## Speech recognition\n\n" + format_error_rate_table(recognition))

    if plots:
        sections.append("## Figure 2 histograms\n\n" + "\n".join(plots) + "\n")

    return "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    """``w2v-knnvq-report``: gathers evaluations into one report (printed or written)."""
    parser = tool_parser(__doc__, prog="w2v-knnvq-report")
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluation.json files or folders holding them")
    parser.add_argument("-o", "--output", type=Path, help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)

    try:
        report = gather(find_evaluations(args.evaluations))
    except (FileNotFoundError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    if args.output is None:
        print(report)
    else:
        args.output.write_text(report, encoding="utf-8")

        print(f"Wrote {args.output}.")

    return 0


if __name__ == "__main__":
    sys.exit(main())
