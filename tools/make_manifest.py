"""Writes fairseq-style manifests: ``{name}.tsv``/``{name}.wrd`` for a LibriSpeech-layout corpus,
or, with ``--unlabeled``, ``train.tsv``/``valid.tsv`` for any folder tree of audio files.

Examples::

    python tools/make_manifest.py /data/LibriSpeech --splits dev-clean --output-dir manifests
    python tools/make_manifest.py /data/LibriSpeech \\
        --splits train-clean-100 train-clean-360 train-other-500 --name train --output-dir manifests
    python tools/make_manifest.py /data/LibriLight --unlabeled --ext flac --valid-percent 0.01 --output-dir manifests
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.data.manifest import (
    LIBRISPEECH_SPLITS,
    BadFilesError,
    ManifestConfig,
    ManifestError,
    make_manifest,
)
from w2v_knnvq.data.unlabeled import UnlabeledManifestConfig, make_unlabeled_manifests
from w2v_knnvq.tool import tool_parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(__doc__)

    parser.add_argument(
        "corpus_dir",
        type=Path,
        help="folder holding the split folders (e.g. LibriSpeech), or any tree with --unlabeled",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        metavar="SPLIT",
        help=f"split folders to combine, e.g. {' '.join(LIBRISPEECH_SPLITS[:3])}",
    )
    parser.add_argument("--unlabeled", action="store_true", help="any folder tree, no transcripts (pretraining)")
    parser.add_argument(
        "--ext", nargs="+", default=["flac"], help="with --unlabeled: file extensions (flac wav ogg ...)"
    )
    parser.add_argument(
        "--valid-percent", type=float, default=0.01, help="with --unlabeled: fraction of files for valid.tsv"
    )
    parser.add_argument("--seed", type=int, default=1, help="with --unlabeled: seeds the validation draw")
    parser.add_argument(
        "--segment-seconds",
        type=float,
        help="with --unlabeled: write each file as consecutive windows of this length (long recordings)",
    )
    parser.add_argument(
        "--min-segment-seconds",
        type=float,
        default=2.0,
        help="with --segment-seconds: leave out a last window shorter than this (default: 2)",
    )
    parser.add_argument("--name", help="manifest base name (default: the split name if only one split)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help="required rate in Hz")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad files out with a warning instead of refusing to write",
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="decode every sample (slow) instead of only the end of each file",
    )
    parser.add_argument("--num-workers", type=int, default=4, help="audio-checking threads")

    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    if args.unlabeled:
        return _make_unlabeled(args)

    if args.segment_seconds is not None:
        print("error: `--segment-seconds` applies to --unlabeled manifests only; drop it.", file=sys.stderr)

        return 2

    if not args.splits:
        print("error: `--splits` must name at least one split folder (or give --unlabeled).", file=sys.stderr)

        return 2

    config = ManifestConfig(
        corpus_dir=args.corpus_dir,
        splits=args.splits,
        output_dir=args.output_dir,
        name=args.name,
        sample_rate=args.sample_rate,
        skip_bad=args.skip_bad,
        full_decode=args.full_decode,
        num_workers=args.num_workers,
    )

    def write() -> str:
        files = make_manifest(config)

        return f"{files.num_entries} entries to {files.tsv_path} and {files.wrd_path}"

    return _report(write)


def _make_unlabeled(args: argparse.Namespace) -> int:
    config = UnlabeledManifestConfig(
        audio_dir=args.corpus_dir,
        output_dir=args.output_dir,
        extensions=args.ext,
        valid_percent=args.valid_percent,
        seed=args.seed,
        sample_rate=args.sample_rate,
        skip_bad=args.skip_bad,
        full_decode=args.full_decode,
        num_workers=args.num_workers,
        segment_seconds=args.segment_seconds,
        min_segment_seconds=args.min_segment_seconds,
    )

    def write() -> str:
        manifests = make_unlabeled_manifests(config)

        written = f"{manifests.num_train} entries to {manifests.train_path}"

        if manifests.valid_path is not None:
            written += f" and {manifests.num_valid} to {manifests.valid_path}"

        return written

    return _report(write)


def _report(write: Callable[[], str]) -> int:
    """Runs ``write`` and says what it wrote. :returns: 0, 1 for bad files, 2 for other errors."""
    try:
        written = write()
    except BadFilesError as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1
    except ManifestError as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 2

    print(f"wrote {written}", file=sys.stderr)

    return 0


if __name__ == "__main__":
    sys.exit(main())
