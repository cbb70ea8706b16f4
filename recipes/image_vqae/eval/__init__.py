"""Evaluation of a trained image autoencoder on image folders (``python -m recipes.image_vqae.eval``)."""

from .recipe import ImageVqaeEvalRecipe as ImageVqaeEvalRecipe
from .recipe import main as main
