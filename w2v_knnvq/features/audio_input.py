"""Audio input for feature extraction: reading files, mixing down, resampling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import numpy as np
import soundfile
import torch
import torchaudio.functional
from torch import Tensor

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.data.windows import parse_window, read_window

MODEL_SAMPLE_RATE: Final = SAMPLE_RATE
"""The sample rate every wav2vec 2.0 model of this project is trained on."""

log = logging.getLogger(__name__)

# Mixing down is worth one warning per process, not one per file of a corpus.
_warned_multichannel = False


class AudioInputError(ValueError):
    """Audio that cannot be turned into model input; the message names the source and the fix."""


def read_audio(path: Path) -> tuple[Tensor, int]:
    """Reads an audio file as float32 samples.

    Multichannel audio is mixed down to mono (with a warning, said once).

    :returns: ``(S,)`` samples in ``[-1, 1]`` and the file's sample rate.

    :param path: A file, or a window of one as a manifest names it
        (``file.flac:START:LENGTH``, :mod:`w2v_knnvq.data.windows`), of which only the
        window is decoded.

    :raises AudioInputError: if the file is missing, unreadable or holds no samples.
    """
    window = parse_window(path.name)

    file = path if window is None else path.with_name(window.path)

    if not file.is_file():
        raise AudioInputError(f"{file}: no such audio file; check the path or the manifest's root directory.")

    try:
        if window is None:
            samples, sample_rate = soundfile.read(file, dtype="float32", always_2d=True)
        else:
            samples, sample_rate = read_window(file, window.start, window.length)
    # soundfile reports every decoding failure as a RuntimeError subclass.
    except RuntimeError as ex:
        raise AudioInputError(
            f"{path}: unreadable by soundfile ({ex}); re-encode the file (e.g. as FLAC or WAV) or remove it."
        ) from ex

    if samples.shape[0] == 0:
        raise AudioInputError(f"{path}: contains no audio samples; remove it from the input.")

    return to_mono(torch.from_numpy(np.ascontiguousarray(samples.T)), source=str(path)), sample_rate


def to_mono(waveform: Tensor, *, source: str) -> Tensor:
    """:param waveform: ``(S,)`` mono or ``(C, S)`` multichannel samples.
    :returns: ``(S,)`` samples; channels are averaged."""
    global _warned_multichannel

    if waveform.ndim == 1:
        return waveform

    if waveform.ndim != 2:
        raise AudioInputError(
            f"{source}: a waveform must have shape (S,) or (C, S), but has shape {tuple(waveform.shape)}."
        )

    if waveform.size(0) == 1:
        return waveform[0]

    if not _warned_multichannel:
        log.warning(
            "%s has %d channels; mixing multichannel audio down to mono by averaging (said once).",
            source,
            waveform.size(0),
        )

        _warned_multichannel = True

    return waveform.mean(dim=0)


MIN_SAMPLE_RATE: Final = 1_000
"""No recording is sampled below 1 kHz; a smaller rate is a rate in kHz or a mistake, which
resampling would turn into a thousandfold longer waveform."""


def prepare_waveform(waveform: Tensor | np.ndarray, sample_rate: int, *, source: str) -> Tensor:
    """Makes one utterance model input: mono, float32, at :data:`MODEL_SAMPLE_RATE`.

    :param waveform: ``(S,)`` or ``(C, S)`` samples, a tensor or a NumPy array.
    :returns: ``(S_16k,)`` samples.

    :raises AudioInputError: on an empty waveform, a rate below :data:`MIN_SAMPLE_RATE`
        (a rate in kHz, most likely), NaN/inf samples, or an array that holds no numbers.
    """
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioInputError(
            f"{source}: the sample rate must be at least {MIN_SAMPLE_RATE} Hz, but is {sample_rate} instead; "
            f"sample rates are in Hz (16 kHz is {MODEL_SAMPLE_RATE})."
        )

    if isinstance(waveform, np.ndarray):
        if not np.issubdtype(waveform.dtype, np.number):
            raise AudioInputError(f"{source}: a waveform must hold numbers, but has dtype {waveform.dtype} instead.")

        samples = torch.from_numpy(np.ascontiguousarray(waveform))
    else:
        samples = waveform

    mono = to_mono(samples, source=source).float()

    if mono.numel() == 0:
        raise AudioInputError(f"{source}: contains no audio samples; remove it from the input.")

    if not torch.isfinite(mono).all():
        raise AudioInputError(f"{source}: contains NaN or infinite samples; fix or remove the audio.")

    if sample_rate != MODEL_SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, sample_rate, MODEL_SAMPLE_RATE)

    return mono
