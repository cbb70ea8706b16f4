"""Checks that an audio file is fit for wav2vec 2.0 training (listable, readable, finite,
long enough, right rate, mono)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import soundfile

from w2v_knnvq.wav2vec2.lengths import RECEPTIVE_FIELD

SAMPLE_RATE: Final = 16_000
"""The sample rate in Hz of every wav2vec 2.0 model of this project, and so of its audio."""

# Frames decoded at the end of a file: enough to hit the last FLAC frame, cheap enough
# to run on every file of a 960-hour corpus.
_TAIL_FRAMES = 4096

# Block size for a full decode; bounds memory for hour-long files.
_DECODE_BLOCK_FRAMES = 1 << 18


class AudioFileError(ValueError):
    """An audio file that cannot be used as it is; ``reason`` says why and how to fix it."""

    path: Path
    reason: str

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")

        self.path = path
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class AudioInfo:
    """What a manifest needs to know about one audio file."""

    num_samples: int
    """Samples per channel."""

    sample_rate: int

    num_channels: int


def inspect_audio(path: Path, *, sample_rate: int = SAMPLE_RATE, full_decode: bool = False) -> AudioInfo:
    """Reads the header of ``path`` and decodes its tail (or all of it) to prove it is usable.

    :param sample_rate: The required sample rate in Hz.
    :param full_decode: Decode every sample instead of only the last ones; catches
        corruption in the middle of a file at the cost of a full read.

    :raises AudioFileError: if the file's path cannot be a manifest line (a tab or a line
        break), or the file is unreadable, truncated, shorter than wav2vec 2.0's receptive
        field, holds NaN or infinite samples where decoded, is not mono or not at ``sample_rate``.
    """
    if any(character in str(path) for character in "\t\n\r"):
        raise AudioFileError(
            path, "its path holds a tab or a line break, which a manifest line cannot hold; rename the file"
        )

    if path.exists() and not path.is_file():
        # Opening a FIFO or a device would block for good.
        raise AudioFileError(path, "is not a regular file (a FIFO, socket or device); replace it with the audio file")

    try:
        with soundfile.SoundFile(path) as audio:
            info = AudioInfo(
                num_samples=audio.frames,
                sample_rate=audio.samplerate,
                num_channels=audio.channels,
            )

            if info.num_samples > 0:
                num_decoded = _decode(audio, info.num_samples, full_decode)

                if num_decoded != info.num_samples:
                    raise AudioFileError(
                        path,
                        f"truncated: header promises {info.num_samples} samples but only "
                        f"{num_decoded} decode; re-download or remove the file",
                    )
    # soundfile reports every decoding failure as a RuntimeError subclass.
    except RuntimeError as ex:
        raise AudioFileError(path, f"unreadable by soundfile ({ex}); re-download or remove the file") from ex

    if info.num_samples == 0:
        raise AudioFileError(path, "contains no audio samples; remove the file")

    if info.num_samples < RECEPTIVE_FIELD:
        raise AudioFileError(
            path,
            f"has {info.num_samples} samples, fewer than the {RECEPTIVE_FIELD} from which wav2vec 2.0's CNN "
            "makes one frame; remove the file",
        )

    if info.sample_rate != sample_rate:
        raise AudioFileError(
            path,
            f"sample rate is {info.sample_rate} Hz, expected {sample_rate} Hz; "
            f"resample it (e.g. `sox IN.flac -r {sample_rate} OUT.flac`)",
        )

    if info.num_channels != 1:
        raise AudioFileError(
            path,
            f"has {info.num_channels} channels, expected mono; downmix it (e.g. `sox IN.flac -c 1 OUT.flac`)",
        )

    return info


def _decode(audio: soundfile.SoundFile, num_samples: int, full_decode: bool) -> int:
    """Returns the number of samples that decode from the checked range of ``audio``.

    :raises AudioFileError: if a decoded sample is NaN or infinite (a float WAV can hold them).
    """
    start = 0 if full_decode else max(0, num_samples - _TAIL_FRAMES)

    audio.seek(start)

    num_decoded = start

    for block in audio.blocks(blocksize=_DECODE_BLOCK_FRAMES, dtype="float32"):
        if not np.isfinite(block).all():
            raise AudioFileError(
                Path(audio.name),
                f"holds NaN or infinite samples between samples {num_decoded} and {num_decoded + len(block)}; "
                "repair or remove the file",
            )

        num_decoded += len(block)

    return num_decoded
