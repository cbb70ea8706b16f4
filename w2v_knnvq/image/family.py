"""The ``image_vqae`` fairseq2 model family."""

from __future__ import annotations

from fairseq2.composition import register_model_family
from fairseq2.models import ModelHubAccessor
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.image.config import IMAGE_VQAE_ARCHS, IMAGE_VQAE_FAMILY, ImageVqaeConfig
from w2v_knnvq.image.model import ImageVqaeModel


def create_image_vqae_model(config: ImageVqaeConfig) -> ImageVqaeModel:
    """Build a freshly initialized model (on the current default device, ``meta`` included)."""
    return ImageVqaeModel(config)


get_image_vqae_model_hub = ModelHubAccessor(IMAGE_VQAE_FAMILY, ImageVqaeModel, ImageVqaeConfig)


def register_image_vqae(container: DependencyContainer) -> None:
    """Register the ``image_vqae`` family and its architectures (Table 4 and ``tiny``)."""
    register_model_family(
        container,
        IMAGE_VQAE_FAMILY,
        ImageVqaeModel,
        ImageVqaeConfig,
        factory=create_image_vqae_model,
    )

    arch = ConfigRegistrar(container, ImageVqaeConfig)

    for name, make_config in IMAGE_VQAE_ARCHS.items():
        arch(name)(make_config)
