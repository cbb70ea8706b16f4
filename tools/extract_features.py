"""Extracts CNN features, Transformer layer outputs and discrete codes of a pretrained
``wav2vec2_knnvq`` model for a manifest or a directory of audio, into resumable shards.

Examples::

    python tools/extract_features.py OUT_DIR manifests/dev-clean.tsv features/dev-clean --layers 6 -1
    python tools/extract_features.py OUT_DIR/checkpoints/step_5000 audio_dir/ features/ --format pt

Rerunning the same command after an interruption skips the finished shards.
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
from w2v_knnvq.features.shards import ShardExtractionError, ShardSettings, extract_to_shards, list_utterances


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    parser.add_argument(
        "model", help="pretraining output directory, checkpoints/step_N directory, sdp_00.pt file, or asset card name"
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
    parser.add_argument("--format", choices=("npy", "pt"), default="npy", help="shard file format (default: npy)")
    parser.add_argument("--shard-size", type=int, default=256, help="utterances per shard (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass (default: 8)")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda:0")

    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    try:
        utterances = list_utterances(args.input)

        pretrained = load_pretrained_model(args.model, step=args.step, device=Device(args.device), dtype=torch.float32)

        extractor = SpeechFeatureExtractor(pretrained)

        settings = ShardSettings(
            model=pretrained.source,
            layers=extractor.resolve_layers(args.layers),
            codes=not args.no_codes,
            shard_format=args.format,
            shard_size=args.shard_size,
        )

        summary = extract_to_shards(extractor, utterances, args.output_dir, settings, batch_size=args.batch_size)
    except (AudioInputError, PretrainedModelError, ShardExtractionError, ManifestError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(
        f"{summary.num_shards} shards ({summary.num_written} written now) of {len(utterances)} utterances; index: {summary.index_file}",
        file=sys.stderr,
    )

    return 0


if __name__ == "__main__":
    sys.exit(main())
