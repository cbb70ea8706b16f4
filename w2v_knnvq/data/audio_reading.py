"""Reading the audio of manifest utterances so that one bad file does not end a run.

A file can vanish, be truncated or be rewritten after its manifest was made. The readers
decode each utterance with :class:`AudioLoader`, which returns the reason instead of
raising; :class:`AudioReadTracker` drops such utterances from their batch with a warning
naming the file, counts them for the logged metrics, and stops the run with
:class:`BadAudioBudgetError`, naming the files, only when the skips pass
``max_bad_audio_fraction`` of the reads.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

import torch
from torch import Tensor

from fairseq2.data.audio import AudioDecoder, AudioDecoderOutput
from fairseq2.data.data_pipeline import FileMapper
from fairseq2.logging import log

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.data.windows import AudioWindow, parse_window, read_window

DEFAULT_MAX_BAD_AUDIO_FRACTION: Final = 0.001

_MAX_LISTED_FILES: Final = 20


class AudioCheckError(ValueError):
    """A decoded utterance that the models cannot take; the message says why."""


def bad_audio_fraction_error(fraction: float) -> str | None:
    """The validation error of a ``max_bad_audio_fraction`` setting, or ``None`` if it is valid."""
    if 0.0 <= fraction <= 1.0:
        return None

    return f"`max_bad_audio_fraction` must be between 0 and 1, but is {fraction} instead."


def check_decoded_audio(decoded: AudioDecoderOutput) -> Tensor:
    """Checks the output of fairseq2's ``AudioDecoder`` and returns its samples (see
    :func:`check_waveform`)."""
    return check_waveform(decoded["waveform"], decoded["sample_rate"])


def check_waveform(waveform: Tensor, sample_rate: float) -> Tensor:
    """Checks decoded audio, ``(S_wav, C)`` or ``(S_wav,)``, and returns its samples.

    :returns: *Shape:* ``(S_wav,)``.
    :raises AudioCheckError: if the audio is not 16 kHz mono, holds NaN or infinite samples,
        or is digital silence (a corpus of it trains to perfect accuracy on nothing).
    """
    if sample_rate != SAMPLE_RATE:
        raise AudioCheckError(f"it is sampled at {sample_rate:g} Hz, expected {SAMPLE_RATE} Hz; resample it")

    if waveform.ndim == 2:
        if waveform.size(1) != 1:
            raise AudioCheckError(f"it has {waveform.size(1)} channels, expected mono; downmix it")

        waveform = waveform.squeeze(1)

    if not torch.isfinite(waveform).all():
        raise AudioCheckError("it contains NaN or infinite samples")

    if not waveform.any():
        raise AudioCheckError("every sample is 0, digital silence that teaches the model nothing; remove it")

    return waveform


@final
class ReadWatchdog:
    """Names the audio reads that take too long: a hung network mount otherwise stalls a run
    without a word. Reads register with :meth:`reading`; a daemon thread, started with the
    first read, warns about each read older than ``threshold_s`` (and again each time it
    has waited that long once more), naming the file."""

    def __init__(self, threshold_s: float = 60.0) -> None:
        self._threshold_s = threshold_s
        self._lock = threading.Lock()
        self._reads: dict[int, tuple[str, float]] = {}
        self._warned: dict[int, int] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def reading(self, path: str) -> Iterator[None]:
        key = next(self._ids)

        with self._lock:
            self._reads[key] = (path, time.monotonic())

            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="audio-read-watchdog", daemon=True)
                self._thread.start()

        try:
            yield
        finally:
            with self._lock:
                del self._reads[key]

                self._warned.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self._threshold_s / 4))

            now = time.monotonic()

            with self._lock:
                stalled = []

                for key, (path, start) in self._reads.items():
                    periods = int((now - start) / self._threshold_s)

                    if periods > self._warned.get(key, 0):
                        self._warned[key] = periods

                        stalled.append((path, now - start))

            for path, waited in stalled:
                log.warning(
                    "Reading {} has taken {:.0f} s so far; the file system may be stalled (a hung network mount?).",
                    path,
                    waited,
                )


READ_WATCHDOG: Final = ReadWatchdog()
"""The watchdog of every :class:`AudioLoader`: names a read after a minute."""


@final
class AudioLoader:
    """Maps the path of an utterance, relative to ``audio_dir``, to
    ``{"path": path, "file": full_path, "waveform": Tensor}`` or, if the file cannot be used,
    ``{"path": path, "file": full_path, "error": reason}``. Runs inside the data
    pipeline's threads."""

    def __init__(self, audio_dir: Path) -> None:
        self._audio_dir = audio_dir
        self._file_mapper = FileMapper(audio_dir, cached_fd_count=100)
        self._decoder = AudioDecoder(dtype=torch.float32)

    def __call__(self, path: str) -> dict[str, Any]:
        """:param path: A manifest entry's path: a file, or a window of one
        (:mod:`w2v_knnvq.data.windows`), of which only the window is decoded."""
        window = parse_window(path)

        full_path = str(self._audio_dir / (path if window is None else window.path))

        with READ_WATCHDOG.reading(full_path):
            return self._load(path, full_path, window)

    def _load(self, path: str, full_path: str, window: AudioWindow | None) -> dict[str, Any]:
        try:
            mode = os.stat(full_path).st_mode
        except OSError:
            mode = None

        if mode is not None and not stat.S_ISREG(mode):
            # Reading a FIFO or a device would block the reader for good.
            return {"path": path, "file": full_path, "error": "it is not a regular file (a FIFO, socket or device)"}

        if window is not None:
            if mode is None:
                return {"path": path, "file": full_path, "error": "it does not exist"}

            return self._load_window(path, full_path, window)

        try:
            data = self._file_mapper(path)["data"]
        except (RuntimeError, OSError):
            # fairseq2's `ByteStreamError` (a `RuntimeError`) says whether the file is
            # missing or unreadable, but the path is in the warning already.
            reason = "it does not exist" if not Path(full_path).exists() else "it cannot be read"

            return {"path": path, "file": full_path, "error": reason}

        try:
            decoded = self._decoder(data)
        except (RuntimeError, ValueError):
            reason = "it cannot be decoded as audio; it may be truncated or corrupt"

            return {"path": path, "file": full_path, "error": reason}

        try:
            waveform = check_decoded_audio(decoded)
        except AudioCheckError as ex:
            return {"path": path, "file": full_path, "error": str(ex)}

        return {"path": path, "file": full_path, "waveform": waveform}

    def _load_window(self, path: str, full_path: str, window: AudioWindow) -> dict[str, Any]:
        try:
            samples, sample_rate = read_window(Path(full_path), window.start, window.length)
        except RuntimeError:
            reason = "its window cannot be decoded as audio; it may be truncated or corrupt"

            return {"path": path, "file": full_path, "error": reason}

        try:
            waveform = check_waveform(torch.from_numpy(samples), sample_rate)
        except AudioCheckError as ex:
            return {"path": path, "file": f"{full_path} (window {window.start}:{window.length})", "error": str(ex)}

        return {"path": path, "file": full_path, "waveform": waveform}


