"""Configuration and architectures of the ``wav2vec2_knnvq`` model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2EncoderConfig
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.quantizer import QuantizerConfig

WAV2VEC2_KNNVQ_FAMILY: Final = "wav2vec2_knnvq"


@dataclass(kw_only=True)
class Wav2Vec2KnnVqConfig(Wav2Vec2Config):
    """Holds the configuration of a wav2vec 2.0 model whose Gumbel quantizer and
    diversity loss are replaced by a :class:`~w2v_knnvq.quantizer.VectorQuantizer`
    and its regularization loss.

    The default values correspond to the ``base_2x320`` architecture.

    The quantizer section is the authority on codebook shapes. The inherited
    fields ``num_codebooks``, ``num_codebook_entries`` and ``quantized_dim`` must
    mirror it (they are validated) so that code written for fairseq2's
    :class:`Wav2Vec2Config` reads true values. The inherited
    ``codebook_sampling_temperature`` does not apply; Gumbel annealing is set by
    ``quantizer.gumbel_tau_anneal``.
    """

    quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(
            input_dim=512, num_codebooks=2, codebook_size=320, codebook_dim=128, knn_k=2
        )
    )
    """The quantizer. ``input_dim`` must equal ``encoder_config.feature_dim``
    since the quantizer sees the layer-normed CNN features."""

    regularizer_weight: float = 1.0
    """The weight of the quantizer's mean-reduced regularization loss relative to
    the per-frame contrastive loss (the paper's ``L_main + L_reg`` is 1.0)."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        quantizer = self.quantizer

        if quantizer.input_dim != self.encoder_config.feature_dim:
            result.add_error(
                f"`quantizer.input_dim` must equal `encoder_config.feature_dim` ({self.encoder_config.feature_dim}), but is {quantizer.input_dim} instead."
            )

        mirrored = (
            ("num_codebooks", self.num_codebooks, "quantizer.num_codebooks", quantizer.num_codebooks),
            ("num_codebook_entries", self.num_codebook_entries, "quantizer.codebook_size", quantizer.codebook_size),
            ("quantized_dim", self.quantized_dim, "quantizer.num_codebooks * quantizer.codebook_dim", quantizer.output_dim),
        )  # fmt: skip

        for name, value, source, expected in mirrored:
            if value != expected:
                result.add_error(
                    f"`{name}` must equal `{source}` ({expected}), but is {value} instead."
                )

        if self.regularizer_weight < 0.0:
            result.add_error(
                f"`regularizer_weight` must be non-negative, but is {self.regularizer_weight} instead."
            )

        return result


def _make_config(
    encoder_config: Wav2Vec2EncoderConfig,
    *,
    num_codebooks: int,
    codebook_size: int,
    codebook_dim: int,
    final_dim: int,
    logit_temp: float = 0.1,
) -> Wav2Vec2KnnVqConfig:
    quantizer = QuantizerConfig(
        input_dim=encoder_config.feature_dim,
        num_codebooks=num_codebooks,
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        knn_k=2,
    )

    return Wav2Vec2KnnVqConfig(
        encoder_config=encoder_config,
        final_dim=final_dim,
        quantized_dim=quantizer.output_dim,
        num_codebooks=num_codebooks,
        num_codebook_entries=codebook_size,
        logit_temp=logit_temp,
        quantizer=quantizer,
    )


def _paper_encoder() -> Wav2Vec2EncoderConfig:
    # Table 5 and Appendix B.2 of the paper: fairseq2's base CNN (512 channels,
    # kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) with 8 heads and FFN 4096.
    return Wav2Vec2EncoderConfig(
        model_dim=768,
        num_encoder_layers=12,
        num_encoder_attn_heads=8,
        ffn_inner_dim=4096,
        dropout_p=0.1,
        layer_drop_p=0.05,
    )


def _base_encoder() -> Wav2Vec2EncoderConfig:
    return Wav2Vec2Config().encoder_config


def _large_encoder() -> Wav2Vec2EncoderConfig:
    # fairseq2's `large` wav2vec 2.0 encoder.
    return Wav2Vec2EncoderConfig(
        model_dim=1024,
        num_encoder_layers=24,
        num_encoder_attn_heads=16,
        ffn_inner_dim=4096,
        dropout_p=0.0,
        layer_drop_p=0.2,
    )


def _tiny_encoder() -> Wav2Vec2EncoderConfig:
    # Trains on a CPU in seconds; the CNN keeps the 320x downsampling (50 Hz).
    return Wav2Vec2EncoderConfig(
        model_dim=64,
        feature_dim=64,
        feature_extractor_layer_descs=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
        pos_conv_kernel_size=16,
        num_pos_conv_groups=4,
        num_encoder_layers=2,
        num_encoder_attn_heads=4,
        ffn_inner_dim=128,
        layer_drop_p=0.0,
    )


def paper_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _paper_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=256, final_dim=256
    )


def paper_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _paper_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=128, final_dim=256
    )


def base_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _base_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=256, final_dim=256
    )


def base_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _base_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=128, final_dim=256
    )


def large_1x1024() -> Wav2Vec2KnnVqConfig:
    # fairseq2's `large` quantizes to 768 dimensions and projects to 768.
    return _make_config(
        _large_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=768, final_dim=768
    )


def large_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _large_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=384, final_dim=768
    )


def tiny_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _tiny_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=32, final_dim=32
    )


def tiny_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(
        _tiny_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=32, final_dim=32
    )


WAV2VEC2_KNNVQ_ARCHS: Final[dict[str, Callable[[], Wav2Vec2KnnVqConfig]]] = {
    "paper_1x1024": paper_1x1024,
    "paper_2x320": paper_2x320,
    "base_1x1024": base_1x1024,
    "base_2x320": base_2x320,
    "large_1x1024": large_1x1024,
    "large_2x320": large_2x320,
    "tiny_1x1024": tiny_1x1024,
    "tiny_2x320": tiny_2x320,
}
"""Every architecture of the family; each call returns a fresh configuration."""


def register_wav2vec2_knnvq_configs(container: DependencyContainer) -> None:
    arch = ConfigRegistrar(container, Wav2Vec2KnnVqConfig)

    for name, make_config in WAV2VEC2_KNNVQ_ARCHS.items():
        arch(name)(make_config)
