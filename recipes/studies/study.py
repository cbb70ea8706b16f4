"""A study: a grid of quantizer methods and K values on a pretraining preset, one run each,
every run evaluated on the validation split, then one report in the paper's table layouts.

    w2v-knnvq-study [--output-dir outputs/study] [--methods ...] [--k 1 2 4]
        [--num-steps 150] [--preset recipes/wav2vec2_knnvq/ssl/configs/tiny_cpu.yaml]

Methods default to all fourteen; K values apply to the KNN methods (one run per K), the other
methods run once. On the bundled corpus by default (``MINISPEECH_MANIFEST_DIR`` or
``--manifest-dir`` points at other manifests with ``train`` and ``valid`` splits). Runs go to
``OUTPUT_DIR/{method}`` or ``OUTPUT_DIR/{method}-k{K}``, the report to ``OUTPUT_DIR/report.md``;
a rerun resumes unfinished runs and skips finished ones.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.quantizer import METHOD_NAMES, METHODS
from w2v_knnvq.report import find_evaluations, gather
from w2v_knnvq.tool import tool_parser

from .jobs import REPO_ROOT, JobError
from .pretraining import PRESET, PretrainingRun, evaluate_all, pretrain_all, result_table, write_manifests


def study_runs(methods: Sequence[str], knn_ks: Sequence[int]) -> list[PretrainingRun]:
    """One run per non-KNN method and one per (KNN method, K).

    :raises ValueError: naming an unknown method.
    """
    runs = []

    for method in methods:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHOD_NAMES)}, but is '{method}' instead.")

        if METHODS[method].regularizer != "knn":
            runs.append(PretrainingRun(name=method, method=method))
            continue

        for k in knn_ks:
            override = f"model.config_overrides.quantizer.knn_k={k}"

            runs.append(PretrainingRun(name=f"{method}-k{k}", method=method, overrides=(override,)))

    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__, prog="w2v-knnvq-study")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "study")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    parser.add_argument("--k", type=int, nargs="+", default=[2], help="K values of the KNN methods")
    parser.add_argument("--num-steps", type=int, default=150)
    parser.add_argument("--preset", type=Path, default=PRESET)
    parser.add_argument("--manifest-dir", type=Path, default=None, help="default: manifests of the bundled corpus")
    args = parser.parse_args(argv)

    try:
        runs = study_runs(args.methods, args.k)
    except ValueError as ex:
        parser.error(str(ex))

    output_dir: Path = args.output_dir.resolve()

    manifest_dir = args.manifest_dir.resolve() if args.manifest_dir else output_dir / "manifests"

    if args.manifest_dir is None:
        write_manifests(manifest_dir)

    start = time.monotonic()

    try:
        jobs = pretrain_all(runs, output_dir, manifest_dir, args.num_steps, preset=args.preset.resolve())

        records = evaluate_all(jobs, manifest_dir)
    except JobError as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    report = gather(find_evaluations([job.output_dir / "eval" for job in jobs]))

    (output_dir / "report.md").write_text(report, encoding="utf-8")

    print(f"\n{result_table(records, args.num_steps)}\n")

    print(f"Report: {output_dir / 'report.md'} ({len(runs)} runs, {time.monotonic() - start:.0f} s in all)")

    return 0


if __name__ == "__main__":
    sys.exit(main())
