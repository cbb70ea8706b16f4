"""The image autoencoder training recipe on fairseq2's recipe API."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from pathlib import Path

import torch
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.error import InternalError
from fairseq2.evaluator import EvalUnit
from fairseq2.logging import log
from fairseq2.metrics import Mean, MetricBag, Sum, format_as_float
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit

from w2v_knnvq.image import ImageVqaeModel, ImageVqaeOutput
from w2v_knnvq.image.data import list_image_files
from w2v_knnvq.image.reader import ImageBatch, ImageFolderReader
from w2v_knnvq.quantizer import METHODS

from ..common import check_resume, check_warmup, create_trainer, register_checkpoint_save_errors
from .config import ImageVqaeRecipeConfig

# The perplexities are means over the G codebooks; "Code Perplexity" is reserved for
# fairseq2's meaning, their sum (the SSL recipe's).
_METRIC_DESCRIPTORS = (
    ("reconstruction_loss", "Reconstruction Loss (MSE)", 91),
    ("quantizer_loss", "Quantizer Loss", 92),
    ("rmse", "rMSE", 93),
    ("hard_perplexity", "Hard Perplexity (Codebook Mean)", 94),
    ("soft_perplexity", "Soft Perplexity (Codebook Mean)", 95),
    ("temperature", "Softmax Temperature", 96),
)


def _add_metrics(metric_bag: MetricBag, smoothed: bool) -> None:
    for name in ("loss", "reconstruction_loss", "quantizer_loss", "hard_perplexity"):
        metric_bag.add(name, Mean())

    # Hard quantizers have no softmax; registering these would log a constant 0.
    if smoothed:
        metric_bag.add("soft_perplexity", Mean())
        metric_bag.add("temperature", Mean())

    metric_bag.add("num_examples", Sum())


@torch.inference_mode()
def _update_metrics(metric_bag: MetricBag, output: ImageVqaeOutput, batch_size: int) -> None:
    quantizer_output = output.quantizer_output

    def update(name: str, value: torch.Tensor) -> None:
        metric_bag.get(name, Mean).update(value.detach().float().mean(), weight=batch_size)

    update("loss", output.loss)
    update("reconstruction_loss", output.reconstruction_loss)
    update("quantizer_loss", quantizer_output.loss)
    update("hard_perplexity", quantizer_output.hard_perplexity)

    if quantizer_output.soft_perplexity is not None:
        update("soft_perplexity", quantizer_output.soft_perplexity)

    if quantizer_output.temperature is not None:
        update("temperature", quantizer_output.temperature)

    metric_bag.get("num_examples", Sum).update(torch.tensor(batch_size))


def _add_rmse(values: MutableMapping[str, object]) -> None:
    mse = values.get("reconstruction_loss")
    if isinstance(mse, (torch.Tensor, float)):
        values["rmse"] = math.sqrt(float(mse))


class ImageVqaeTrainUnit(TrainUnit[ImageBatch]):
    """Minimizes the L2 reconstruction loss plus the quantizer's own loss.

    ``smoothed`` says whether the quantizer method smooths the onehot vector, and so reports
    the soft code perplexity and the softmax temperature.
    """

    def __init__(self, model: Module, smoothed: bool) -> None:
        self._model = model
        self._smoothed = smoothed

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        _add_metrics(metric_bag, self._smoothed)

    @override
    def process_batch(self, batch: ImageBatch, metric_bag: MetricBag) -> tuple[torch.Tensor, int]:
        output: ImageVqaeOutput = self._model(batch.images)

        _update_metrics(metric_bag, output, batch.batch_size)

        # The trainer divides gradients by the summed number of targets (images) over ranks;
        # `loss_times` keeps a global KNN's gradient right under that normalization.
        loss = output.reconstruction_loss * batch.batch_size + output.quantizer_output.loss_times(batch.batch_size)

        return loss, batch.batch_size

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        _add_rmse(values)


class ImageVqaeEvalUnit(EvalUnit[ImageBatch]):
    """Reports the training losses and rMSE with hard (argmax) quantization; ``smoothed`` as in
    :class:`ImageVqaeTrainUnit`."""

    def __init__(self, model: Module, smoothed: bool) -> None:
        self._model = model
        self._smoothed = smoothed

    @property
    @override
    def name(self) -> str | None:
        return "valid"

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        _add_metrics(metric_bag, self._smoothed)

    @override
    def process_batch(self, batch: ImageBatch, metric_bag: MetricBag) -> None:
        output: ImageVqaeOutput = self._model(batch.images)

        _update_metrics(metric_bag, output, batch.batch_size)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        _add_rmse(values)


def _create_reader(
    context: RecipeContext, config: ImageVqaeRecipeConfig, root: Path, split: str, *, image_size: int, shuffle: bool
) -> ImageFolderReader:
    """Reads the images of ``root/split/CLASS/*.JPEG`` as ``(N, 3, image_size, image_size)`` batches."""
    files = list_image_files(root / split)

    log.info("Image split {}: {} images, cropped to {}x{}.", split, len(files), image_size, image_size)

    return ImageFolderReader(
        files,
        context.gangs,
        image_size=image_size,
        batch_size=config.dataset.batch_size,
        shuffle=shuffle,
        seed=config.common.seed,
        num_workers=config.dataset.num_workers,
        num_accumulate=config.trainer.grad_accumulation.num_batches,
    )


class ImageVqaeRecipe(Recipe):
    """Trains an ``image_vqae`` model on an ImageNet-layout image folder.

    The ``image_vqae`` family itself comes from the w2v-knnvq fairseq2 extension.
    """

    @override
    def register(self, container: DependencyContainer) -> None:
        for name, display_name, priority in _METRIC_DESCRIPTORS:
            container.collection.register_instance(
                MetricDescriptor,
                MetricDescriptor(name, display_name, priority, format_as_float),
            )

        register_checkpoint_save_errors(container)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(ImageVqaeRecipeConfig)

        check_resume(context)

        model = context.get_model_as(ImageVqaeModel)

        # `ImageVqaeRecipeConfig.structure` settled these when fairseq2 read the configuration.
        log.info(
            "Quantizer method {}: AdamW peak learning rate {:g}, weight decay {:g}.",
            model.config.quantizer.method,
            config.peak_lr,
            config.weight_decay,
        )

        dataset_path = self._check_config(config)

        def make_reader(split: str, shuffle: bool) -> ImageFolderReader:
            return _create_reader(
                context, config, dataset_path, split, image_size=model.config.image_size, shuffle=shuffle
            )

        data_parallel_model = context.get_data_parallel_model()

        smoothed = METHODS[model.config.quantizer.method].smoothed

        train_unit = ImageVqaeTrainUnit(data_parallel_model, smoothed)

        if config.dataset.valid_split is None:
            return context.create_trainer(train_unit, make_reader(config.dataset.train_split, True))

        valid_reader = make_reader(config.dataset.valid_split, False)

        return create_trainer(
            context,
            train_unit,
            make_reader(config.dataset.train_split, True),
            [ImageVqaeEvalUnit(data_parallel_model, smoothed)],
            [valid_reader],
        )

    @staticmethod
    def _check_config(config: ImageVqaeRecipeConfig) -> Path:
        """:returns: ``dataset.path`` (validated as set).

        :raises RecipeError: if the warmup is too long.
        """
        path = config.dataset.path
        if path is None:
            raise InternalError("`dataset.path` is `None` after validation.")

        check_warmup(config.lr_scheduler.config, config.regime.num_steps)

        return path

    @property
    @override
    def config_kls(self) -> type[object]:
        return ImageVqaeRecipeConfig


def main() -> None:
    """Run the recipe's command line: ``w2v-knnvq-image-vqae --config-file FILE OUT_DIR``."""
    run_recipe_cli(ImageVqaeRecipe())
