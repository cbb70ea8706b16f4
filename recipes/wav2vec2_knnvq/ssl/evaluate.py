"""Evaluates a pretraining checkpoint on any manifest splits.

Per split it reports what validation reports (contrastive loss and accuracy on crops, codebook
usage over every frame of the whole split), the individual-perplexity percentiles of Table 2
(75th, 90th, 99th, max), the mean per-utterance usage, and writes Figure 2's histograms::

    python -m recipes.wav2vec2_knnvq.ssl.evaluate RUN_DIR --manifest-dir MANIFESTS \\
        --splits dev-clean dev-other test-clean --output-dir EVAL_DIR [--checkpoint last|STEP]

``RUN_DIR`` is a pretraining output directory (or its ``checkpoints`` directory, or a
``step_N`` directory in it). Written to ``EVAL_DIR/{split}/``: ``evaluation.json`` and the two
histograms ``per_utterance_usage.png`` and ``code_popularity.png``; ``EVAL_DIR/summary.md``
holds the tables of all splits.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import Module

from fairseq2 import init_fairseq2
from fairseq2.datasets import DatasetError
from fairseq2.device import Device
from fairseq2.gang import create_fake_gangs
from fairseq2.metrics import MetricBag, sync_and_compute_metrics
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY, get_wav2vec2_model_hub

from w2v_knnvq.data.speech_dataset import SpeechManifestDataset
from w2v_knnvq.quantizer import CodebookUsage, CodebookUsageReport
from w2v_knnvq.report import UTTERANCE, UsageTableRow, format_codebook_table, save_usage_histograms
from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, find_run_checkpoint, load_run_model
from w2v_knnvq.tool import tool_parser
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY, get_wav2vec2_knnvq_model_hub
from w2v_knnvq.wav2vec2.frames import FrameCodes

from .criterion import SslCriterion, SslLossSection, adapt_pretraining_model
from .dataset import SslDatasetSection, create_valid_reader
from .metrics import publish_per_codebook
from .recipe import SslEvalUnit


@dataclass(kw_only=True)
class SplitEvaluation:
    """The figures of one split."""

    split: str

    metrics: dict[str, Any]
    """The validation metrics (loss, accuracy, usage, ...) under their display names."""

    report: CodebookUsageReport
    """Usage, per-utterance usage, popularity and perplexity percentiles over every frame."""

    def record(self) -> dict[str, Any]:
        """The JSON record of ``evaluation.json``."""
        percentiles = self.report.perplexity_percentiles

        return {
            "split": self.split,
            **self.metrics,
            "num_utterances": self.report.per_sample_usage.size(0),
            "codebook_usage": self.report.usage.tolist(),
            "mean_utterance_codebook_usage": self.report.per_sample_usage.mean(dim=0).tolist(),
            "perplexity_percentiles": None if percentiles is None else percentiles.tolist(),
        }


class _ZeroMeanFilter(logging.Filter):
    """torcheval's ``Mean`` takes a sum of exactly 0 for "no update" and warns; a collapsed
    codebook gives a true contrastive loss of 0 (every distractor equals its target)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No calls to update() have been made" not in record.getMessage()


logging.getLogger().addFilter(_ZeroMeanFilter())


def load_pretraining_model(run: RunCheckpoint, device: Device) -> Module:
    """Loads the model of ``run`` (``wav2vec2_knnvq`` or fairseq2's ``wav2vec2``) in eval mode."""
    if run.family == WAV2VEC2_FAMILY:
        return load_run_model(run, get_wav2vec2_model_hub(), WAV2VEC2_FAMILY, device=device)

    return load_run_model(run, get_wav2vec2_knnvq_model_hub(), WAV2VEC2_KNNVQ_FAMILY, device=device)


def evaluate_split(
    model: Module, run: RunCheckpoint, dataset: SpeechManifestDataset, split: str, *, max_num_elements: int
) -> SplitEvaluation:
    """Runs the recipe's validation over the whole ``split`` with the run's crop lengths."""
    adapter = adapt_pretraining_model(model)

    shape = adapter.codebook_shape

    section = SslDatasetSection(valid_split=split, max_num_elements=max_num_elements)

    for name in ("min_audio_len", "max_audio_len", "normalize_audio"):
        value = run.recipe_option("dataset", name)

        if value is not None:
            setattr(section, name, value)

    section.max_num_elements = max(section.max_num_elements, section.max_audio_len)

    usage = CodebookUsage(shape.num_codebooks, shape.codebook_size)

    criterion = SslCriterion(model, adapter, _loss_section(run))

    def count(frames: FrameCodes) -> None:
        usage.update(frames.codes, frames.padding_mask, perplexity=frames.individual_perplexity)

    unit = SslEvalUnit(
        criterion,
        adapter.base_model,
        shape,
        min_audio_len=section.min_audio_len,
        max_audio_len=section.max_audio_len,
        frame_sink=count,
    )

    gangs = create_fake_gangs(next(model.parameters()).device)

    metric_bag = MetricBag(device=gangs.root.device)

    unit.prepare_metric_bag(metric_bag)

    model.eval()

    with torch.inference_mode():
        for batches in create_valid_reader(dataset, section, gangs, seed=2):
            for batch in batches:
                batch.to(gangs.root.device)

                unit.process_batch(batch, metric_bag)

    values = sync_and_compute_metrics(metric_bag, gangs.root) or {}

    publish_per_codebook(values)

    return SplitEvaluation(split=split, metrics=_plain(values), report=usage.compute())


