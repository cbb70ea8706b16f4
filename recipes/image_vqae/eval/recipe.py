"""Evaluates a trained image autoencoder on image folders (Tables 1-2, Figure 2).

Run through fairseq2's recipe CLI::

    python -m recipes.image_vqae.eval --config run.run_dir=RUN_DIR dataset.path=IMAGENET_ROOT -- EVAL_DIR

``RUN_DIR`` is the output folder of a training run (or its ``checkpoints`` folder);
``run.checkpoint`` picks ``last`` (the default), ``best`` or a step number. Each split of
``dataset.splits`` (default ``[val]``) is reconstructed with hard quantization and scored by
:func:`w2v_knnvq.image.evaluation.evaluate_image_vqae`: codebook usage, rMSE, FID (unless
``scores.fid=false``) and IS (with ``scores.inception_weights``). Written to ``EVAL_DIR``:
``evaluation.json`` (the run, the step, one record per split), the histograms
``per_image_usage.png`` and ``code_popularity.png`` (in ``EVAL_DIR/{split}/`` when there are
several splits) and ``summary.md`` in the layout of Tables 1 and 2.

Under ``torchrun`` each process reconstructs a part of every split and what the parts
accumulated is gathered before it is scored, so the figures are those of one process; rank 0
writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import final

import torch
from typing_extensions import override

from fairseq2.logging import log
from fairseq2.recipe import Recipe, RecipeContext
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.error import RecipeError
from fairseq2.task import Task

from w2v_knnvq.image import IMAGE_VQAE_FAMILY, ImageVqaeModel, get_image_vqae_model_hub
from w2v_knnvq.image.data import list_image_files
from w2v_knnvq.image.evaluation import ImageVqaeEvaluation, evaluate_image_vqae
from w2v_knnvq.image.metrics import ImageFeatureFn, make_fid_features, make_inception_probabilities
from w2v_knnvq.report import format_image_tables
from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, load_run_model

from ...common import evaluation_figure_dir, find_evaluated_checkpoint, lock_output_dir, write_evaluation
from .config import ImageVqaeEvalRecipeConfig


@final
class ImageVqaeEvalRecipe(Recipe):
    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(ImageVqaeEvalRecipeConfig)

        lock_output_dir(context)

        run = find_evaluated_checkpoint(config.run)

        if config.dataset.path is None:
            raise RecipeError("`dataset.path` must point to an image folder, but is not set.")

        files = {}

        for split in config.dataset.splits:
            try:
                files[split] = list_image_files(config.dataset.path.expanduser() / split)[: config.dataset.max_images]
            except FileNotFoundError as ex:
                raise RecipeError(f"`dataset.path`, `dataset.splits`: {ex}") from None

        try:
            model = load_run_model(run, get_image_vqae_model_hub(), IMAGE_VQAE_FAMILY, device=context.device)
        except RunCheckpointError as ex:
            raise RecipeError(f"`run.run_dir`: {ex}") from None

        log.info("Evaluating the checkpoint of step {} in {} ({}).", run.step, run.checkpoints_dir, model.config.quantizer.method)  # fmt: skip

        return ImageEvaluationTask(context, config, run, model, files)

    @property
    @override
    def config_kls(self) -> type[object]:
        return ImageVqaeEvalRecipeConfig


@final
class ImageEvaluationTask(Task):
    """Evaluates every split with all data-parallel ranks; rank 0 writes the files."""

    def __init__(
        self,
        context: RecipeContext,
        config: ImageVqaeEvalRecipeConfig,
        run: RunCheckpoint,
        model: ImageVqaeModel,
        files: dict[str, list[Path]],
    ) -> None:
        self._context = context
        self._config = config
        self._run = run
        self._model = model
        self._files = files
        self._step_nr = 0

    @override
    def run(self) -> None:
        gangs = self._context.gangs

        self._evaluate()

        gangs.root.barrier()

        gangs.close()

    def _evaluate(self) -> None:
        device = self._context.device

        gangs = self._context.gangs

        scores = self._config.scores

        fid_features = make_fid_features(device) if scores.fid else None

        class_probabilities = _class_probabilities(scores.inception_weights, device)

        output_dir = self._context.output_dir

        splits = list(self._files)

        evaluations: dict[str, ImageVqaeEvaluation] = {}

        for split, files in self._files.items():
            log.info("Evaluating {} ({} images).", split, len(files))

            start = time.monotonic()

            evaluations[split] = evaluate_image_vqae(
                self._model,
                files,
                batch_size=self._config.dataset.batch_size,
                device=device,
                fid_features=fid_features,
                class_probabilities=class_probabilities,
                gang=gangs.dp,
            )

            log.info("Evaluated {} in {:.0f} s.", split, time.monotonic() - start)

            self._step_nr += 1

        if gangs.root.rank != 0:
            return

        for split, evaluation in evaluations.items():
            figure_dir = evaluation_figure_dir(output_dir, split, splits)

            figure_dir.mkdir(parents=True, exist_ok=True)

            evaluation.save_usage_plots(figure_dir)

        records = [{"split": split, **evaluation.to_json()} for split, evaluation in evaluations.items()]

        summary = format_image_tables([evaluation.table_row() for evaluation in evaluations.values()])

        write_evaluation(output_dir, self._run, records, summary)

        for line in summary.splitlines():
            log.info(line)

        log.info("Wrote the evaluation of {} to {}.", ", ".join(splits), output_dir)

    @override
    def request_stop(self) -> None:
        pass

    @property
    @override
    def step_nr(self) -> int:
        return self._step_nr

    @override
    def close(self) -> None:
        pass


def _class_probabilities(weights_file: Path | None, device: torch.device) -> ImageFeatureFn | None:
    if weights_file is not None:
        return make_inception_probabilities(weights_file, device)

    log.info(
        "Inception Score skipped; it needs the ImageNet classifier of torchvision's Inception-v3, which no offline "
        "package ships. Set `scores.inception_weights` to its weights file (and install torchvision) to compute it."
    )

    return None


def main() -> None:
    """The console entry point of the evaluation."""
    run_recipe_cli(ImageVqaeEvalRecipe())
