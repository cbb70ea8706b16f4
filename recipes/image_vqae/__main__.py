"""Train the discrete image autoencoder: ``python -m recipes.image_vqae --config-file FILE OUT_DIR``."""

from .recipe import main

if __name__ == "__main__":
    main()
