"""Builds :class:`ImageVqaeModel` from an :class:`ImageVqaeConfig`, as the ``wav2vec2_knnvq``
family's factory builds its model: the configuration is validated once, here, and the
modules take what they are built from."""

from __future__ import annotations

from fairseq2.utils.validation import ValidationError

from w2v_knnvq.image.config import ImageVqaeConfig
from w2v_knnvq.image.model import ImageDecoder, ImageEncoder, ImageVqaeModel
from w2v_knnvq.quantizer import VectorQuantizer


def create_image_vqae_model(config: ImageVqaeConfig) -> ImageVqaeModel:
    """Builds a freshly initialized model (on the current default device, ``meta`` included).

    :raises ValidationError: if ``config`` is not valid.
    """
    return ImageVqaeFactory(config).create_model()


class ImageVqaeFactory:
    """Composes the convolutional encoder, the :class:`VectorQuantizer` and the decoder."""

    def __init__(self, config: ImageVqaeConfig) -> None:
        """:raises ValidationError: if ``config`` is not valid. Configurations that fairseq2
        reads (asset cards, recipe sections) are validated already; one built in code is
        validated here, before a module is built from it."""
        result = config.validate()

        if result.has_error():
            raise ValidationError(result)

        self._config = config

    def create_model(self) -> ImageVqaeModel:
        return ImageVqaeModel(self._config, self.create_encoder(), self.create_quantizer(), self.create_decoder())

    def create_encoder(self) -> ImageEncoder:
        return ImageEncoder(self._config)

    def create_quantizer(self) -> VectorQuantizer:
        return VectorQuantizer(self._config.quantizer)

    def create_decoder(self) -> ImageDecoder:
        return ImageDecoder(self._config)
