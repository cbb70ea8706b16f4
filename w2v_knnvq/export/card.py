"""The model card (``README.md``) of a Hugging Face export: what the model is, how it was
trained and measured, and the conventions a user needs, read from the run it came from."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fairseq2.models.transformer import TransformerNormOrder
from fairseq2.models.wav2vec2 import Wav2Vec2EncoderConfig

from w2v_knnvq import __version__
from w2v_knnvq.quantizer import QuantizerConfig
from w2v_knnvq.report import EVALUATION_FILE
from w2v_knnvq.runs import RunCheckpoint, read_validation_records


def model_card(
    *,
    title: str,
    checkpoint: str,
    encoder_config: Wav2Vec2EncoderConfig,
    quantizer: QuantizerConfig | None,
    run: RunCheckpoint | None,
    normalize_audio: bool,
    ctc: bool,
) -> str:
    """The card of one export.

    :param title: What the card is named after (the run directory or the asset card).
    :param encoder_config: fairseq2's ``Wav2Vec2EncoderConfig`` of the model.
    :param quantizer: The KNN-VQ quantizer of a pretraining model; ``None`` for fairseq2's
        Gumbel quantizer or a CTC model.
    :param run: The run it came from, if it was loaded from one: its ``config.yaml``, its last
        validation record and the splits of any ASR evaluation (``evaluation.json``) under it
        go into the card.
    """
    tags = ["wav2vec2", "w2v-knnvq", "automatic-speech-recognition" if ctc else "self-supervised-learning"]

    lines = [
        "---",
        "license: mit",
        "library_name: transformers",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# {title}",
        "",
    ]

    if ctc:
        lines.append("A wav2vec 2.0 model fine-tuned for speech recognition with a CTC head, trained with w2v-knnvq (fairseq2).")  # fmt: skip
    else:
        lines.append("A wav2vec 2.0 encoder pretrained with w2v-knnvq (fairseq2).")

    lines += ["", "## Model", "", "| setting | value |", "|---|---|"]

    lines += _encoder_rows(encoder_config)

    if quantizer is not None:
        lines += [
            f"| quantizer | `{quantizer.method}`, {quantizer.num_codebooks} x {quantizer.codebook_size} codes |",
            f"| KNN regularizer | K = {quantizer.knn_k}, {quantizer.knn_scope} scope |"
            if quantizer.spec.regularizer == "knn"
            else f"| regularizer | {quantizer.spec.regularizer} |",
        ]

    if run is not None:
        lines += _training_rows(run)

        lines += _validation_section(run)

        lines += _asr_section(run)

    lines += [
        "",
        "## Use",
        "",
        f"Input: 16 kHz mono waveforms, {_normalization(normalize_audio)}, as in training.",
        "Layer L (0-based) of w2v-knnvq's feature extraction is `hidden_states[L + 1]`; for a pre-norm model the",
        "last entry adds the final layer norm, as `last_hidden_state` does.",
        "",
        "Padding: the CNN of wav2vec 2.0 base normalizes each channel over time (group norm), over the padding",
        "too, so a padded utterance in a batch gets other features than alone, even with an attention mask.",
        "Pass one utterance per batch, or use an architecture whose CNN uses layer norm (as wav2vec 2.0 large).",
        "",
        "## How it was produced",
        "",
        f"Exported by w2v-knnvq {__version__} (`w2v-knnvq-export`) from `{checkpoint}`.",
        "",
    ]

    return "\n".join(lines)


def _normalization(normalize_audio: bool) -> str:
    return "standardized per utterance (`do_normalize`)" if normalize_audio else "not standardized"


def _encoder_rows(config: Wav2Vec2EncoderConfig) -> list[str]:
    norm = "pre" if config.norm_order == TransformerNormOrder.PRE else "post"

    cnn_norm = "layer" if config.feature_extractor_layer_norm_convs else "group"

    return [
        f"| Transformer | {config.num_encoder_layers} layers of {config.model_dim} dimensions, "
        f"{config.num_encoder_attn_heads} heads, FFN {config.ffn_inner_dim}, {norm}-norm |",
        f"| CNN | {len(config.feature_extractor_layer_descs)} layers, {config.feature_dim} channels, {cnn_norm} norm |",
    ]


def _training_rows(run: RunCheckpoint) -> list[str]:
    manifest_dir = _nested(run.recipe_config, "dataset", "config_overrides", "manifest_dir")

    rows = [
        f"| training data | `{manifest_dir}`, split `{run.recipe_option('dataset', 'train_split')}` |",
        f"| steps | {run.step} of {run.recipe_option('regime', 'num_steps')} |",
    ]

    arch = run.recipe_option("model", "arch")

    if arch is not None:
        rows.append(f"| architecture preset | `{arch}` |")

    return rows


def _validation_section(run: RunCheckpoint) -> list[str]:
    records = [record for record in read_validation_records(run.run_dir) if record.get("Step") == run.step]

    if not records:
        return []

    record = records[-1]

    wanted = ("Codebook Usage", "Code Perplexity", "Accuracy", "Word Error Rate (WER)", "Unit Error Rate (UER)")

    rows = [f"| {name} | {_format(record[name])} |" for name in wanted if name in record]

    if not rows:
        return []

    return ["", f"## Validation at step {run.step}", "", "| metric | value |", "|---|---|", *rows]


def _asr_section(run: RunCheckpoint) -> list[str]:
    rows = []

    for file in sorted(run.run_dir.rglob(EVALUATION_FILE)):
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue

        records = document.get("splits") if isinstance(document, dict) else None

        for record in records if isinstance(records, list) else []:
            # Only ASR evaluations have error rates.
            if not isinstance(record, dict) or not {"wer", "cer", "split"} <= record.keys():
                continue

            row = f"| {record['split']} | {record['wer']:.2f} | {record['cer']:.2f} |"

            beam = record.get("beam_search")

            row += f" {beam['wer']:.2f} | {beam['cer']:.2f} |" if isinstance(beam, dict) else " | |"

            rows.append(row)

    if not rows:
        return []

    header = "| split | WER greedy | CER greedy | WER with LM | CER with LM |"

    return ["", "## Speech recognition", "", header, "|---|---|---|---|---|", *rows]


def _nested(mapping: Mapping[str, object], *keys: str) -> object:
    value: object = mapping

    for key in keys:
        if not isinstance(value, Mapping):
            return None

        value = value.get(key)

    return value


def _format(value: object) -> str:
    if isinstance(value, list):
        return " / ".join(_format(item) for item in value)

    if isinstance(value, float):
        return f"{value:.4g}"

    return str(value)
