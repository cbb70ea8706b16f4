"""The discrete image autoencoder: convolutional encoder, vector quantizer, decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Conv2d, GroupNorm, Module, ModuleList, SiLU

from w2v_knnvq.image.config import ImageVqaeConfig
from w2v_knnvq.quantizer import QuantizerOutput, VectorQuantizer


def _group_norm(channels: int, max_groups: int, device: torch.device | None) -> GroupNorm:
    num_groups = math.gcd(channels, max_groups)

    return GroupNorm(num_groups, channels, device=device)


class DepthwiseSeparableConv2d(Module):
    """A 3x3 depthwise convolution followed by a 1x1 pointwise one (Chollet, 2017).

    Maps ``(N, C_in, H, W)`` to ``(N, C_out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()

        self.depthwise = Conv2d(
            in_channels,
            in_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=in_channels,
            device=device,
        )
        self.pointwise = Conv2d(in_channels, out_channels, kernel_size=1, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class ResidualBlock(Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` with depthwise separable convolutions.

    Shape-preserving: ``(N, C, H, W)`` to ``(N, C, H, W)``.
    """

    def __init__(self, channels: int, *, max_groups: int, device: torch.device | None = None) -> None:
        super().__init__()

        self.norm1 = _group_norm(channels, max_groups, device)
        self.conv1 = DepthwiseSeparableConv2d(channels, channels, device=device)
        self.norm2 = _group_norm(channels, max_groups, device)
        self.conv2 = DepthwiseSeparableConv2d(channels, channels, device=device)
        self.act = SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))

        return x + h


class EncoderStage(Module):
    """A (possibly strided) depthwise separable convolution followed by a residual block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        max_groups: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()

        self.conv = DepthwiseSeparableConv2d(in_channels, out_channels, stride=stride, device=device)
        self.block = ResidualBlock(out_channels, max_groups=max_groups, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.conv(x))


class DecoderStage(Module):
    """Nearest-neighbour upsampling (when ``scale`` > 1), a depthwise separable convolution,
    and a residual block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        scale: int,
        max_groups: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()

        self.scale = scale
        self.conv = DepthwiseSeparableConv2d(in_channels, out_channels, device=device)
        self.block = ResidualBlock(out_channels, max_groups=max_groups, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="nearest")

        return self.block(self.conv(x))


class ImageEncoder(Module):
    """Maps images ``(N, 3, H, W)`` to latent maps ``(N, C, h, w)`` (Table 4 stages)."""

    def __init__(self, config: ImageVqaeConfig, *, device: torch.device | None = None) -> None:
        super().__init__()

        self.stem = Conv2d(3, config.stem_channels, kernel_size=3, padding=1, device=device)

        stages = []

        in_channels, in_size = config.stem_channels, config.image_size
        for channels, size in zip(config.stage_channels, config.stage_sizes, strict=True):
            stages.append(
                EncoderStage(
                    in_channels,
                    channels,
                    stride=in_size // size,
                    max_groups=config.num_groups,
                    device=device,
                )
            )
            in_channels, in_size = channels, size

        self.stages = ModuleList(stages)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)

        for stage in self.stages:
            x = stage(x)

        return x


class ImageDecoder(Module):
    """Maps latent maps ``(N, C, h, w)`` back to images ``(N, 3, H, W)``, mirroring the encoder."""

    def __init__(self, config: ImageVqaeConfig, *, device: torch.device | None = None) -> None:
        super().__init__()

        # Walk the encoder's (channels, size) path backwards, ending at the stem's width.
        targets = list(zip(config.stage_channels, config.stage_sizes, strict=True))[:-1][::-1]
        targets.append((config.stem_channels, config.image_size))

        stages = []

        in_channels, in_size = config.latent_channels, config.latent_size
        for channels, size in targets:
            stages.append(
                DecoderStage(
                    in_channels,
                    channels,
                    scale=size // in_size,
                    max_groups=config.num_groups,
                    device=device,
                )
            )
            in_channels, in_size = channels, size

        self.stages = ModuleList(stages)
        self.final_norm = _group_norm(config.stem_channels, config.num_groups, device)
        self.final_act = SiLU()
        self.output = Conv2d(config.stem_channels, 3, kernel_size=3, padding=1, device=device)

    def forward(self, latents: Tensor) -> Tensor:
        x = latents

        for stage in self.stages:
            x = stage(x)

        return self.output(self.final_act(self.final_norm(x)))


@dataclass
class ImageVqaeOutput:
    """The result of one autoencoding pass."""

    reconstruction: Tensor
    """``(N, 3, H, W)``, in the input's value range (``[-1, 1]`` for this project's readers)."""

    quantizer_output: QuantizerOutput
    """The quantizer's output for the latent pixels; leading shape ``(N, h, w)``."""

    reconstruction_loss: Tensor
    """Scalar mean squared error between reconstruction and input (L_main of eq. 9)."""

    loss: Tensor
    """Scalar ``reconstruction_loss + quantizer_output.loss``."""


class ImageVqaeModel(Module):
    """Encoder, pixel-wise vector quantizer and decoder, trained with an L2 reconstruction loss."""

    def __init__(
        self, config: ImageVqaeConfig, encoder: ImageEncoder, quantizer: VectorQuantizer, decoder: ImageDecoder
    ) -> None:
        """:param config: What the parts were built from (:class:`~w2v_knnvq.image.factory.ImageVqaeFactory`
        builds them and validates it)."""
        super().__init__()

        self.config = config
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    def encode(self, images: Tensor) -> Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, C, h, w)`` continuous latents."""
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"`images` must have shape (N, 3, {size}, {size}), but has {tuple(images.shape)}.")

        return self.encoder(images)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        """Quantize each pixel of ``(N, C, h, w)`` latents; the output's leading shape is ``(N, h, w)``."""
        return self.quantizer(latents.permute(0, 2, 3, 1))

    def decode(self, quantized: Tensor) -> Tensor:
        """Map ``(N, h, w, C)`` quantized pixels (the quantizer's layout) to ``(N, 3, H, W)`` images."""
        return self.decoder(quantized.permute(0, 3, 1, 2).to(self.decoder.output.weight.dtype))

    def forward(self, images: Tensor) -> ImageVqaeOutput:
        """Autoencode ``(N, 3, H, W)`` images; the loss is mean-reduced over the batch."""
        quantizer_output = self.quantize(self.encode(images))

        reconstruction = self.decode(quantizer_output.quantized)

        reconstruction_loss = F.mse_loss(reconstruction.float(), images.float())

        return ImageVqaeOutput(
            reconstruction=reconstruction,
            quantizer_output=quantizer_output,
            reconstruction_loss=reconstruction_loss,
            loss=reconstruction_loss + quantizer_output.loss,
        )