@dataclass(frozen=True)
class SkippedAudio:
    path: str

    reason: str


class BadAudioBudgetError(Exception):
    """More utterances of a split could not be used than ``max_bad_audio_fraction`` allows."""

    def __init__(
        self, manifest_file: Path, skipped: Sequence[SkippedAudio], num_read: int, max_fraction: float
    ) -> None:
        listed = "; ".join(f"{item.path} ({item.reason})" for item in skipped[:_MAX_LISTED_FILES])

        if len(skipped) > _MAX_LISTED_FILES:
            listed += f"; and {len(skipped) - _MAX_LISTED_FILES} more"

        super().__init__(
            f"{len(skipped)} of the {num_read} utterances read from {manifest_file} could not be used, more than "
            f"`dataset.max_bad_audio_fraction` ({max_fraction:g}) allows: {listed}. Repair or remove these files and "
            "rebuild the manifest with tools/make_manifest.py (which checks every file), or raise "
            "`dataset.max_bad_audio_fraction`."
        )

        self.manifest_file = manifest_file
        self.skipped = list(skipped)


@final
class AudioReadTracker:
    """Sorts the decoded utterances of each bucket into usable and skipped ones.

    The allowance is ``max_fraction`` of the reads so far, or of ``num_utterances`` (the
    utterances this rank reads in an epoch) while fewer have been read, so that a bad file
    early in a run is measured against the split rather than against the first batch.
    """

    def __init__(
        self, manifest_file: Path, *, max_fraction: float, num_utterances: int, min_num_samples: int = 1
    ) -> None:
        """:param min_num_samples: Decoded audio shorter than this (the model's CNN or masker
        needs it; see :mod:`w2v_knnvq.wav2vec2.lengths`) is skipped as unusable: a file
        shorter than its manifest entry would otherwise end the run."""
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"`max_fraction` must be between 0 and 1, but is {max_fraction} instead.")

        self._manifest_file = manifest_file
        self._min_num_samples = min_num_samples
        self._max_fraction = max_fraction
        self._num_utterances = num_utterances
        self._num_read = 0
        self._skipped: list[SkippedAudio] = []
        self._num_unreported = 0

    def sort_bucket(self, bucket: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Tensor]]:
        """:param bucket: Examples whose ``path`` is an :class:`AudioLoader` output.
        :returns: The usable examples and their waveforms, each of shape ``(S_wav,)``.
        :raises BadAudioBudgetError: if the skips pass the allowance."""
        kept, waveforms = [], []

        for example in bucket:
            audio = example["path"]

            if "error" in audio:
                self._skip(SkippedAudio(str(audio["file"]), str(audio["error"])))
            elif (num_samples := len(audio["waveform"])) < self._min_num_samples:
                # The bucketing may have replaced `num_samples` with a cropped length.
                listed = example.get("manifest_num_samples", example.get("num_samples"))

                reason = (
                    f"it has {num_samples} samples, the manifest says {listed}; the model needs at least "
                    f"{self._min_num_samples}. Rebuild the manifest with tools/make_manifest.py"
                )

                self._skip(SkippedAudio(str(audio["file"]), reason))
            else:
                kept.append(example)
                waveforms.append(audio["waveform"])

        self._num_read += len(bucket)

        self._check_budget()

        return kept, waveforms

    def take_num_skipped(self) -> int:
        """The skips since the last call, for the metrics of the next batch."""
        num_skipped, self._num_unreported = self._num_unreported, 0

        return num_skipped

    @property
    def skipped(self) -> list[SkippedAudio]:
        return list(self._skipped)

    def _skip(self, item: SkippedAudio) -> None:
        log.warning("Skipped {} listed in {}: {}.", item.path, self._manifest_file, item.reason)

        self._skipped.append(item)

        self._num_unreported += 1

    def _check_budget(self) -> None:
        allowance = self._max_fraction * max(self._num_read, self._num_utterances)

        if len(self._skipped) > allowance:
            raise BadAudioBudgetError(self._manifest_file, self._skipped, self._num_read, self._max_fraction)


@final
class ReadEpoch:
    """The data epoch a reader is in, shared with its pipeline's random draws so that they
    depend on what is read, never on how far the pipeline's threads ran ahead."""

    def __init__(self) -> None:
        self.value = 1


def example_generator(seed: int, epoch: ReadEpoch, path: str) -> torch.Generator:
    """A generator for the random draws of one utterance in one epoch, so that a run
    resumed from a checkpoint draws exactly what the uninterrupted run draws."""
    digest = hashlib.blake2b(f"{seed}:{epoch.value}:{path}".encode(), digest_size=8).digest()

    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
