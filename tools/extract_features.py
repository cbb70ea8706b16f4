"""Extracts CNN features, Transformer layer outputs and discrete codes of a pretrained
``wav2vec2_knnvq`` model, or of fairseq2's ``wav2vec2`` family, for a manifest or a
directory of audio, into resumable shards, one file per utterance, or the layout of
fairseq's HuBERT k-means scripts.

Examples::

    python tools/extract_features.py OUT_DIR manifests/dev-clean.tsv features/dev-clean --layers 6 -1
    python tools/extract_features.py OUT_DIR/checkpoints/step_5000 audio_dir/ features/ --format pt
    python tools/extract_features.py wav2vec2_base manifests/dev-clean.tsv features/ --layout per-utterance
    python tools/extract_features.py OUT_DIR manifests/train.tsv features/ --layers 5 --layout fairseq --nshard 4 --rank 0

``--layout per-utterance`` writes ``features/layer6/<utterance id>.npy`` ``(T, D)`` per
kind (``cnn``, ``layer{L}``, ``codes``), the directories that ABX evaluations read.
``--layout fairseq`` writes ``features/layer6/{split}_{rank}_{nshard}.npy`` (the part's
frames, concatenated) and ``.len`` (frames per utterance), what fairseq's ``learn_kmeans.py``
and ``tools/learn_units.py`` read; ``--nshard N --rank R`` extracts the R-th of N contiguous
parts of the manifest (run R = 0 .. N-1, in parallel if you like). Rerunning the same command
after an interruption skips the finished shards, utterances or parts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fairseq2.device import Device

from w2v_knnvq.data.manifest import ManifestError
from w2v_knnvq.features import AudioInputError, PretrainedModelError, SpeechFeatureExtractor, load_pretrained_model
from w2v_knnvq.features.fairseq_layout import extract_fairseq_part
from w2v_knnvq.features.shards import (
    ShardExtractionError,
    ShardSettings,
    Utterance,
    extract_to_shards,
    list_utterances,
)
from w2v_knnvq.features.utterance_files import extract_per_utterance
from w2v_knnvq.tool import tool_parser

DEFAULT_SHARD_SIZE = 256


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(__doc__)

    parser.add_argument(
        "model",
        help="pretraining output directory, checkpoints/step_N directory, sdp_00.pt file, or asset card name "
        "(a wav2vec2_knnvq or wav2vec2 model)",
    )
    parser.add_argument(
        "input",
        type=Path,
        help="a .tsv manifest (root line, then RELPATH<TAB>NUM_SAMPLES) or a directory of audio files",
    )
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--step", type=int, help="training step to load from an output directory (default: the last)")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="*",
        default=[-1],
        metavar="L",
        help="0-based Transformer layers to save, negative from the end (default: -1; none: --layers)",
    )
    parser.add_argument("--no-codes", action="store_true", help="do not save the discrete codes")
    parser.add_argument("--format", choices=("npy", "pt"), default="npy", help="file format (default: npy)")
    parser.add_argument(
        "--layout",
        choices=("shards", "per-utterance", "fairseq"),
        default="shards",
        help="shards of --shard-size utterances, one file per utterance and kind, or fairseq's "
        "{split}_{rank}_{nshard}.npy + .len per kind (default: shards)",
    )
    parser.add_argument("--nshard", type=int, help="with --layout fairseq: the number of parts (default: 1)")
    parser.add_argument(
        "--rank", type=int, help="with --layout fairseq: the part to extract, 0 .. nshard-1 (default: 0)"
    )
    parser.add_argument(
        "--split",
        help="with --layout fairseq: the split name of the files (default: the manifest's or directory's name)",
    )
    parser.add_argument(
        "--shard-size", type=int, help=f"utterances per shard, with --layout shards (default: {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument(
        "--utterance-ids",
        choices=("stem", "path"),
        help="with --layout per-utterance: name files by the audio file name without suffix (stem, the default) "
        "or by its relative path with / written as __ (path)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass (default: 8)")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda:0")

    return parser.parse_args(argv)


def _check_layout_options(args: argparse.Namespace) -> None:
    """:raises ValueError: on an option of the other layout."""
    if args.layout == "per-utterance" and args.shard_size is not None:
        raise ValueError("--shard-size applies to --layout shards only; drop it.")

    if args.layout != "per-utterance" and args.utterance_ids is not None:
        raise ValueError("--utterance-ids applies to --layout per-utterance only; drop it.")

    if args.layout == "fairseq" and args.shard_size is not None:
        raise ValueError("--shard-size applies to --layout shards only; drop it.")

    if args.layout != "fairseq" and (args.nshard, args.rank, args.split) != (None, None, None):
        raise ValueError("--nshard, --rank and --split apply to --layout fairseq only; drop them.")


def _settings(args: argparse.Namespace, model: str, layers: list[int]) -> ShardSettings:
    return ShardSettings(
        model=model,
        layers=layers,
        codes=not args.no_codes,
        shard_format=args.format,
        shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
        layout="shards" if args.layout == "fairseq" else args.layout,
        utterance_ids="stem" if args.utterance_ids is None else args.utterance_ids,
    )


def _extract(
    args: argparse.Namespace, extractor: SpeechFeatureExtractor, utterances: list[Utterance], settings: ShardSettings
) -> str:
    """Writes the output directory. :returns: What was written, for the log."""
    if args.layout == "fairseq":
        nshard, rank = args.nshard or 1, args.rank or 0

        split = args.split or (args.input.stem if args.input.is_file() else args.input.name)

        part = extract_fairseq_part(
            extractor,
            utterances,
            args.output_dir,
            settings,
            split=split,
            nshard=nshard,
            rank=rank,
            batch_size=args.batch_size,
        )

        written = "written" if part.written else "complete already"

        return f"part {rank} of {nshard} of {split}: {part.num_utterances} utterances, {part.num_frames} frames ({written}) in {args.output_dir}/<kind>/{split}_{rank}_{nshard}.npy"

    if settings.layout == "per-utterance":
        files = extract_per_utterance(extractor, utterances, args.output_dir, settings, batch_size=args.batch_size)

        return f"{files.num_utterances} utterances ({files.num_written} written now) in {args.output_dir}/<kind>/; index: {files.index_file}"

    shards = extract_to_shards(extractor, utterances, args.output_dir, settings, batch_size=args.batch_size)

    return f"{shards.num_shards} shards ({shards.num_written} written now) of {len(utterances)} utterances; index: {shards.index_file}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    try:
        _check_layout_options(args)

        utterances = list_utterances(args.input)

        pretrained = load_pretrained_model(args.model, step=args.step, device=Device(args.device), dtype=torch.float32)

        extractor = SpeechFeatureExtractor(pretrained)

        settings = _settings(args, pretrained.source, extractor.resolve_layers(args.layers))

        report = _extract(args, extractor, utterances, settings)
    except (AudioInputError, PretrainedModelError, ShardExtractionError, ManifestError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(report, file=sys.stderr)

    return 0


if __name__ == "__main__":
    sys.exit(main())
