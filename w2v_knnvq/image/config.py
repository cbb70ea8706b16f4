"""Configuration and architectures of the discrete image autoencoder (Appendix B.1, Table 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.quantizer import QuantizerConfig

IMAGE_VQAE_FAMILY: Final = "image_vqae"


@dataclass(kw_only=True)
class ImageVqaeConfig:
    """Holds the configuration of an :class:`ImageVqaeModel`.

    The encoder expands the RGB input to ``stem_channels`` by a plain convolution, then runs
    one stage per entry of ``stage_channels``/``stage_sizes``: a depthwise separable
    convolution (strided when the size halves) followed by a residual block. The last stage
    gives the latent feature map of shape ``(stage_channels[-1], stage_sizes[-1],
    stage_sizes[-1])`` whose pixels are quantized. The decoder mirrors the encoder with
    nearest-neighbour interpolation in place of strided convolutions.
    """

    image_size: int = 256
    """Height and width of the (square, centre-cropped) input images."""

    stem_channels: int = 256
    """Channels after the input convolution (3 -> 256 in Appendix B.1)."""

    stage_channels: list[int] = field(default_factory=lambda: [128, 128, 64, 64, 32, 32])
    """Output channels of each encoder stage (Table 4, "Latent Channels")."""

    stage_sizes: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16, 16])
    """Height and width after each encoder stage (Table 4, "Height & Width"); each entry
    equals the previous one or halves it, and the first one may halve ``image_size``."""

    num_groups: int = 32
    """Upper bound of the GroupNorm groups; a layer uses the largest divisor of its
    channels not above it."""

    quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(input_dim=32, codebook_dim=32, codebook_size=1024, num_codebooks=1)
    )
    """The quantizer between encoder and decoder; one latent pixel is one vector."""

    @property
    def latent_channels(self) -> int:
        """Channels C of the latent map ``(N, C, h, w)``, the quantized vectors' size."""
        return self.stage_channels[-1]

    @property
    def latent_size(self) -> int:
        """Height and width h = w of the latent map ``(N, C, h, w)``."""
        return self.stage_sizes[-1]

    def validate(self) -> ValidationResult:
        """The stages and the quantizer must fit together (fairseq2 calls this when it
        builds the model configuration, so a bad setting is a configuration error)."""
        result = ValidationResult()

        if not self.stage_channels or len(self.stage_channels) != len(self.stage_sizes):
            result.add_error(
                "`stage_channels` and `stage_sizes` must be non-empty lists of equal length, "
                f"but have lengths {len(self.stage_channels)} and {len(self.stage_sizes)} instead."
            )

            return result

        previous = self.image_size
        for size in self.stage_sizes:
            if size not in (previous, previous // 2) or size < 1:
                result.add_error(
                    "Each entry of `stage_sizes` must equal the previous size or halve it, starting "
                    f"from `image_size` ({self.image_size}), but `stage_sizes` is {self.stage_sizes} instead."
                )

                break

            previous = size

        if self.quantizer.input_dim != self.latent_channels:
            result.add_error(
                f"`quantizer.input_dim` must equal the latent channels {self.latent_channels} "
                f"(the last entry of `stage_channels`), but is {self.quantizer.input_dim} instead; "
                "override both together."
            )

        for error in self.quantizer.errors():
            result.add_error(f"`quantizer.{error[1:]}")

        return result


def _config(
    *,
    image_size: int,
    stem_channels: int,
    stage_channels: list[int],
    stage_sizes: list[int],
    codebook_size: int,
    num_groups: int = 32,
) -> ImageVqaeConfig:
    """One architecture with a single codebook of ``codebook_size`` codes over its latent channels."""
    latent_channels = stage_channels[-1]

    return ImageVqaeConfig(
        image_size=image_size,
        stem_channels=stem_channels,
        stage_channels=stage_channels,
        stage_sizes=stage_sizes,
        num_groups=num_groups,
        quantizer=QuantizerConfig(
            input_dim=latent_channels,
            codebook_dim=latent_channels,
            codebook_size=codebook_size,
            num_codebooks=1,
        ),
    )


def _f16_c32() -> ImageVqaeConfig:
    """Table 4, column 1: 16x16x32 latents, 1024 codes."""
    return _config(
        image_size=256,
        stem_channels=256,
        stage_channels=[128, 128, 64, 64, 32, 32],
        stage_sizes=[256, 128, 64, 32, 16, 16],
        codebook_size=1024,
    )


def _f64(latent_channels: int) -> Callable[[], ImageVqaeConfig]:
    def make() -> ImageVqaeConfig:
        return _config(
            image_size=256,
            stem_channels=256,
            stage_channels=[128, 64, 32, latent_channels],
            stage_sizes=[256, 128, 64, 64],
            codebook_size=8196,
        )

    make.__doc__ = f"Table 4: 64x64x{latent_channels} latents, 8196 codes."

    return make


def _tiny() -> ImageVqaeConfig:
    """A CPU-sized model for demos and tests: 32x32 images, 8x8x8 latents, 64 codes."""
    return _config(
        image_size=32,
        stem_channels=32,
        stage_channels=[16, 16, 8],
        stage_sizes=[32, 16, 8],
        codebook_size=64,
        num_groups=8,
    )


IMAGE_VQAE_ARCHS: Final[dict[str, Callable[[], ImageVqaeConfig]]] = {
    "f16_c32_m1024": _f16_c32,
    "f64_c3_m8196": _f64(3),
    "f64_c32_m8196": _f64(32),
    "f64_c2048_m8196": _f64(2048),
    "tiny": _tiny,
}
"""Architectures by name: the four configurations of Table 4 and a tiny CPU one."""


def get_image_vqae_config(arch: str) -> ImageVqaeConfig:
    """Return a fresh configuration of the architecture ``arch``.

    :raises ValueError: if ``arch`` is not one of :data:`IMAGE_VQAE_ARCHS`.
    """
    try:
        make = IMAGE_VQAE_ARCHS[arch]
    except KeyError:
        raise ValueError(
            f"`arch` must be an image autoencoder architecture ({', '.join(IMAGE_VQAE_ARCHS)}), "
            f"but is '{arch}' instead."
        ) from None

    return make()


def register_image_vqae_configs(container: DependencyContainer) -> None:
    """Register every architecture of :data:`IMAGE_VQAE_ARCHS` under its name."""
    arch = ConfigRegistrar(container, ImageVqaeConfig)

    for name, make_config in IMAGE_VQAE_ARCHS.items():
        arch(name)(make_config)
