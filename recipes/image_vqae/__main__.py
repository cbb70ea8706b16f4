"""Train the discrete image autoencoder: ``python -m recipes.image_vqae --config-file FILE OUT_DIR``."""

from fairseq2.recipe.cli import main

from recipes.image_vqae.recipe import ImageVqaeRecipe

if __name__ == "__main__":
    main(ImageVqaeRecipe())