def _loss_section(run: RunCheckpoint) -> SslLossSection:
    section = SslLossSection()

    for name in ("diversity_loss_weight", "feature_penalty_weight"):
        value = run.recipe_option("loss", name)

        if isinstance(value, (int, float)):
            setattr(section, name, float(value))

    return section


def _plain(values: Mapping[str, object]) -> dict[str, Any]:
    """Metric values as JSON values."""
    plain: dict[str, Any] = {}

    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            plain[name] = value.item() if value.numel() == 1 else value.tolist()
        elif isinstance(value, (int, float, list)):
            plain[name] = value

    return plain


def evaluation_row(evaluation: SplitEvaluation, *, method: str, knn_k: int | None, group: str) -> UsageTableRow:
    return UsageTableRow.from_report(
        evaluation.report,
        method=method,
        knn_k=knn_k,
        group=group,
        scores={"loss": evaluation.metrics.get("loss"), "accuracy": evaluation.metrics.get("accuracy")},
    )


def run_method(run: RunCheckpoint) -> tuple[str, int | None]:
    """The quantizer method and (for KNN methods) K of a run, from its model card."""
    if run.family == WAV2VEC2_FAMILY:
        return "wav2vec2-gumbel", None

    config = get_wav2vec2_knnvq_model_hub().get_model_config(run.card)

    quantizer = config.quantizer

    return quantizer.method, quantizer.knn_k if quantizer.spec.regularizer == "knn" else None


def evaluate_run(
    run: RunCheckpoint,
    manifest_dir: Path,
    splits: Sequence[str],
    output_dir: Path,
    *,
    device: Device,
    max_num_elements: int = 3_200_000,
    histograms: bool = True,
) -> dict[str, SplitEvaluation]:
    """Evaluates ``run`` on every split and writes ``output_dir/{split}/`` and ``summary.md``."""
    model = load_pretraining_model(run, device)

    dataset = SpeechManifestDataset(manifest_dir)

    method, knn_k = run_method(run)

    evaluations: MutableMapping[str, SplitEvaluation] = {}

    for split in splits:
        evaluation = evaluate_split(model, run, dataset, split, max_num_elements=max_num_elements)

        split_dir = output_dir / split

        split_dir.mkdir(parents=True, exist_ok=True)

        record = {"checkpoint": str(run.model_dir), "method": method, "knn_k": knn_k, **evaluation.record()}

        (split_dir / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        if histograms:
            save_usage_histograms(evaluation.report, split_dir, title=f"{method}, {split}", sample=UTTERANCE)

        evaluations[split] = evaluation

    rows = [
        evaluation_row(evaluation, method=method, knn_k=knn_k, group=split) for split, evaluation in evaluations.items()
    ]

    (output_dir / "summary.md").write_text(format_codebook_table(rows) + "\n", encoding="utf-8")

    return dict(evaluations)


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__, prog="python -m recipes.wav2vec2_knnvq.ssl.evaluate")
    parser.add_argument("run_dir", type=Path, help="pretraining output directory, or a checkpoint in it")
    parser.add_argument("--manifest-dir", type=Path, required=True, help="folder with {split}.tsv")
    parser.add_argument("--splits", nargs="+", required=True, help="manifest names, e.g. dev-clean test-clean")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, help="'last' (default) or a step number")
    parser.add_argument("--max-num-elements", type=int, default=3_200_000, help="audio samples per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-histograms", action="store_true", help="skip the Figure 2 PNGs (no matplotlib)")
    args = parser.parse_args(argv)

    init_fairseq2()

    try:
        run = find_run_checkpoint(args.run_dir, checkpoint=args.checkpoint)

        evaluations = evaluate_run(
            run,
            args.manifest_dir.expanduser().resolve(),
            args.splits,
            args.output_dir,
            device=Device(args.device),
            max_num_elements=args.max_num_elements,
            histograms=not args.no_histograms,
        )
    except (RunCheckpointError, DatasetError, RuntimeError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print((args.output_dir / "summary.md").read_text(encoding="utf-8"))

    for split, evaluation in evaluations.items():
        print(json.dumps({"split": split, **evaluation.metrics}))

    return 0


if __name__ == "__main__":
    sys.exit(main())
