"""CTC fine-tuning of a pretrained wav2vec 2.0 encoder (``python -m recipes.wav2vec2_knnvq.asr``)."""

from .recipe import AsrRecipe as AsrRecipe
from .recipe import main as main
