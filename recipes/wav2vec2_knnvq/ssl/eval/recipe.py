"""Evaluates a pretraining checkpoint on any manifest splits.

Per split it reports what validation reports (contrastive loss and accuracy on crops, codebook
usage over every frame of the whole split), the individual-perplexity percentiles of Table 2
(75th, 90th, 99th, max), the mean per-utterance usage, and draws Figure 2's histograms. Run
through fairseq2's recipe CLI, on one process or several (``torchrun``)::

    python -m recipes.wav2vec2_knnvq.ssl.eval --config run.run_dir=RUN_DIR \\
        dataset.config_overrides.manifest_dir=MANIFESTS "dataset.splits=[dev-clean,test-clean]" -- EVAL_DIR

``RUN_DIR`` is a pretraining output directory (or its ``checkpoints`` directory);
``run.checkpoint`` picks ``last`` (the default), ``best`` or a step number. The crop lengths,
audio normalization and loss weights are the run's. Written to ``EVAL_DIR`` by rank 0:
``evaluation.json`` (the run, the step, one record per split), the histograms
``per_utterance_usage.png`` and ``code_popularity.png`` (in ``EVAL_DIR/{split}/`` when there
are several splits) and ``summary.md`` with the Table 3 and Table 2 layouts of all splits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.datasets import SequenceBatch
from fairseq2.device import Device
from fairseq2.evaluator import EvalUnit
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task

from w2v_knnvq.data.speech_dataset import SpeechManifestDataset
from w2v_knnvq.gather import gather_objects
from w2v_knnvq.quantizer import CodebookUsage, CodebookUsageReport
from w2v_knnvq.report import UTTERANCE, UsageTableRow, format_codebook_table, save_usage_histograms
from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, load_run_model_of_families
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY, get_wav2vec2_knnvq_model_hub
from w2v_knnvq.wav2vec2.frames import FrameCodes

from ....common import (
    EvaluationTask,
    create_run_evaluator,
    evaluation_figure_dir,
    find_evaluated_checkpoint,
    lock_output_dir,
    register_bad_audio_handling,
    write_evaluation,
)
from ..criterion import CodebookShape, SslCriterion, SslLossSection, adapt_pretraining_model
from ..dataset import SslDatasetSection, create_valid_reader, register_speech_manifest_dataset
from ..metrics import register_ssl_metric_descriptors
from ..recipe import SslEvalUnit
from .config import SslEvalRecipeConfig


@dataclass(kw_only=True)
class SplitEvaluation:
    """The figures of one split."""

    split: str

    metrics: dict[str, Any]
    """The validation metrics (loss, accuracy, usage, ...) under their display names."""

    report: CodebookUsageReport
    """Usage, per-utterance usage, popularity and perplexity percentiles over every frame."""

    def record(self) -> dict[str, Any]:
        """The split's record in ``evaluation.json``."""
        percentiles = self.report.perplexity_percentiles

        return {
            "split": self.split,
            **self.metrics,
            "num_utterances": self.report.per_sample_usage.size(0),
            "codebook_usage": self.report.usage.tolist(),
            "mean_utterance_codebook_usage": self.report.per_sample_usage.mean(dim=0).tolist(),
            "perplexity_percentiles": None if percentiles is None else percentiles.tolist(),
        }


@final
class SslEvalRecipe(Recipe):
    @override
    def register(self, container: DependencyContainer) -> None:
        register_speech_manifest_dataset(container)

        register_ssl_metric_descriptors(container)

        register_bad_audio_handling(container)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(SslEvalRecipeConfig)

        lock_output_dir(context)

        _quiet_empty_mean_warning()

        run = find_evaluated_checkpoint(config.run)

        log.info("Evaluating the checkpoint of step {} in {}.", run.step, run.checkpoints_dir)

        try:
            model = load_pretraining_model(run, context.device)
        except RunCheckpointError as ex:
            raise RecipeError(f"`run.run_dir`: {ex}") from None

        dataset = context.get_dataset_as(SpeechManifestDataset)

        method, knn_k = run_method(run)

        adapter = adapt_pretraining_model(model)

        criterion = SslCriterion(model, adapter, _loss_section(run))

        splits = config.dataset.splits

        evaluations: dict[str, SplitEvaluation] = {}

        units: list[EvalUnit[SequenceBatch]] = []
        readers = []

        for split in splits:
            section = _split_section(run, split, config.dataset.max_num_elements)

            unit = SslEvalUnit(
                criterion,
                adapter.base_model,
                adapter.codebook_shape,
                min_audio_len=section.min_audio_len,
                max_audio_len=section.max_audio_len,
                frame_sink=(recorder := FrameRecorder()),
            )

            units.append(SplitUnit(split, unit, recorder, adapter.codebook_shape, context.gangs, evaluations))

            readers.append(create_valid_reader(dataset, section, context.gangs, seed=config.common.seed))

        evaluator = create_run_evaluator(context, model, units, readers)

        def write() -> None:
            for split, evaluation in evaluations.items():
                if config.output.histograms:
                    figure_dir = evaluation_figure_dir(context.output_dir, split, splits)

                    figure_dir.mkdir(parents=True, exist_ok=True)

                    save_usage_histograms(evaluation.report, figure_dir, title=f"{method}, {split}", sample=UTTERANCE)

            records = [{"method": method, "knn_k": knn_k, **evaluations[split].record()} for split in splits]

            rows = [evaluation_row(evaluations[split], method=method, knn_k=knn_k, group=split) for split in splits]

            summary = format_codebook_table(rows)

            write_evaluation(context.output_dir, run, records, summary)

            for line in summary.splitlines():
                log.info(line)

            log.info("Wrote the evaluation of {} to {}.", ", ".join(splits), context.output_dir)

        return EvaluationTask(evaluator, context.gangs, write)

    @property
    @override
    def config_kls(self) -> type[object]:
        return SslEvalRecipeConfig


