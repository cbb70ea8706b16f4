"""Evaluation of a fine-tuned CTC model on one split (``python -m recipes.wav2vec2_knnvq.asr.eval``)."""

from recipes.wav2vec2_knnvq.asr.eval.recipe import AsrEvalRecipe as AsrEvalRecipe
from recipes.wav2vec2_knnvq.asr.eval.recipe import main as main
