"""Registration of the ``image_vqae`` model family with fairseq2."""

from __future__ import annotations

from fairseq2.composition import register_model_family
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.image.config import IMAGE_VQAE_FAMILY, ImageVqaeConfig, register_image_vqae_configs
from w2v_knnvq.image.factory import create_image_vqae_model
from w2v_knnvq.image.model import ImageVqaeModel


def register_image_vqae(container: DependencyContainer) -> None:
    """Register the ``image_vqae`` family and its architectures (Table 4 and ``tiny``).

    The extension :func:`w2v_knnvq.extension.setup_w2v_knnvq` calls it once at fairseq2's
    start-up; a second call on the same container raises.
    """
    register_model_family(
        container,
        IMAGE_VQAE_FAMILY,
        kls=ImageVqaeModel,
        config_kls=ImageVqaeConfig,
        factory=create_image_vqae_model,
    )

    register_image_vqae_configs(container)