@final
class FrameRecorder:
    """Keeps the codes of every frame that one rank quantizes, to count them over the
    whole split once the ranks are done (:meth:`gather`)."""

    def __init__(self) -> None:
        self._batches: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def __call__(self, frames: FrameCodes) -> None:
        perplexity = frames.individual_perplexity

        self._batches.append(
            (frames.codes.cpu(), frames.padding_mask.cpu(), None if perplexity is None else perplexity.float().cpu())
        )

    def gather(self, gangs: Gangs, shape: CodebookShape) -> CodebookUsage:
        """The usage of the frames of every data-parallel rank (the same whatever the
        number of ranks: every figure is a count, a mean or a percentile over all
        utterances or frames). Every rank must call it."""
        usage = CodebookUsage(shape.num_codebooks, shape.codebook_size)

        for batches in gather_objects(gangs.dp, self._batches):
            for codes, padding_mask, perplexity in batches:
                usage.update(codes, padding_mask, perplexity=perplexity)

        self._batches = []

        return usage


@final
class SplitUnit(EvalUnit[SequenceBatch]):
    """:class:`~recipes.wav2vec2_knnvq.ssl.recipe.SslEvalUnit` on one split, which also
    keeps the split's :class:`SplitEvaluation` (on rank 0)."""

    def __init__(
        self,
        split: str,
        unit: SslEvalUnit,
        recorder: FrameRecorder,
        shape: CodebookShape,
        gangs: Gangs,
        evaluations: MutableMapping[str, SplitEvaluation],
    ) -> None:
        self._split = split
        self._unit = unit
        self._recorder = recorder
        self._shape = shape
        self._gangs = gangs
        self._evaluations = evaluations
        self._report: CodebookUsageReport | None = None

    @property
    @override
    def name(self) -> str:
        return self._split

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        self._unit.prepare_metric_bag(metric_bag)

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> None:
        self._unit.process_batch(batch, metric_bag)

    @override
    def finalize(self, metric_bag: MetricBag) -> None:
        usage = self._recorder.gather(self._gangs, self._shape)

        # Every rank holds the frames of all ranks now, so all of them stop on an empty split.
        try:
            self._report = usage.compute()
        except ValueError:
            raise RecipeError(
                f"The split `{self._split}` has no utterance long enough for the model's CNN; give another split."
            ) from None

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        self._unit.process_metric_values(values)

        if self._report is None:
            raise RecipeError(f"The codebook usage of `{self._split}` was not computed.")

        self._evaluations[self._split] = SplitEvaluation(split=self._split, metrics=_plain(values), report=self._report)


class _ZeroMeanFilter(logging.Filter):
    """torcheval's ``Mean`` takes a sum of exactly 0 for "no update" and warns; a collapsed
    codebook gives a true contrastive loss of 0 (every distractor equals its target)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No calls to update() have been made" not in record.getMessage()


def _quiet_empty_mean_warning() -> None:
    """Drops torcheval's "no update" warning for the evaluation's process (see :class:`_ZeroMeanFilter`)."""
    root = logging.getLogger()

    if not any(isinstance(f, _ZeroMeanFilter) for f in root.filters):
        root.addFilter(_ZeroMeanFilter())


def load_pretraining_model(run: RunCheckpoint, device: Device) -> Module:
    """Loads the model of ``run`` (``wav2vec2_knnvq`` or fairseq2's ``wav2vec2``) in eval
    mode, with the restricted loaders of :mod:`w2v_knnvq.runs`."""
    return load_run_model_of_families(run, (WAV2VEC2_KNNVQ_FAMILY, WAV2VEC2_FAMILY), device=device)


def run_method(run: RunCheckpoint) -> tuple[str, int | None]:
    """The quantizer method and (for KNN methods) K of a run, from its model card."""
    if run.family == WAV2VEC2_FAMILY:
        return "wav2vec2-gumbel", None

    config = get_wav2vec2_knnvq_model_hub().get_model_config(run.card)

    quantizer = config.quantizer

    return quantizer.method, quantizer.knn_k if quantizer.spec.regularizer == "knn" else None


def evaluation_row(evaluation: SplitEvaluation, *, method: str, knn_k: int | None, group: str) -> UsageTableRow:
    """The Table 3 row of ``evaluation``, in the column group ``group``."""
    return UsageTableRow.from_report(
        evaluation.report,
        method=method,
        knn_k=knn_k,
        group=group,
        scores={"loss": evaluation.metrics.get("loss"), "accuracy": evaluation.metrics.get("accuracy")},
    )


def _split_section(run: RunCheckpoint, split: str, max_num_elements: int) -> SslDatasetSection:
    """The pretraining recipe's dataset section for validating ``split`` with the run's
    crop lengths and audio normalization."""
    section = SslDatasetSection(valid_split=split, max_num_elements=max_num_elements)

    for name in ("min_audio_len", "max_audio_len", "normalize_audio"):
        value = run.recipe_option("dataset", name)

        if value is not None:
            setattr(section, name, value)

    section.max_num_elements = max(section.max_num_elements, section.max_audio_len)

    return section


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


def main() -> None:
    """The console entry point of the evaluation."""
    run_recipe_cli(SslEvalRecipe())
