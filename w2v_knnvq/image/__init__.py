"""Discrete image autoencoder of the paper's secondary experiment (section 4.1, Appendix B.1)."""

from w2v_knnvq.image.config import IMAGE_VQAE_ARCHS as IMAGE_VQAE_ARCHS
from w2v_knnvq.image.config import IMAGE_VQAE_FAMILY as IMAGE_VQAE_FAMILY
from w2v_knnvq.image.config import ImageVqaeConfig as ImageVqaeConfig
from w2v_knnvq.image.config import get_image_vqae_config as get_image_vqae_config
from w2v_knnvq.image.config import register_image_vqae_configs as register_image_vqae_configs
from w2v_knnvq.image.factory import ImageVqaeFactory as ImageVqaeFactory
from w2v_knnvq.image.factory import create_image_vqae_model as create_image_vqae_model
from w2v_knnvq.image.family import register_image_vqae as register_image_vqae
from w2v_knnvq.image.hub import get_image_vqae_model_hub as get_image_vqae_model_hub
from w2v_knnvq.image.model import ImageVqaeModel as ImageVqaeModel
from w2v_knnvq.image.model import ImageVqaeOutput as ImageVqaeOutput
