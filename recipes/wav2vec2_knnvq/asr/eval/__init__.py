"""Evaluation of a fine-tuned CTC model on one split (``python -m recipes.wav2vec2_knnvq.asr.eval``)."""

from .recipe import AsrEvalRecipe as AsrEvalRecipe
from .recipe import main as main
