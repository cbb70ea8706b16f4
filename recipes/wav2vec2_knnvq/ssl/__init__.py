"""wav2vec 2.0 self-supervised pretraining (``python -m recipes.wav2vec2_knnvq.ssl``)."""

from .recipe import SslRecipe as SslRecipe
from .recipe import main as main
