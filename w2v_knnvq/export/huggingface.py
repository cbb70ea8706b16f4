"""Exports the encoder as a Hugging Face ``transformers`` ``Wav2Vec2Model`` directory
(``config.json`` + ``model.safetensors``). Needs the optional ``transformers`` and
``safetensors`` packages."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from torch import Tensor
from torch.nn import Module

from fairseq2.models.wav2vec2 import Wav2Vec2Config

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.export.encoder import (
    EncoderModelConfig,
    ExportError,
    describe_encoder,
    encoder_state_dict,
    mask_embedding,
)
from w2v_knnvq.wav2vec2 import Wav2Vec2KnnVqConfig

if TYPE_CHECKING:
    import transformers


def import_transformers() -> ModuleType:
    """:raises ExportError: if ``transformers`` or ``safetensors`` is not installed."""
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as ex:
        raise ExportError(
            "Exporting to Hugging Face needs the `transformers` and `safetensors` packages; install them with `pip install transformers safetensors`."
        ) from ex

    return transformers


def encoder_config_kwargs(config: EncoderModelConfig) -> dict[str, object]:
    """:returns: The keyword arguments of ``transformers.Wav2Vec2Config`` that describe
    the encoder (the CNN, the projection, the positional convolution and the layers).

    :raises ExportError: if the encoder cannot be represented.
    """
    layout = describe_encoder(config)

    encoder = config.encoder_config

    return {
        "hidden_size": encoder.model_dim,
        "num_hidden_layers": encoder.num_encoder_layers,
        "num_attention_heads": encoder.num_encoder_attn_heads,
        "intermediate_size": encoder.ffn_inner_dim,
        "hidden_act": "gelu",
        "hidden_dropout": encoder.dropout_p,
        "activation_dropout": encoder.ffn_inner_dropout_p,
        "attention_dropout": encoder.attn_dropout_p,
        "feat_proj_dropout": encoder.first_pass_dropout_p,
        "layerdrop": encoder.layer_drop_p,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": "layer" if layout.conv_layer_norm else "group",
        "feat_extract_activation": "gelu",
        "conv_dim": [channels for channels, _, _ in layout.conv_layers],
        "conv_kernel": [kernel for _, kernel, _ in layout.conv_layers],
        "conv_stride": [stride for _, _, stride in layout.conv_layers],
        "conv_bias": layout.conv_bias,
        "num_conv_pos_embeddings": encoder.pos_conv_kernel_size,
        "num_conv_pos_embedding_groups": encoder.num_pos_conv_groups,
        "do_stable_layer_norm": layout.layer_norm_first,
        "mask_time_length": config.temporal_mask_span_len,
    }


def _codebook_kwargs(config: EncoderModelConfig) -> dict[str, object]:
    """The quantizer's shape, which ``transformers.Wav2Vec2Config`` records though the
    exported ``Wav2Vec2Model`` has no quantizer."""
    if isinstance(config, Wav2Vec2KnnVqConfig):
        return {
            "num_codevector_groups": config.quantizer.num_codebooks,
            "num_codevectors_per_group": config.quantizer.codebook_size,
        }

    if isinstance(config, Wav2Vec2Config):
        return {
            "num_codevector_groups": config.num_codebooks,
            "num_codevectors_per_group": config.num_codebook_entries,
        }

    return {}


def huggingface_config(config: EncoderModelConfig) -> transformers.Wav2Vec2Config:
    """:raises ExportError: if the encoder cannot be represented."""
    transformers = import_transformers()

    return transformers.Wav2Vec2Config(**encoder_config_kwargs(config), **_codebook_kwargs(config))


def huggingface_feature_extractor(
    config: EncoderModelConfig, *, normalize_audio: bool
) -> transformers.Wav2Vec2FeatureExtractor:
    """:param normalize_audio: Whether the model was trained on standardized waveforms; the
    feature extractor then standardizes its inputs the same way."""
    transformers = import_transformers()

    return transformers.Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=normalize_audio,
        # As in transformers' own wav2vec2 checkpoints: group-norm CNNs take zero-padded
        # batches without a mask, layer-norm ones take the mask.
        return_attention_mask=describe_encoder(config).conv_layer_norm,
    )


def huggingface_encoder_state_dict(model: Module, config: EncoderModelConfig, hf_model: Module) -> dict[str, Tensor]:
    """:returns: The encoder's weights under the names of ``hf_model`` (a Hugging Face
    ``Wav2Vec2Model``), with the masked-frame embedding where ``hf_model`` has one."""
    state_dict = encoder_state_dict(model, config)

    embed = mask_embedding(model)

    if embed is not None and "masked_spec_embed" in hf_model.state_dict():
        state_dict["masked_spec_embed"] = embed

    return state_dict


def to_huggingface(model: Module, config: EncoderModelConfig) -> transformers.Wav2Vec2Model:
    """:param model: A ``wav2vec2_knnvq``, fairseq2 ``wav2vec2`` or ``wav2vec2_asr``
        model; only its encoder is taken.

    :returns: A Hugging Face ``Wav2Vec2Model`` in eval mode with the encoder's weights.

    :raises ExportError: if the encoder cannot be represented.
    """
    transformers = import_transformers()

    hf_model = transformers.Wav2Vec2Model(huggingface_config(config))

    hf_model.load_state_dict(huggingface_encoder_state_dict(model, config, hf_model), strict=True)

    return hf_model.eval()


def export_huggingface(model: Module, config: EncoderModelConfig, output_dir: Path, *, normalize_audio: bool) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` to
    ``output_dir``; load them with ``transformers.Wav2Vec2Model.from_pretrained(output_dir)``
    and ``transformers.AutoFeatureExtractor.from_pretrained(output_dir)``.

    :param normalize_audio: Whether the model was trained on standardized waveforms; the
        feature extractor then standardizes its inputs the same way.

    :returns: ``output_dir``.
    """
    hf_model = to_huggingface(model, config)

    output_dir.mkdir(parents=True, exist_ok=True)

    hf_model.save_pretrained(output_dir, safe_serialization=True)

    huggingface_feature_extractor(config, normalize_audio=normalize_audio).save_pretrained(output_dir)

    return output_dir
