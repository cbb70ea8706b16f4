"""Fixed windows of long recordings as manifest entries.

A manifest entry ``path/to/file.flac:START:LENGTH<TAB>LENGTH`` (fairseq's ``path:start:frames``
convention) stands for ``LENGTH`` samples of the file from sample ``START``. The readers
decode only that window (:func:`read_window`, ``soundfile`` seeks to it), so reading a
15-second window of a 30-minute recording costs what reading a 15-second file does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import soundfile

_WINDOW: Final = re.compile(r"(?P<path>.+):(?P<start>\d+):(?P<length>\d+)")


@dataclass(frozen=True, kw_only=True)
class AudioWindow:
    path: str
    """The file, relative to the manifest's audio root."""

    start: int

    length: int


def parse_window(entry_path: str) -> AudioWindow | None:
    """The window that a manifest entry's path names, or ``None`` for a whole file."""
    match = _WINDOW.fullmatch(entry_path)

    if match is None:
        return None

    return AudioWindow(path=match["path"], start=int(match["start"]), length=int(match["length"]))


def window_entry(path: str, start: int, length: int) -> str:
    return f"{path}:{start}:{length}"


def split_into_windows(num_samples: int, window_len: int, min_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of consecutive windows of ``window_len`` samples; a last window
    shorter than ``min_len`` is left out."""
    windows = [(start, min(window_len, num_samples - start)) for start in range(0, num_samples, window_len)]

    return [(start, length) for start, length in windows if length >= min_len]


def read_window(file: Path, start: int, length: int) -> tuple[np.ndarray, int]:
    """Decodes ``length`` samples of ``file`` from sample ``start``, and only those.

    :returns: ``(frames, channels)`` float32 samples and the sample rate.
    :raises RuntimeError: as ``soundfile`` reports a file it cannot read.
    """
    with soundfile.SoundFile(file) as audio:
        audio.seek(start)

        samples = audio.read(length, dtype="float32", always_2d=True)

        return samples, audio.samplerate
