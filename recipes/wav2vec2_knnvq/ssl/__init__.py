"""wav2vec 2.0 self-supervised pretraining (``python -m recipes.wav2vec2_knnvq.ssl``)."""

from recipes.wav2vec2_knnvq.ssl.recipe import SslRecipe as SslRecipe
from recipes.wav2vec2_knnvq.ssl.recipe import main as main
