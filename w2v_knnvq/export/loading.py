"""Loads what ``tools/export_checkpoint.py`` exports: the model of a run (or of an asset
card) with what its export needs, chosen by the run's model family.

- ``wav2vec2_knnvq`` (this project's pretraining) and fairseq2's ``wav2vec2`` (the SSL
  recipe's baseline): the encoder, as a Hugging Face ``Wav2Vec2Model`` or a torchaudio
  ``wav2vec2_model``;
- ``wav2vec2_asr`` (the fine-tuning recipe): the CTC model with the run's character
  tokenizer, as a Hugging Face ``Wav2Vec2ForCTC`` directory or a torchaudio model whose
  ``aux`` layer is the CTC head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Literal, TypeVar

from torch.nn import Module

from fairseq2.assets import AssetCardError
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.models import ModelHub
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY
from fairseq2.models.wav2vec2.asr import (
    WAV2VEC2_ASR_FAMILY,
    Wav2Vec2AsrConfig,
    Wav2Vec2AsrModel,
    get_wav2vec2_asr_model_hub,
)
from fairseq2.runtime.dependency import get_dependency_resolver
from fairseq2.utils.validation import ValidationError

from w2v_knnvq.export.card import model_card
from w2v_knnvq.export.ctc import ctc_vocabulary, export_huggingface_ctc
from w2v_knnvq.export.encoder import EncoderModelConfig
from w2v_knnvq.export.huggingface import export_huggingface
from w2v_knnvq.export.torchaudio import export_torchaudio
from w2v_knnvq.features.loading import load_pretrained_model
from w2v_knnvq.files import write_atomically
from w2v_knnvq.quantizer import QuantizerConfig
from w2v_knnvq.runs import (
    CheckpointChoice,
    RunCheckpoint,
    RunCheckpointError,
    find_run_checkpoint,
    load_run_model,
    run_normalize_audio,
)
from w2v_knnvq.text.tokenizer import check_vocab_size, finetuning_tokenizer_path, load_ctc_tokenizer
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY

ExportFormat = Literal["hf", "torchaudio"]

EXPORT_FORMATS: Final[tuple[ExportFormat, ...]] = ("hf", "torchaudio")
"""Each format is written to a subdirectory of that name."""

EXPORTABLE_FAMILIES: Final = (WAV2VEC2_KNNVQ_FAMILY, WAV2VEC2_FAMILY, WAV2VEC2_ASR_FAMILY)

ModelT = TypeVar("ModelT", bound=Module)
ConfigT = TypeVar("ConfigT")


@dataclass(kw_only=True)
class EncoderExportSource:
    """A ``wav2vec2_knnvq`` or ``wav2vec2`` model, of which the encoder is exported."""

    model: Module
    """In eval mode."""

    config: EncoderModelConfig

    checkpoint: str
    """The checkpoint directory or asset card it was loaded from."""

    normalize_audio: bool
    """Whether the model was trained on standardized waveforms."""

    run: RunCheckpoint | None = None
    """The run it was loaded from, if any (its settings and figures go into the model card)."""


@dataclass(kw_only=True)
class CtcExportSource:
    """A fine-tuned ``wav2vec2_asr`` model with the tokenizer of its CTC head."""

    model: Wav2Vec2AsrModel
    """In eval mode."""

    config: Wav2Vec2AsrConfig

    tokenizer: Tokenizer

    tokenizer_path: Path

    checkpoint: str
    """The checkpoint directory it was loaded from."""

    normalize_audio: bool
    """Whether the model was fine-tuned on standardized waveforms."""

    run: RunCheckpoint | None = None
    """The fine-tuning run (its settings and evaluations go into the model card)."""


ExportSource = EncoderExportSource | CtcExportSource


def load_export_source(
    source: str | Path, *, checkpoint: CheckpointChoice | None = None, tokenizer_path: Path | None = None
) -> ExportSource:
    """Loads the model that ``source`` names, in eval mode, by its model family.

    :param source: A run's output directory, its ``checkpoints`` directory, one
        ``checkpoints/step_N`` directory or a file in one; or the name of a
        ``wav2vec2_knnvq`` or ``wav2vec2`` asset card with a checkpoint.
    :param checkpoint: A step number, ``"last"`` or ``"best"``; ``None`` takes the step
        ``source`` names, else the last.
    :param tokenizer_path: The CTC tokenizer of a ``wav2vec2_asr`` run (its asset card or
        ``.model`` file); ``None`` takes the one the run's ``config.yaml`` names.

    :raises RunCheckpointError: if nothing exportable is found; the message names the file
        and the fix.
    """
    # Initializes fairseq2 (and with it this project's extension) on first use.
    get_dependency_resolver()

    path = Path(source)

    if not path.exists():
        if checkpoint is not None:
            raise RunCheckpointError(
                f"{source}: does not exist; a checkpoint ({checkpoint}) can only be chosen from the output directory of a run."
            )

        _check_no_tokenizer(tokenizer_path, str(source))

        return _load_encoder_source(source, None)

    run = find_run_checkpoint(path, checkpoint=checkpoint)

    if run.family == WAV2VEC2_ASR_FAMILY:
        return _load_ctc_source(run, tokenizer_path)

    if run.family not in EXPORTABLE_FAMILIES:
        families = ", ".join(f"`{family}`" for family in EXPORTABLE_FAMILIES)

        raise RunCheckpointError(
            f"{run.metadata_file}: holds a `{run.family}` model, but only {families} models can be exported; "
            "give the output directory of a wav2vec 2.0 pretraining or fine-tuning run."
        )

    _check_no_tokenizer(tokenizer_path, f"{run.metadata_file}: holds a `{run.family}` model, which")

    return _load_encoder_source(path, run.step, run)


def _load_encoder_source(source: str | Path, step: int | None, run: RunCheckpoint | None = None) -> EncoderExportSource:
    """Loads a pretraining model through :func:`~w2v_knnvq.features.load_pretrained_model`
    (run paths and asset cards of the ``wav2vec2_knnvq`` and ``wav2vec2`` families)."""
    pretrained = load_pretrained_model(source, step=step)

    return EncoderExportSource(
        model=pretrained.model,
        config=pretrained.config,
        checkpoint=pretrained.source,
        normalize_audio=pretrained.normalize_audio,
        run=run,
    )


def _check_no_tokenizer(tokenizer_path: Path | None, subject: str) -> None:
    """:param subject: What has no CTC head, the start of the error message."""
    if tokenizer_path is not None:
        raise RunCheckpointError(
            f"{subject} has no CTC head; the tokenizer {tokenizer_path} only applies to a "
            f"`{WAV2VEC2_ASR_FAMILY}` model, so drop it."
        )


def _load_run(run: RunCheckpoint, hub: ModelHub[ModelT, ConfigT], family: str) -> tuple[ModelT, ConfigT]:
    """:returns: The model of ``run`` (eval mode, no gradients) and its configuration."""
    try:
        config = hub.get_model_config(run.card)
    except (AssetCardError, ValidationError, ValueError) as ex:
        raise RunCheckpointError(f"{run.metadata_file}: the model configuration cannot be read ({ex}).") from ex

    model = load_run_model(run, hub, family, config=config)

    model.requires_grad_(False)

    return model, config


def _load_ctc_source(run: RunCheckpoint, tokenizer_path: Path | None) -> CtcExportSource:
    model, config = _load_run(run, get_wav2vec2_asr_model_hub(), WAV2VEC2_ASR_FAMILY)

    if tokenizer_path is None:
        tokenizer_path = finetuning_tokenizer_path(
            run, relative_path_fix="give the tokenizer explicitly (`--tokenizer` of tools/export_checkpoint.py)"
        )

    try:
        tokenizer = load_ctc_tokenizer(tokenizer_path)

        check_vocab_size(tokenizer.vocab_info.size, config.target_vocab_size, tokenizer_path)
    except (OSError, ValueError) as ex:
        raise RunCheckpointError(f"The CTC tokenizer of {run.run_dir} cannot be used: {ex}") from None

    return CtcExportSource(
        model=model,
        config=config,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        checkpoint=str(run.model_dir),
        normalize_audio=run_normalize_audio(run),
        run=run,
    )


def export_source(source: ExportSource, output_dir: Path, formats: Sequence[ExportFormat]) -> list[Path]:
    """Writes each of ``formats`` to its subdirectory of ``output_dir`` (``hf/``, ``torchaudio/``).

    :returns: The directories written, in the order of ``formats``.

    :raises ExportError: if the model cannot be represented in a format.
    """
    written = []

    for export_format in formats:
        target_dir = output_dir / export_format

        if isinstance(source, CtcExportSource):
            written.append(_export_ctc(source, export_format, target_dir))
        elif export_format == "hf":
            written.append(
                export_huggingface(source.model, source.config, target_dir, normalize_audio=source.normalize_audio)
            )
        else:
            written.append(export_torchaudio(source.model, source.config, target_dir))

        if export_format == "hf":
            write_atomically(target_dir / "README.md", partial(_write_text, text=_model_card(source)))

    return written


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _model_card(source: ExportSource) -> str:
    run = source.run

    quantizer = getattr(source.config, "quantizer", None)

    return model_card(
        title=run.run_dir.name if run is not None else source.checkpoint,
        checkpoint=source.checkpoint,
        encoder_config=source.config.encoder_config,
        quantizer=quantizer if isinstance(quantizer, QuantizerConfig) else None,
        run=run,
        normalize_audio=source.normalize_audio,
        ctc=isinstance(source, CtcExportSource),
    )


def _export_ctc(source: CtcExportSource, export_format: ExportFormat, target_dir: Path) -> Path:
    if export_format == "hf":
        return export_huggingface_ctc(
            source.model, source.config, source.tokenizer, target_dir, normalize_audio=source.normalize_audio
        )

    return export_torchaudio(source.model, source.config, target_dir, labels=ctc_vocabulary(source.tokenizer))
