"""Exports a wav2vec 2.0 model of a run for Hugging Face ``transformers`` and/or torchaudio.

The run's model family (``checkpoints/model.yaml``) decides what is exported:

- ``wav2vec2_knnvq`` (pretraining) and fairseq2's ``wav2vec2`` (the SSL recipe's baseline):
  the encoder; the quantizer has no counterpart there.
- ``wav2vec2_asr`` (CTC fine-tuning): the whole CTC model with the run's character tokenizer.

Examples::

    python tools/export_checkpoint.py OUT_DIR exported/ --format hf torchaudio
    python tools/export_checkpoint.py OUT_DIR/checkpoints/step_5000 exported/ --format hf
    python tools/export_checkpoint.py FINETUNE_DIR exported/ --checkpoint best

``exported/hf`` loads with ``transformers.Wav2Vec2Model.from_pretrained`` (an encoder) or
``transformers.Wav2Vec2ForCTC.from_pretrained`` and transcribes with
``transformers.pipeline("automatic-speech-recognition", model="exported/hf")`` (a CTC model);
``exported/torchaudio`` holds ``wav2vec2_model_args.json`` (the keyword arguments of
``torchaudio.models.wav2vec2_model``), ``wav2vec2_model.pt`` (its state dict; the CTC head
is its ``aux`` layer) and, of a CTC model, ``labels.json`` (the label of each class).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.export import EXPORT_FORMATS, ExportError, export_source, load_export_source
from w2v_knnvq.runs import CheckpointChoice, RunCheckpointError
from w2v_knnvq.tool import tool_parser


def _checkpoint_choice(value: str) -> CheckpointChoice:
    if value in ("best", "last"):
        return value

    if value.isdigit():
        return int(value)

    raise argparse.ArgumentTypeError(f"must be a step number, 'best' or 'last', but is '{value}' instead")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(__doc__)

    parser.add_argument(
        "model",
        help="a run's output directory, checkpoints/step_N directory or sdp_00.pt file, or a wav2vec2_knnvq or wav2vec2 asset card name",
    )
    parser.add_argument("output_dir", type=Path, help="receives hf/ and/or torchaudio/")
    parser.add_argument(
        "--checkpoint",
        "--step",
        type=_checkpoint_choice,
        help="step number, 'best' or 'last' to load from an output directory (default: the last)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="CTC tokenizer (asset card or .model file) of a fine-tuning run (default: the one its config.yaml names)",
    )
    parser.add_argument("--format", nargs="+", choices=EXPORT_FORMATS, default=list(EXPORT_FORMATS))

    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    try:
        source = load_export_source(args.model, checkpoint=args.checkpoint, tokenizer_path=args.tokenizer)

        for written in export_source(source, args.output_dir, args.format):
            print(f"wrote {written}", file=sys.stderr)
    except (RunCheckpointError, ExportError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    if source.normalize_audio:
        print(
            "note: the model was trained on standardized waveforms (zero mean, unit variance); the Hugging Face "
            "feature extractor does this, torchaudio inputs must be standardized the same way",
            file=sys.stderr,
        )

    return 0


if __name__ == "__main__":
    sys.exit(main())
