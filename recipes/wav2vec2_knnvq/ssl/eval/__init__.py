"""Evaluation of a pretraining checkpoint on any manifest splits (``python -m recipes.wav2vec2_knnvq.ssl.eval``)."""

from .recipe import SslEvalRecipe as SslEvalRecipe
from .recipe import main as main
