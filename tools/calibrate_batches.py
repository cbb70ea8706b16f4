"""Calibrates ``dataset.max_num_elements`` of the pretraining recipe from a manifest.

fairseq2 bounds a batch by audio samples per rank (padding included), not by utterances, so a
preset's "N utterances per step" depends on the corpus' length distribution. This tool buckets
the manifest's utterances exactly as the recipe's reader does (cropped to ``max_audio_len``,
those below ``min_audio_len`` dropped, the recipe's own bucket sizes) and reports, per
candidate ``max_num_elements``, the mean number of utterances per optimizer step over one
epoch, then the value that comes closest to the target and the steps of one epoch::

    python tools/calibrate_batches.py manifests/librispeech/train.tsv --utterances-per-step 128 --ranks 4 \\
        [--max-audio-len 250000] [--min-audio-len 32000] [--grad-accumulation 1] [--epochs 128]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fairseq2.datasets import DatasetError
from fairseq2.device import CPU
from fairseq2.gang import FakeGang, Gangs

from w2v_knnvq.data.manifest import ManifestError
from w2v_knnvq.data.speech_dataset import SpeechManifestDataset, SpeechReadOptions
from w2v_knnvq.tool import tool_parser


@dataclass(frozen=True, kw_only=True)
class Calibration:
    max_num_elements: int

    batches_per_rank: float
    """Batches of one epoch on one rank (the mean over ranks)."""

    utterances_per_step: float


def rank_gangs(rank: int, ranks: int) -> Gangs:
    """Gangs of data-parallel rank ``rank`` of ``ranks``, for reading without processes."""
    gang = FakeGang(CPU, rank=rank, size=ranks)

    single = FakeGang(CPU)

    return Gangs(root=gang, dp=gang, rdp=gang, sdp=single, tp=single, pp=single)


def calibrate(
    manifest: Path,
    max_num_elements: int,
    *,
    max_audio_len: int,
    min_audio_len: int,
    ranks: int,
    grad_accumulation: int,
) -> Calibration:
    """One epoch of ``manifest`` as the pretraining reader batches it on each of ``ranks``
    ranks (its own sharding and bucketing; no audio is read)."""
    dataset = SpeechManifestDataset(manifest.parent)

    options = SpeechReadOptions(
        min_audio_len=min_audio_len, max_audio_len=max_audio_len, max_num_elements=max_num_elements
    )

    sizes = [dataset.batch_sizes(manifest.stem, rank_gangs(rank, ranks), options) for rank in range(ranks)]

    batches_per_rank = sum(len(rank_sizes) for rank_sizes in sizes) / ranks

    utterances = sum(sum(rank_sizes) for rank_sizes in sizes)

    steps = max(1.0, batches_per_rank / grad_accumulation)

    return Calibration(
        max_num_elements=max_num_elements, batches_per_rank=batches_per_rank, utterances_per_step=utterances / steps
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("manifest", type=Path, help="the training split's .tsv")
    parser.add_argument("--utterances-per-step", type=float, required=True, help="the target, e.g. 128")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel ranks")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="trainer.grad_accumulation.num_batches")
    parser.add_argument("--max-audio-len", type=int, default=250_000)
    parser.add_argument("--min-audio-len", type=int, default=32_000)
    parser.add_argument("--epochs", type=float, default=None, help="also print regime.num_steps for this many epochs")
    args = parser.parse_args(argv)

    def at(multiple: int) -> Calibration:
        return calibrate(
            args.manifest,
            multiple * args.max_audio_len,
            max_audio_len=args.max_audio_len,
            min_audio_len=args.min_audio_len,
            ranks=args.ranks,
            grad_accumulation=args.grad_accumulation,
        )

    # The recipe rounds max_num_elements down to a multiple of max_audio_len.
    try:
        results = [at(multiple) for multiple in range(1, 129)]
    except (ManifestError, DatasetError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 2

    best = min(results, key=lambda result: abs(result.utterances_per_step - args.utterances_per_step))

    print("| max_num_elements | utterances per step | steps per epoch |\n|---:|---:|---:|")

    for result in results:
        if abs(result.utterances_per_step - args.utterances_per_step) <= 0.25 * args.utterances_per_step:
            steps = result.batches_per_rank / args.grad_accumulation

            print(f"| {result.max_num_elements:,} | {result.utterances_per_step:.1f} | {steps:,.0f} |")

    steps_per_epoch = best.batches_per_rank / args.grad_accumulation

    print(
        f"\n{args.manifest}: {args.ranks} rank(s) x {args.grad_accumulation} accumulated "
        f"batch(es): dataset.max_num_elements={best.max_num_elements} gives {best.utterances_per_step:.1f} utterances "
        f"per step (target {args.utterances_per_step:g}), {steps_per_epoch:,.0f} steps per epoch."
    )

    if args.epochs is not None:
        print(f"regime.num_steps={math.ceil(args.epochs * steps_per_epoch)} for {args.epochs:g} epochs.")

    return 0


if __name__ == "__main__":
    sys.exit(main())
