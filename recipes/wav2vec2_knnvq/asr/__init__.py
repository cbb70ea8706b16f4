"""CTC fine-tuning of a pretrained wav2vec 2.0 encoder (``python -m recipes.wav2vec2_knnvq.asr``)."""

from recipes.wav2vec2_knnvq.asr.recipe import AsrRecipe as AsrRecipe
from recipes.wav2vec2_knnvq.asr.recipe import main as main
