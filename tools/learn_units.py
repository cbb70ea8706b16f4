"""Learns k-means units on extracted features and writes unit sequences, as fairseq's HuBERT
``simple_kmeans`` scripts do (``learn_kmeans.py``, ``dump_km_label.py``).

Examples::

    # Features of layer 6 (0-based: the output of the 7th Transformer layer) in 4 parts.
    for r in 0 1 2 3; do python tools/extract_features.py RUN manifests/train.tsv feats --layers 6 \\
        --layout fairseq --nshard 4 --rank $r; done
    python tools/learn_units.py learn feats --kind layer6 --split train --nshard 4 --clusters 500 -o km500
    python tools/learn_units.py write feats --kind layer6 --split train --nshard 4 --rank 0 --kmeans km500 -o units
    # The quantizer's codes as units: one product id per frame, or one stream per codebook.
    python tools/learn_units.py write feats --kind codes --split train --nshard 4 --rank 0 --codes streams -o units

``learn`` samples ``--fraction`` of the utterances of every part (seeded) and fits
scikit-learn's ``MiniBatchKMeans`` with fairseq's settings; it writes ``kmeans.npy`` (the
centroids) and ``kmeans.json`` (what they were learned from). ``write`` writes
``{split}_{rank}_{nshard}.km``: one line per utterance in manifest order, its units separated
by spaces (``--dedup`` writes each run of a unit once); ``cat`` the parts in rank order to get
the whole split.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.features.shards import ShardExtractionError
from w2v_knnvq.features.units import (
    KMeansSettings,
    UnitsError,
    kmeans_record,
    learn_kmeans,
    load_kmeans,
    sample_frames,
    save_kmeans,
    write_units,
)
from w2v_knnvq.tool import tool_parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(__doc__)

    commands = parser.add_subparsers(dest="command", required=True)

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "feature_dir", type=Path, help="the --output-dir of tools/extract_features.py --layout fairseq"
        )
        command.add_argument("--kind", required=True, help="layer{L}, cnn or codes: the subdirectory of features")
        command.add_argument("--split", required=True, help="the split name of the feature files")
        command.add_argument("--nshard", type=int, default=1, help="the parts the split was extracted in (default: 1)")
        command.add_argument("-o", "--output-dir", type=Path, required=True)

    learn = commands.add_parser("learn", help="fit k-means to a sample of frames")
    common(learn)
    learn.add_argument("--clusters", type=int, default=100, help="the number of units (default: 100)")
    learn.add_argument("--fraction", type=float, default=0.1, help="fraction of each part's utterances sampled (default: 0.1)")  # fmt: skip
    learn.add_argument("--seed", type=int, default=0)
    learn.add_argument("--batch-size", type=int, default=10_000, help="MiniBatchKMeans batch size (default: 10000)")
    learn.add_argument("--max-iter", type=int, default=100)
    learn.add_argument("--n-init", type=int, default=20)

    write = commands.add_parser("write", help="write the unit sequences of one part")
    common(write)
    write.add_argument("--rank", type=int, default=0, help="the part, 0 .. nshard-1 (default: 0)")
    write.add_argument("--kmeans", type=Path, help="the --output-dir of `learn` (not for --kind codes)")
    write.add_argument(
        "--codes",
        choices=("product", "streams"),
        default="product",
        help="with --kind codes: G codebooks as one product id (default) or one .g{g}.km stream each",
    )
    write.add_argument("--dedup", action="store_true", help="write each run of one unit once")

    return parser.parse_args(argv)


def _learn(args: argparse.Namespace) -> str:
    settings = KMeansSettings(
        n_clusters=args.clusters,
        fraction=args.fraction,
        seed=args.seed,
        batch_size=args.batch_size,
        max_iter=args.max_iter,
        n_init=args.n_init,
    )

    settings.validate()

    frames = sample_frames(args.feature_dir / args.kind, args.split, args.nshard, settings.fraction, settings.seed)

    logging.info("Fitting %d clusters to %d frames of %d dimensions.", settings.n_clusters, *frames.shape)

    centroids, inertia = learn_kmeans(frames, settings)

    record = kmeans_record(
        settings,
        feature_dir=str(args.feature_dir.resolve()),
        kind=args.kind,
        split=args.split,
        nshard=args.nshard,
        num_frames=len(frames),
        inertia_per_frame=inertia,
    )

    save_kmeans(args.output_dir, centroids, record)

    return f"{settings.n_clusters} centroids of {len(frames)} frames (inertia per frame {inertia:.4g}) in {args.output_dir}"


def _write(args: argparse.Namespace) -> str:
    centroids = None

    if args.kind == "codes":
        if args.kmeans is not None:
            raise UnitsError("--kmeans does not apply to --kind codes (the codes are units already); drop it.")
    else:
        if args.kmeans is None:
            raise UnitsError(f"--kind {args.kind} needs --kmeans, the centroids that `learn` wrote.")

        centroids, record = load_kmeans(args.kmeans)

        if record.get("kind") not in (None, args.kind):
            raise UnitsError(f"{args.kmeans} was learned on `{record['kind']}` features, not `{args.kind}`.")

    files = write_units(
        args.feature_dir,
        args.output_dir,
        split=args.split,
        nshard=args.nshard,
        rank=args.rank,
        kind=args.kind,
        centroids=centroids,
        code_units=args.codes,
        dedup=args.dedup,
    )

    return "wrote " + ", ".join(str(file) for file in files)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    try:
        report = _learn(args) if args.command == "learn" else _write(args)
    except (UnitsError, ShardExtractionError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(report, file=sys.stderr)

    return 0


if __name__ == "__main__":
    sys.exit(main())
