"""Configuration and architectures of the ``wav2vec2_knnvq`` model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from fairseq2.models.transformer import TransformerNormOrder
from fairseq2.models.wav2vec2 import Wav2Vec2EncoderConfig
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.quantizer import QuantizerConfig

WAV2VEC2_KNNVQ_FAMILY: Final = "wav2vec2_knnvq"


@dataclass(kw_only=True)
class Wav2Vec2KnnVqConfig:
    """Holds the configuration of a wav2vec 2.0 pretraining model whose Gumbel quantizer
    and diversity loss are replaced by a :class:`~w2v_knnvq.quantizer.VectorQuantizer`
    and its regularization loss.

    Like fairseq2's ``wav2vec2_asr`` family it holds an ``encoder_config`` and builds the
    encoder with fairseq2's :class:`Wav2Vec2EncoderFactory`, so the encoder loads into a
    ``wav2vec2_asr`` model unchanged. The quantizer section is the only place that states
    the codebook shape; the quantizer's input dimension is the encoder's ``feature_dim``.
    The default values correspond to the ``base_2x320`` architecture.
    """

    encoder_config: Wav2Vec2EncoderConfig = field(default_factory=Wav2Vec2EncoderConfig)
    """The CNN feature extractor and the Transformer encoder."""

    quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(num_codebooks=2, codebook_size=320, codebook_dim=128, knn_k=2)
    )
    """The quantizer of the layer-normed CNN features. Its ``input_dim`` is left unset
    (``None``): the model takes ``encoder_config.feature_dim``."""

    regularizer_weight: float = 1.0
    """The weight of the quantizer's mean-reduced regularization loss relative to the
    per-frame contrastive loss (the paper's ``L_main + L_reg`` is 1.0)."""

    final_dim: int = 256
    """The dimensionality of the final projection of context vectors and quantized targets."""

    final_proj_bias: bool = True
    """If ``True``, the final projection of the context vectors learns an additive bias."""

    quantizer_encoder_grad: bool = True
    """If ``True``, the quantizer's gradient reaches the CNN feature extractor."""

    # Mask
    temporal_mask_span_len: int = 10
    """The length of each temporal mask span that is applied over time steps."""

    max_temporal_mask_prob: float = 0.69
    """The maximum probability of masking a time step. fairseq2 draws span starts with
    replacement, so 0.69 covers about as many frames as fairseq's 0.65."""

    min_num_temporal_mask_spans: int = 2
    """The minimum number of temporal masks sampled per sequence."""

    spatial_mask_span_len: int = 10
    """The length of each spatial mask span that is applied over features."""

    max_spatial_mask_prob: float = 0.0
    """The maximum probability of masking a feature."""

    min_num_spatial_mask_spans: int = 2
    """The minimum number of spatial masks sampled per sequence."""

    # Contrastive loss
    num_distractors: int = 100
    """The number of distractors sampled per masked frame."""

    logit_temp: float = 0.1
    """The temperature that divides the contrastive cosine logits."""

    def quantizer_config(self) -> QuantizerConfig:
        """:returns: ``quantizer`` with ``input_dim`` set to the CNN's ``feature_dim``."""
        return replace(self.quantizer, input_dim=self.encoder_config.feature_dim)

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        feature_dim = self.encoder_config.feature_dim

        input_dim = self.quantizer.input_dim

        if input_dim is not None and input_dim != feature_dim:
            result.add_error(
                f"`quantizer.input_dim` must be `None` or equal `encoder_config.feature_dim` ({feature_dim}), but is {input_dim} instead."
            )

        for error in self.quantizer.errors():
            result.add_error(f"`quantizer.{error[1:]}")

        if self.regularizer_weight < 0.0:
            result.add_error(f"`regularizer_weight` must be non-negative, but is {self.regularizer_weight} instead.")

        if self.num_distractors < 1:
            result.add_error(f"`num_distractors` must be at least 1, but is {self.num_distractors} instead.")

        for error in self._mask_errors():
            result.add_error(error)

        return result

    def _mask_errors(self) -> list[str]:
        """What fairseq2's masker would otherwise reject mid-run."""
        errors = []

        if not 0.0 < self.max_temporal_mask_prob <= 1.0:
            errors.append(
                f"`max_temporal_mask_prob` must be greater than 0 and at most 1, but is {self.max_temporal_mask_prob} instead."
            )

        if not 0.0 <= self.max_spatial_mask_prob <= 1.0:
            errors.append(
                f"`max_spatial_mask_prob` must be between 0 and 1, but is {self.max_spatial_mask_prob} instead."
            )

        for name in ("temporal_mask_span_len", "spatial_mask_span_len"):
            if getattr(self, name) < 1:
                errors.append(f"`{name}` must be at least 1, but is {getattr(self, name)} instead.")

        for name in ("min_num_temporal_mask_spans", "min_num_spatial_mask_spans"):
            if getattr(self, name) < 0:
                errors.append(f"`{name}` must be non-negative, but is {getattr(self, name)} instead.")

        model_dim = self.encoder_config.model_dim

        if self.max_spatial_mask_prob > 0.0 and self.spatial_mask_span_len >= model_dim:
            errors.append(
                f"`spatial_mask_span_len` must be less than `encoder_config.model_dim` ({model_dim}) when features are masked, but is {self.spatial_mask_span_len} instead."
            )

        return errors


def _make_config(
    encoder_config: Wav2Vec2EncoderConfig,
    *,
    num_codebooks: int,
    codebook_size: int,
    codebook_dim: int,
    final_dim: int,
) -> Wav2Vec2KnnVqConfig:
    quantizer = QuantizerConfig(
        num_codebooks=num_codebooks, codebook_size=codebook_size, codebook_dim=codebook_dim, knn_k=2
    )

    return Wav2Vec2KnnVqConfig(encoder_config=encoder_config, final_dim=final_dim, quantizer=quantizer)


def _paper_encoder() -> Wav2Vec2EncoderConfig:
    # Table 5 and Appendix B.2 of the paper: fairseq2's base CNN (512 channels,
    # kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) with 8 heads and FFN 4096.
    # Table 5's one "Dropout Rate 0.1" is read as torchaudio's wav2vec 2.0 base reads it:
    # 0.1 on the feature projection and residual paths (`dropout_p`), on the attention
    # weights and inside the FFN. The quantizer's targets get no dropout (`first_pass_dropout_p`
    # 0.0), which the paper does not mention and which would change the quantizer's input.
    return Wav2Vec2EncoderConfig(
        model_dim=768,
        num_encoder_layers=12,
        num_encoder_attn_heads=8,
        ffn_inner_dim=4096,
        dropout_p=0.1,
        attn_dropout_p=0.1,
        ffn_inner_dropout_p=0.1,
        first_pass_dropout_p=0.0,
        layer_drop_p=0.05,
    )


def _base_encoder() -> Wav2Vec2EncoderConfig:
    # fairseq2's `base` wav2vec 2.0 encoder.
    return Wav2Vec2EncoderConfig()


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


def _small_encoder() -> Wav2Vec2EncoderConfig:
    # Learns to recognize speech on a CPU in minutes (recipes/studies/asr_demo.py):
    # the tiny CNN with half its channels below 800 Hz, at about 60% of its cost, and four
    # pre-norm layers of 128 dimensions, which train stably at the demo's learning rate.
    return Wav2Vec2EncoderConfig(
        model_dim=128,
        feature_dim=64,
        feature_extractor_layer_descs=[(32, 10, 5), (32, 3, 2)] + [(64, 3, 2)] * 3 + [(64, 2, 2)] * 2,
        pos_conv_kernel_size=16,
        num_pos_conv_groups=4,
        num_encoder_layers=4,
        num_encoder_attn_heads=4,
        ffn_inner_dim=256,
        norm_order=TransformerNormOrder.PRE,
        layer_drop_p=0.0,
    )


def paper_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(_paper_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=256, final_dim=256)


def paper_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(_paper_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=128, final_dim=256)


def base_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(_base_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=256, final_dim=256)


def base_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(_base_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=128, final_dim=256)


def large_1x1024() -> Wav2Vec2KnnVqConfig:
    # fairseq2's `large` quantizes to 768 dimensions and projects to 768.
    return _make_config(_large_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=768, final_dim=768)


def large_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(_large_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=384, final_dim=768)


def tiny_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(_tiny_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=32, final_dim=32)


def tiny_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(_tiny_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=32, final_dim=32)


def small_1x1024() -> Wav2Vec2KnnVqConfig:
    return _make_config(_small_encoder(), num_codebooks=1, codebook_size=1024, codebook_dim=64, final_dim=64)


def small_2x320() -> Wav2Vec2KnnVqConfig:
    return _make_config(_small_encoder(), num_codebooks=2, codebook_size=320, codebook_dim=32, final_dim=64)


WAV2VEC2_KNNVQ_ARCHS: Final[dict[str, Callable[[], Wav2Vec2KnnVqConfig]]] = {
    "paper_1x1024": paper_1x1024,
    "paper_2x320": paper_2x320,
    "base_1x1024": base_1x1024,
    "base_2x320": base_2x320,
    "large_1x1024": large_1x1024,
    "large_2x320": large_2x320,
    "tiny_1x1024": tiny_1x1024,
    "tiny_2x320": tiny_2x320,
    "small_1x1024": small_1x1024,
    "small_2x320": small_2x320,
}
"""Every architecture of the family; each call returns a fresh configuration."""


def register_wav2vec2_knnvq_configs(container: DependencyContainer) -> None:
    arch = ConfigRegistrar(container, Wav2Vec2KnnVqConfig)

    for name, make_config in WAV2VEC2_KNNVQ_ARCHS.items():
        arch(name)(make_config)
