"""Configuration of the image autoencoder training recipe (Appendix B.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fairseq2.recipe.config import (
    AdamWConfig,
    CommonSection,
    CosineAnnealingLRConfig,
    GangSection,
    LRSchedulerSection,
    MixedPrecisionConfig,
    ModelSection,
    OptimizerSection,
    RegimeSection,
    TrainerSection,
)

from w2v_knnvq.image import IMAGE_VQAE_FAMILY
from w2v_knnvq.quantizer import METHODS

EUCLIDEAN_HARD_METHODS: Final = frozenset(
    name
    for name, spec in METHODS.items()
    if not spec.smoothed and spec.distance == "euclidean" and spec.estimator in ("ste", "rotation")
)
"""Euclidean STE/rotation quantizers (SimVQ included), trained with a lower learning rate and
no weight decay."""


def method_peak_lr(method: str) -> float:
    """rho_max of Appendix B.1: 5e-5 for Euclidean STE/rotation quantizers, else 1e-4."""
    return 5e-5 if method in EUCLIDEAN_HARD_METHODS else 1e-4


def method_weight_decay(method: str) -> float:
    """AdamW weight decay of Appendix B.1: 0 for Euclidean STE/rotation quantizers, else 1e-4."""
    return 0.0 if method in EUCLIDEAN_HARD_METHODS else 1e-4


@dataclass(kw_only=True)
class ImageFolderSection:
    """An image folder in the ImageNet layout: ``path/SPLIT/CLASS/*.JPEG`` (or .jpg, .png).

    Images are resized (shorter side) and centre-cropped to the model's ``image_size``.
    """

    path: Path | None = None

    train_split: str = "train"

    valid_split: str | None = "val"
    """``None`` disables validation."""

    batch_size: int = 16
    """Images per batch and data parallel rank; Appendix B.1 trains on 64 images in total,
    16 on each of 4 ranks."""

    num_workers: int = 0
    """Background decoding processes per rank (0 decodes in the training process)."""


@dataclass(kw_only=True)
class ImageVqaeRecipeConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(family=IMAGE_VQAE_FAMILY, arch="f16_c32_m1024"))

    dataset: ImageFolderSection = field(default_factory=lambda: ImageFolderSection())

    trainer: TrainerSection = field(
        default_factory=lambda: TrainerSection(mixed_precision=MixedPrecisionConfig(mode="off"), max_grad_norm=None)
    )

    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(config=AdamWConfig(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4))
    )

    lr_scheduler: LRSchedulerSection = field(
        default_factory=lambda: LRSchedulerSection(
            config=CosineAnnealingLRConfig(num_warmup_steps=16_000, final_lr_scale=0.5)
        )
    )

    # The default arch's Table 4 schedule: 25 epochs x ceil(1,281,167 / 64 images) steps.
    regime: RegimeSection = field(
        default_factory=lambda: RegimeSection(
            num_steps=500_475,
            validate_every_n_steps=5_000,
            checkpoint_every_n_steps=5_000,
            keep_last_n_checkpoints=1,
            publish_metrics_every_n_steps=100,
        )
    )

    common: CommonSection = field(default_factory=lambda: CommonSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    peak_lr: float | None = None
    """rho_max; ``None`` takes Appendix B.1's value for the quantizer method. It replaces
    ``optimizer.config.lr``."""

    weight_decay: float | None = None
    """``None`` takes Appendix B.1's value for the quantizer method. It replaces
    ``optimizer.config.weight_decay``."""
