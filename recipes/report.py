"""Gathers evaluations of several runs, speech and image, into the paper's table layouts.

    python -m recipes.report EVAL_DIR_OR_JSON [...] [-o report.md]

Each argument is an ``evaluation.json`` or a folder searched for them: those of
``python -m recipes.wav2vec2_knnvq.ssl.evaluate`` (one per split) give Table 3 (usage of each
codebook, one column group per split) and Table 2; those of ``tools/evaluate_image_vqae.py``
give Table 1 (code use, rMSE, FID, IS, one column group per feature map and codebook size)
and Table 2. The Figure 2 histograms that sit beside each JSON are linked below the tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.image.evaluation import format_image_tables, image_table_row
from w2v_knnvq.report import UsageTableRow, format_codebook_table, speech_table_row
from w2v_knnvq.tool import tool_parser

HISTOGRAMS = ("per_utterance_usage.png", "per_image_usage.png", "code_popularity.png")


def find_evaluations(paths: Sequence[Path]) -> list[Path]:
    """:raises FileNotFoundError: naming a path that holds no ``evaluation.json``."""
    files: list[Path] = []

    for path in paths:
        found = [path] if path.is_file() else sorted(path.rglob("evaluation.json"))

        if not found:
            raise FileNotFoundError(
                f"{path} holds no evaluation.json; give the output folder of an evaluation or its JSON file."
            )

        files.extend(found)

    return files


def gather(files: Sequence[Path]) -> str:
    """:raises ValueError: naming a file that is no evaluation record."""
    speech: list[UsageTableRow] = []
    image: list[UsageTableRow] = []
    plots: list[str] = []

    for file in files:
        try:
            record = json.loads(file.read_text(encoding="utf-8"))

            if not isinstance(record, dict):
                raise TypeError(f"a JSON object is expected, but the file holds a {type(record).__name__}")

            if "feature_map" in record:
                image.append(image_table_row(record))
            else:
                speech.append(speech_table_row(record))
        except (json.JSONDecodeError, KeyError, TypeError) as ex:
            raise ValueError(
                f"{file} is no evaluation record ({ex!r}); give files written by the speech or image evaluation."
            ) from None

        plots += [f"- {file.parent / name}" for name in HISTOGRAMS if (file.parent / name).is_file()]

    sections = []

    if speech:
        sections.append("## Speech\n\n" + format_codebook_table(speech))

    if image:
        sections.append("## Images\n\n" + format_image_tables(image))

    if plots:
        sections.append("## Figure 2 histograms\n\n" + "\n".join(plots) + "\n")

    return "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__)
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
