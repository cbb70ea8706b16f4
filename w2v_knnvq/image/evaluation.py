"""Evaluation of a trained image autoencoder on an image set (Tables 1-2, Figure 2).

:func:`evaluate_image_vqae` reconstructs every image with hard quantization and gives an
:class:`ImageVqaeEvaluation`: codebook usage from the quantizer's
:class:`~w2v_knnvq.quantizer.CodebookUsage`, rMSE, FID and IS from
:mod:`w2v_knnvq.image.metrics`. Its JSON record (:meth:`ImageVqaeEvaluation.to_json`) turns
into a row of the tables of :mod:`w2v_knnvq.report` with
:func:`~w2v_knnvq.report.image_table_row`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from w2v_knnvq.image.config import ImageVqaeConfig
from w2v_knnvq.image.data import iterate_image_batches
from w2v_knnvq.image.metrics import (
    FrechetInceptionDistance,
    ImageFeatureFn,
    InceptionScore,
    RootMeanSquaredError,
)
from w2v_knnvq.image.model import ImageVqaeModel
from w2v_knnvq.quantizer import CodebookUsage, CodebookUsageReport, QuantizerConfig, QuantizerOutput
from w2v_knnvq.report import IMAGE, UsageTableRow, image_table_group, save_usage_histograms

ProgressFn = Callable[[int, int], None]
"""Called after each batch with the images done and the images in all."""


@dataclass(kw_only=True)
class ImageVqaeEvaluation:
    """The scores of one model on one image set; one row of Tables 1 and 2."""

    method: str

    knn_k: int | None
    """K of a KNN-regularized method; ``None`` for the others."""

    feature_map: str
    """The latent map, ``"{h}x{w}x{C}"``."""

    codebook_size: int

    rmse: float
    """On ``[-1, 1]`` pixels, the space the model reconstructs."""

    rmse_imagenet: float
    """On ImageNet-standardized pixels, the space Table 1's values (up to 1.35) suggest."""

    fid: float | None
    """``None`` if FID was skipped."""

    inception_score: float | None
    """``None`` if IS was skipped."""

    usage: CodebookUsageReport = field(repr=False)
    """Code usage of the set, one sample per image."""

    @property
    def num_images(self) -> int:
        return self.usage.per_sample_usage.size(0)

    @property
    def title(self) -> str:
        """The title of the Figure 2 histograms."""
        return f"{self.method}, {self.feature_map}, M={self.codebook_size}"

    def to_json(self) -> dict[str, object]:
        """The JSON record of the evaluation tool; the usage report as lists of floats."""
        percentiles = self.usage.perplexity_percentiles

        return {
            "method": self.method,
            "knn_k": self.knn_k,
            "feature_map": self.feature_map,
            "codebook_size": self.codebook_size,
            "num_images": self.num_images,
            "code_use": self.usage.usage.tolist(),
            "rmse": self.rmse,
            "rmse_imagenet": self.rmse_imagenet,
            "fid": self.fid,
            "inception_score": self.inception_score,
            "perplexity_percentiles": None if percentiles is None else percentiles.tolist(),
            "per_image_usage": self.usage.per_sample_usage.mean(dim=-1).tolist(),
            "code_popularity": self.usage.popularity.tolist(),
        }

    def table_row(self) -> UsageTableRow:
        """The evaluation's row of :func:`~w2v_knnvq.report.format_image_tables`."""
        return UsageTableRow.from_report(
            self.usage,
            method=self.method,
            knn_k=self.knn_k,
            group=image_table_group(self.feature_map, self.codebook_size),
            scores={
                "rmse": self.rmse,
                "rmse_imagenet": self.rmse_imagenet,
                "fid": self.fid,
                "inception_score": self.inception_score,
            },
        )

    def save_usage_plots(self, output_dir: Path) -> list[Path]:
        """Write Figure 2's histograms, ``per_image_usage.png`` and ``code_popularity.png``."""
        return save_usage_histograms(self.usage, output_dir, title=self.title, sample=IMAGE)


@torch.no_grad()
def evaluate_image_vqae(
    model: ImageVqaeModel,
    files: Sequence[Path],
    *,
    batch_size: int,
    device: torch.device,
    fid_features: ImageFeatureFn | None = None,
    class_probabilities: ImageFeatureFn | None = None,
    progress: ProgressFn | None = None,
) -> ImageVqaeEvaluation:
    """Reconstruct every image of ``files`` with hard quantization and score the result.

    rMSE is the square root of the mean squared pixel error over the whole set in the
    ``[-1, 1]`` pixel range; FID compares the reconstructions with the inputs, IS scores the
    reconstructions. Both are skipped when their network is not given.

    :raises ValueError: if ``files`` is empty.
    """
    config = model.config

    usage = CodebookUsage(config.quantizer.num_codebooks, config.quantizer.codebook_size)
    rmse = RootMeanSquaredError()
    rmse_imagenet = RootMeanSquaredError(imagenet_standardized=True)
    fid = None if fid_features is None else FrechetInceptionDistance(fid_features)
    inception = None if class_probabilities is None else InceptionScore(class_probabilities)

    for images in iterate_image_batches(files, size=config.image_size, batch_size=batch_size):
        images = images.to(device)

        output = model(images)

        rmse.update(output.reconstruction, images)
        rmse_imagenet.update(output.reconstruction, images)

        update_codebook_usage(usage, output.quantizer_output, config.quantizer)

        reconstruction = output.reconstruction.float().clamp(-1.0, 1.0)

        if fid is not None:
            fid.update(images, reconstruction)

        if inception is not None:
            inception.update(reconstruction)

        if progress is not None:
            progress(usage.num_samples, len(files))

    return _evaluation(
        config,
        usage.compute(),
        rmse=rmse.compute(),
        rmse_imagenet=rmse_imagenet.compute(),
        fid=None if fid is None else fid.compute(),
        inception_score=None if inception is None else inception.compute(),
    )


def update_codebook_usage(usage: CodebookUsage, output: QuantizerOutput, config: QuantizerConfig) -> None:
    """Add the codes of a batch of N images, one sample each, to ``usage``.

    :param output: The quantizer's output of ``(N, h, w)`` latent pixels: codes
        ``(N, h, w, G)`` and, for smoothed methods, individual perplexities ``(N, h, w, G)``.
    """
    codes = output.codes.reshape(output.codes.size(0), -1, config.num_codebooks)

    perplexity: Tensor | None = None

    if output.individual_perplexity is not None and config.spec.smoothed:
        perplexity = output.individual_perplexity.reshape(codes.shape)

    usage.update(codes, perplexity=perplexity)


def _evaluation(
    config: ImageVqaeConfig,
    usage: CodebookUsageReport,
    *,
    rmse: float,
    rmse_imagenet: float,
    fid: float | None,
    inception_score: float | None,
) -> ImageVqaeEvaluation:
    quantizer = config.quantizer

    return ImageVqaeEvaluation(
        method=quantizer.method,
        knn_k=quantizer.knn_k if quantizer.spec.regularizer == "knn" else None,
        feature_map=f"{config.latent_size}x{config.latent_size}x{config.latent_channels}",
        codebook_size=quantizer.codebook_size,
        rmse=rmse,
        rmse_imagenet=rmse_imagenet,
        fid=fid,
        inception_score=inception_score,
        usage=usage,
    )
