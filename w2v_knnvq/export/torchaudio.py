"""Exports the encoder as a torchaudio ``wav2vec2_model`` state dict plus the JSON
of the builder's keyword arguments; the CTC head of a ``wav2vec2_asr`` model becomes
torchaudio's ``aux`` layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import Module
from torchaudio.models import Wav2Vec2Model as TorchaudioWav2Vec2Model
from torchaudio.models import wav2vec2_model

from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig

from w2v_knnvq.export.encoder import EncoderModelConfig, ExportError, describe_encoder, encoder_state_dict

TORCHAUDIO_ARGS_FILE = "wav2vec2_model_args.json"
"""``torchaudio.models.wav2vec2_model(**json.load(...))`` builds the model."""

TORCHAUDIO_STATE_DICT_FILE = "wav2vec2_model.pt"

TORCHAUDIO_LABELS_FILE = "labels.json"
"""The CTC head's label of each class id, a JSON list (written for CTC models only):
``"<pad>"`` is the blank, ``"|"`` the word delimiter."""


def torchaudio_builder_args(config: EncoderModelConfig) -> dict[str, object]:
    """:returns: The keyword arguments of ``torchaudio.models.wav2vec2_model`` (JSON-serializable);
        ``aux_num_out`` is the CTC head's output size of a ``wav2vec2_asr`` model, else ``None``.

    :raises ExportError: if the encoder cannot be represented.
    """
    layout = describe_encoder(config)

    encoder = config.encoder_config

    return {
        "extractor_mode": "layer_norm" if layout.conv_layer_norm else "group_norm",
        "extractor_conv_layer_config": [list(desc) for desc in layout.conv_layers],
        "extractor_conv_bias": layout.conv_bias,
        "encoder_embed_dim": encoder.model_dim,
        "encoder_projection_dropout": encoder.first_pass_dropout_p,
        "encoder_pos_conv_kernel": encoder.pos_conv_kernel_size,
        "encoder_pos_conv_groups": encoder.num_pos_conv_groups,
        "encoder_num_layers": encoder.num_encoder_layers,
        "encoder_num_heads": encoder.num_encoder_attn_heads,
        "encoder_attention_dropout": encoder.attn_dropout_p,
        "encoder_ff_interm_features": encoder.ffn_inner_dim,
        "encoder_ff_interm_dropout": encoder.ffn_inner_dropout_p,
        "encoder_dropout": encoder.dropout_p,
        "encoder_layer_norm_first": layout.layer_norm_first,
        "encoder_layer_drop": encoder.layer_drop_p,
        "aux_num_out": config.target_vocab_size if isinstance(config, Wav2Vec2AsrConfig) else None,
    }


def torchaudio_state_dict(model: Module, config: EncoderModelConfig) -> dict[str, Tensor]:
    """:returns: The encoder's weights under torchaudio's names, and the CTC head of a
        ``wav2vec2_asr`` model as ``aux``.

    torchaudio nests the projection and the Transformer inside its ``encoder``:
    ``feature_projection.*`` becomes ``encoder.feature_projection.*`` and
    ``encoder.*`` becomes ``encoder.transformer.*``.
    """
    renamed = {}

    for key, value in encoder_state_dict(model, config).items():
        if key.startswith("feature_projection."):
            key = "encoder." + key
        elif key.startswith("encoder."):
            key = "encoder.transformer." + key[len("encoder.") :]

        renamed[key] = value

    if isinstance(config, Wav2Vec2AsrConfig):
        source = model.state_dict()

        for name in ("weight", "bias"):
            renamed[f"aux.{name}"] = source[f"final_proj.{name}"].detach().clone()

    return renamed


def to_torchaudio(model: Module, config: EncoderModelConfig) -> TorchaudioWav2Vec2Model:
    """:returns: A torchaudio ``Wav2Vec2Model`` in eval mode with the encoder's weights
    (and, of a ``wav2vec2_asr`` model, the CTC head as ``aux``: its output is then the
    CTC logits)."""
    ta_model = wav2vec2_model(**torchaudio_builder_args(config))

    ta_model.load_state_dict(torchaudio_state_dict(model, config), strict=True)

    return ta_model.eval()


def export_torchaudio(
    model: Module, config: EncoderModelConfig, output_dir: Path, *, labels: Sequence[str] | None = None
) -> Path:
    """Writes :data:`TORCHAUDIO_ARGS_FILE` and :data:`TORCHAUDIO_STATE_DICT_FILE` to
    ``output_dir``; :func:`load_torchaudio_export` reads them back.

    :param labels: The label of each class of the CTC head, written to
        :data:`TORCHAUDIO_LABELS_FILE` (see :func:`~w2v_knnvq.export.ctc.ctc_vocabulary`).

    :returns: ``output_dir``.

    :raises ExportError: if the encoder cannot be represented, or ``labels`` do not fit
        the CTC head.
    """
    args = torchaudio_builder_args(config)

    if labels is not None and len(labels) != args["aux_num_out"]:
        raise ExportError(
            f"`labels` must hold one label per output of the CTC head ({args['aux_num_out']}), but holds {len(labels)} instead."
        )

    # Building the model proves that the arguments and weights fit before anything is written.
    state_dict = to_torchaudio(model, config).state_dict()

    output_dir.mkdir(parents=True, exist_ok=True)

    (output_dir / TORCHAUDIO_ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")

    torch.save(state_dict, output_dir / TORCHAUDIO_STATE_DICT_FILE)

    if labels is not None:
        (output_dir / TORCHAUDIO_LABELS_FILE).write_text(
            json.dumps(list(labels), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )

    return output_dir


def load_torchaudio_export(export_dir: Path) -> TorchaudioWav2Vec2Model:
    """Builds the torchaudio model that :func:`export_torchaudio` wrote, in eval mode.

    :raises ExportError: if a file is missing.
    """
    args_file = export_dir / TORCHAUDIO_ARGS_FILE
    state_dict_file = export_dir / TORCHAUDIO_STATE_DICT_FILE

    for file in (args_file, state_dict_file):
        if not file.is_file():
            raise ExportError(
                f"{file}: missing; export the checkpoint again with `tools/export_checkpoint.py --format torchaudio`."
            )

    args = json.loads(args_file.read_text())

    args["extractor_conv_layer_config"] = [tuple(desc) for desc in args["extractor_conv_layer_config"]]

    ta_model = wav2vec2_model(**args)

    ta_model.load_state_dict(torch.load(state_dict_file, map_location="cpu", weights_only=True), strict=True)

    return ta_model.eval()
