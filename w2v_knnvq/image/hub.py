"""Typed access to the ``image_vqae`` family through fairseq2's model hub."""

from __future__ import annotations

from fairseq2.models import ModelHubAccessor

from w2v_knnvq.image.config import IMAGE_VQAE_FAMILY, ImageVqaeConfig
from w2v_knnvq.image.model import ImageVqaeModel

get_image_vqae_model_hub = ModelHubAccessor(IMAGE_VQAE_FAMILY, ImageVqaeModel, ImageVqaeConfig)
