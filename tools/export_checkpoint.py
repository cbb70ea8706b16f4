"""Exports the encoder of a pretrained ``wav2vec2_knnvq`` model for Hugging Face
``transformers`` and/or torchaudio.

Examples::

    python tools/export_checkpoint.py OUT_DIR exported/ --format hf torchaudio
    python tools/export_checkpoint.py OUT_DIR/checkpoints/step_5000 exported/ --format hf

``exported/hf`` loads with ``transformers.Wav2Vec2Model.from_pretrained``;
``exported/torchaudio`` holds ``wav2vec2_model_args.json`` (the keyword arguments of
``torchaudio.models.wav2vec2_model``) and ``wav2vec2_model.pt`` (its state dict).
Only the encoder is exported; the quantizer has no counterpart there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.export import ExportError, export_huggingface, export_torchaudio
from w2v_knnvq.features import PretrainedModelError, load_pretrained_model


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    parser.add_argument(
        "model", help="pretraining output directory, checkpoints/step_N directory, sdp_00.pt file, or asset card name"
    )
    parser.add_argument("output_dir", type=Path, help="receives hf/ and/or torchaudio/")
    parser.add_argument("--step", type=int, help="training step to load from an output directory (default: the last)")
    parser.add_argument("--format", nargs="+", choices=("hf", "torchaudio"), default=["hf", "torchaudio"])

    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    try:
        pretrained = load_pretrained_model(args.model, step=args.step)

        for export_format in args.format:
            if export_format == "hf":
                written = export_huggingface(
                    pretrained.model,
                    pretrained.config,
                    args.output_dir / "hf",
                    normalize_audio=pretrained.normalize_audio,
                )
            else:
                written = export_torchaudio(pretrained.model, pretrained.config, args.output_dir / "torchaudio")

            print(f"wrote {written}", file=sys.stderr)
    except (PretrainedModelError, ExportError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    if pretrained.normalize_audio:
        print(
            "note: the model was pretrained on standardized waveforms (zero mean, unit variance); standardize inputs the same way",
            file=sys.stderr,
        )

    return 0


if __name__ == "__main__":
    sys.exit(main())
