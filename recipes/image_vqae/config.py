"""Configuration of the image autoencoder training recipe (Appendix B.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from typing_extensions import override

from fairseq2.models import ModelFamily
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
    SupportsStructure,
    TrainerSection,
)
from fairseq2.runtime.dependency import DependencyResolver
from fairseq2.utils.config import ConfigMerger
from fairseq2.utils.structured import StructureError, ValueConverter
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.image import IMAGE_VQAE_FAMILY, ImageVqaeConfig
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

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.path is None:
            result.add_error(
                "`path` must point to an image folder in the ImageNet layout (PATH/train/CLASS/*.JPEG), "
                "but is not set; set it with --config dataset.path=PATH."
            )

        return result


@dataclass(kw_only=True)
class ImageVqaeRecipeConfig(SupportsStructure):
    """The recipe's configuration; reading it settles ``peak_lr`` and ``weight_decay``
    from the quantizer method and writes them into ``optimizer.config``."""

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

    @override
    def structure(self, resolver: DependencyResolver) -> None:
        """Called by fairseq2 when it reads the configuration, before it validates it: the
        values are settled before anything is built and recorded in the run's ``config.yaml``."""
        # The section's own hook turns `config` from a mapping into an `AdamWConfig`;
        # fairseq2 calls it again afterwards, which leaves the object as it is.
        self.optimizer.structure(resolver)

        method = self.quantizer_method(resolver)

        if method is not None:
            if self.peak_lr is None:
                self.peak_lr = method_peak_lr(method)

            if self.weight_decay is None:
                self.weight_decay = method_weight_decay(method)

        optimizer_config = self.optimizer.config

        if isinstance(optimizer_config, AdamWConfig):
            if self.peak_lr is not None:
                optimizer_config.lr = self.peak_lr

            if self.weight_decay is not None:
                optimizer_config.weight_decay = self.weight_decay

    def quantizer_method(self, resolver: DependencyResolver) -> str | None:
        """The ``quantizer.method`` of the model that ``model`` creates: the architecture's
        with ``model.config_overrides`` merged in, as fairseq2 merges them.

        :returns: ``None`` for a model named by an asset card (``model.name``), or when the
            family, architecture or overrides are not valid (building the model reports those).
        """
        section = self.model

        if section.family != IMAGE_VQAE_FAMILY or (section.name is not None and section.path is None):
            return None

        # The family itself, not its hub: the hub needs the asset store, which needs this
        # configuration.
        family = resolver.resolve(ModelFamily, key=IMAGE_VQAE_FAMILY)

        config = family.config_kls() if section.arch is None else family.maybe_get_arch_config(section.arch)

        if not isinstance(config, ImageVqaeConfig):
            return None

        if section.config_overrides is not None:
            value_converter = resolver.resolve(ValueConverter)

            try:
                merged = resolver.resolve(ConfigMerger).merge(
                    value_converter.unstructure(config), section.config_overrides
                )

                config = value_converter.structure(merged, ImageVqaeConfig)
            except (StructureError, ValueError, TypeError):
                return None

        return config.quantizer.method

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if not isinstance(self.optimizer.config, AdamWConfig):
            result.add_error(
                f"`optimizer.name` must be 'adamw' (Appendix B.1), but is '{self.optimizer.name}' instead."
            )

        for name, value in (("peak_lr", self.peak_lr), ("weight_decay", self.weight_decay)):
            if value is None:
                result.add_error(
                    f"`{name}` must be set when the quantizer method, which gives Appendix B.1's value, is not "
                    "known from `model.family`, `model.arch` and `model.config_overrides` (a model named by "
                    "`model.name`), but is not set."
                )

        return result
