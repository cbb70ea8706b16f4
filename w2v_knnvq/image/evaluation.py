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

import numpy as np
import torch
from torch import Tensor

from fairseq2.gang import Gang

from w2v_knnvq.gather import gather_objects
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
"""Called after each batch with the images done and the images to do (of this process)."""


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
        """The split's record in an image evaluation's ``evaluation.json``; the usage
        report as lists of floats."""
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


@dataclass
class _PartFigures:
    """What one process accumulated over its part of the image set."""

    codes: list[tuple[Tensor, Tensor | None]]
    """Per batch, the codes ``(N, L, G)`` and individual perplexities ``(N, L, G)`` (or ``None``)."""

    rmse: tuple[float, int]

    rmse_imagenet: tuple[float, int]

    fid: tuple[list[np.ndarray], list[np.ndarray]] | None

    inception: list[np.ndarray] | None


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
    gang: Gang | None = None,
) -> ImageVqaeEvaluation:
    """Reconstruct every image of ``files`` with hard quantization and score the result.

    rMSE is the square root of the mean squared pixel error over the whole set in the
    ``[-1, 1]`` pixel range; FID compares the reconstructions with the inputs, IS scores the
    reconstructions. Both are skipped when their network is not given.

    :param progress: Called with the images done and the images of this process's part.
    :param gang: Evaluate with all processes of ``gang``: each reconstructs a contiguous part
        of ``files``, and what the parts accumulated is gathered in file order, so every
        process returns the figures of the whole set, those of one process. Every process of
        ``gang`` must call it.

    :raises ValueError: if ``files`` is empty.
    """
    config = model.config

    rank, size = (0, 1) if gang is None else (gang.rank, gang.size)

    part = files[len(files) * rank // size : len(files) * (rank + 1) // size]

    codes: list[tuple[Tensor, Tensor | None]] = []
    rmse = RootMeanSquaredError()
    rmse_imagenet = RootMeanSquaredError(imagenet_standardized=True)
    fid = None if fid_features is None else FrechetInceptionDistance(fid_features)
    inception = None if class_probabilities is None else InceptionScore(class_probabilities)

    num_done = 0

    for images in iterate_image_batches(part, size=config.image_size, batch_size=batch_size):
        images = images.to(device)

        output = model(images)

        rmse.update(output.reconstruction, images)
        rmse_imagenet.update(output.reconstruction, images)

        codes.append(usage_inputs(output.quantizer_output, config.quantizer))

        reconstruction = output.reconstruction.float().clamp(-1.0, 1.0)

        if fid is not None:
            fid.update(images, reconstruction)

        if inception is not None:
            inception.update(reconstruction)

        num_done += images.size(0)

        if progress is not None:
            progress(num_done, len(part))

    figures = _PartFigures(
        codes=codes,
        rmse=rmse.state,
        rmse_imagenet=rmse_imagenet.state,
        fid=None if fid is None else fid.state,
        inception=None if inception is None else inception.state,
    )

    parts = [figures] if gang is None else gather_objects(gang, figures)

    return _evaluation(config, parts, fid_features=fid_features, class_probabilities=class_probabilities)


def usage_inputs(output: QuantizerOutput, config: QuantizerConfig) -> tuple[Tensor, Tensor | None]:
    """The codes of a batch of N images, one sample each, as :class:`CodebookUsage` takes them.

    :param output: The quantizer's output of ``(N, h, w)`` latent pixels: codes
        ``(N, h, w, G)`` and, for smoothed methods, individual perplexities ``(N, h, w, G)``.
    :returns: The codes ``(N, h * w, G)`` and the perplexities in the same shape (``None``
        for the other methods), on the CPU.
    """
    codes = output.codes.reshape(output.codes.size(0), -1, config.num_codebooks)

    perplexity: Tensor | None = None

    if output.individual_perplexity is not None and config.spec.smoothed:
        perplexity = output.individual_perplexity.reshape(codes.shape).float().cpu()

    return codes.cpu(), perplexity


def update_codebook_usage(usage: CodebookUsage, output: QuantizerOutput, config: QuantizerConfig) -> None:
    """Add the codes of a batch of N images, one sample each, to ``usage`` (see :func:`usage_inputs`)."""
    codes, perplexity = usage_inputs(output, config)

    usage.update(codes, perplexity=perplexity)


def _evaluation(
    config: ImageVqaeConfig,
    parts: Sequence[_PartFigures],
    *,
    fid_features: ImageFeatureFn | None,
    class_probabilities: ImageFeatureFn | None,
) -> ImageVqaeEvaluation:
    """The figures of the whole set from those of its ``parts``, in file order."""
    usage = CodebookUsage(config.quantizer.num_codebooks, config.quantizer.codebook_size)
    rmse = RootMeanSquaredError()
    rmse_imagenet = RootMeanSquaredError(imagenet_standardized=True)
    fid = None if fid_features is None else FrechetInceptionDistance(fid_features)
    inception = None if class_probabilities is None else InceptionScore(class_probabilities)

    for part in parts:
        for codes, perplexity in part.codes:
            usage.update(codes, perplexity=perplexity)

        rmse.add_state(part.rmse)
        rmse_imagenet.add_state(part.rmse_imagenet)

        if fid is not None and part.fid is not None:
            fid.add_state(part.fid)

        if inception is not None and part.inception is not None:
            inception.add_state(part.inception)

    report = usage.compute()

    quantizer = config.quantizer

    return ImageVqaeEvaluation(
        method=quantizer.method,
        knn_k=quantizer.knn_k if quantizer.spec.regularizer == "knn" else None,
        feature_map=f"{config.latent_size}x{config.latent_size}x{config.latent_channels}",
        codebook_size=quantizer.codebook_size,
        rmse=rmse.compute(),
        rmse_imagenet=rmse_imagenet.compute(),
        fid=None if fid is None else fid.compute(),
        inception_score=None if inception is None else inception.compute(),
        usage=report,
    )
