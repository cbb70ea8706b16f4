"""Manifests of unlabeled audio (LibriLight, in-house recordings): any folder tree.

Every file with one of the given extensions is checked like a LibriSpeech file (readable,
at the sample rate, mono, non-empty, its end decodable) by several threads, and the usable ones
are split at random, with a seed, into ``{train_name}.tsv`` and ``{valid_name}.tsv``. No
transcripts: pretraining reads the ``.tsv`` only.

With ``segment_seconds``, each file becomes consecutive windows of that length
(:mod:`w2v_knnvq.data.windows`), all in the split its file was drawn into, so that a reader
of a 30-minute recording decodes a window, not the recording.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from w2v_knnvq.data.audio_check import SAMPLE_RATE, AudioFileError, inspect_audio
from w2v_knnvq.data.manifest import BadFile, BadFilesError, ManifestError
from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.data.windows import split_into_windows, window_entry
from w2v_knnvq.files import write_lines_atomically
from w2v_knnvq.wav2vec2.lengths import RECEPTIVE_FIELD

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class UnlabeledManifestConfig:
    audio_dir: Path
    """The folder tree to scan; it becomes the manifests' audio root."""

    output_dir: Path

    extensions: Sequence[str] = ("flac",)
    """File extensions to take, without the dot (``flac``, ``wav``, ``ogg``, ...)."""

    valid_percent: float = 0.01
    """The fraction of files drawn for the validation manifest, in ``[0, 1)``."""

    seed: int = 1
    """Seeds the draw of the validation files."""

    train_name: str = "train"

    valid_name: str = "valid"

    sample_rate: int = SAMPLE_RATE

    skip_bad: bool = False
    """Leave bad files out with a warning instead of refusing to write."""

    full_decode: bool = False

    segment_seconds: float | None = None
    """Write each file as windows of this many seconds; ``None`` writes whole files."""

    min_segment_seconds: float = 2.0
    """With ``segment_seconds``: a last window shorter than this is left out (and a file
    shorter than this altogether)."""

    num_workers: int = 4

    show_progress: bool = True


@dataclass(frozen=True, kw_only=True)
class UnlabeledManifests:
    train_path: Path

    valid_path: Path | None
    """``None`` when ``valid_percent`` is 0."""

    num_train: int

    num_valid: int


def make_unlabeled_manifests(config: UnlabeledManifestConfig) -> UnlabeledManifests:
    """Scans ``config.audio_dir`` and writes the training and validation manifests.

    :raises ManifestError: if the folder is missing or holds no file of the extensions, or a
        setting is out of range.
    :raises BadFilesError: if a file is bad and ``config.skip_bad`` is not set; nothing is
        written then.
    """
    _check(config)

    audio_dir = config.audio_dir.resolve()

    paths = _list_audio(audio_dir, config.extensions)

    entries, bad_files = _inspect_all(paths, config)

    if bad_files:
        if not config.skip_bad:
            raise BadFilesError(bad_files)

        log.warning("Skipping %d bad file(s) under %s.", len(bad_files), audio_dir)

    if not entries:
        raise ManifestError(f"No usable audio file under {audio_dir}; every file is bad.")

    file_rows = [_rows(path.relative_to(audio_dir).as_posix(), num_samples, config) for path, num_samples in entries]

    valid_indices = _draw_valid(len(file_rows), config.valid_percent, config.seed)

    train_rows = [row for index, rows in enumerate(file_rows) if index not in valid_indices for row in rows]
    valid_rows = [row for index, rows in enumerate(file_rows) if index in valid_indices for row in rows]

    if not train_rows:
        raise ManifestError(
            f"No window of at least {config.min_segment_seconds} s in the training files under {audio_dir}; "
            "lower `--min-segment-seconds`."
        )

    config.output_dir.mkdir(parents=True, exist_ok=True)

    train_path = config.output_dir / f"{config.train_name}.tsv"

    write_lines_atomically(train_path, [str(audio_dir), *train_rows])

    valid_path = None

    if valid_rows:
        valid_path = config.output_dir / f"{config.valid_name}.tsv"

        write_lines_atomically(valid_path, [str(audio_dir), *valid_rows])

    return UnlabeledManifests(
        train_path=train_path, valid_path=valid_path, num_train=len(train_rows), num_valid=len(valid_rows)
    )


def _rows(rel_path: str, num_samples: int, config: UnlabeledManifestConfig) -> list[str]:
    """The manifest rows of one file: itself, or its windows."""
    if config.segment_seconds is None:
        return [f"{rel_path}\t{num_samples}"]

    windows = split_into_windows(
        num_samples,
        round(config.segment_seconds * config.sample_rate),
        round(config.min_segment_seconds * config.sample_rate),
    )

    return [f"{window_entry(rel_path, start, length)}\t{length}" for start, length in windows]


def _check(config: UnlabeledManifestConfig) -> None:
    if not 0.0 <= config.valid_percent < 1.0:
        raise ManifestError(f"`valid_percent` must be in [0, 1), but is {config.valid_percent} instead.")

    if config.segment_seconds is not None and not 0.0 < config.min_segment_seconds <= config.segment_seconds:
        raise ManifestError(
            f"`min_segment_seconds` must be in (0, `segment_seconds` ({config.segment_seconds})], "
            f"but is {config.min_segment_seconds} instead."
        )

    if config.min_segment_seconds * config.sample_rate < RECEPTIVE_FIELD:
        raise ManifestError(
            f"`min_segment_seconds` must give at least the {RECEPTIVE_FIELD} samples of the CNN's receptive field, "
            f"but is {config.min_segment_seconds} instead."
        )

    if not config.extensions:
        raise ManifestError("`extensions` must name at least one file extension, but is empty instead.")

    if not config.audio_dir.is_dir():
        raise ManifestError(
            f"Audio directory {config.audio_dir} does not exist; pass the folder tree of the audio files."
        )


def _list_audio(audio_dir: Path, extensions: Sequence[str]) -> list[Path]:
    suffixes = {f".{extension.lower().lstrip('.')}" for extension in extensions}

    # Not only regular files: a FIFO or device is reported as a bad file instead of left out.
    paths = sorted(path for path in audio_dir.rglob("*") if path.suffix.lower() in suffixes and not path.is_dir())

    if not paths:
        raise ManifestError(
            f"Audio directory {audio_dir} holds no file with the extension(s) {', '.join(sorted(suffixes))}; "
            "check the folder or `--ext`."
        )

    return paths


def _inspect_all(
    paths: Sequence[Path], config: UnlabeledManifestConfig
) -> tuple[list[tuple[Path, int]], list[BadFile]]:
    def inspect(path: Path) -> int | BadFile:
        try:
            return inspect_audio(path, sample_rate=config.sample_rate, full_decode=config.full_decode).num_samples
        except AudioFileError as ex:
            return BadFile(path=path, reason=ex.reason)

    progress = ProgressLine("checking audio", len(paths)) if config.show_progress else None

    entries: list[tuple[Path, int]] = []
    bad_files: list[BadFile] = []

    with ThreadPoolExecutor(max_workers=max(1, config.num_workers)) as pool:
        for done, (path, result) in enumerate(zip(paths, pool.map(inspect, paths), strict=True), start=1):
            if isinstance(result, BadFile):
                bad_files.append(result)
            else:
                entries.append((path, result))

            if progress is not None:
                progress.update(done)

    return entries, bad_files


def _draw_valid(num_files: int, valid_percent: float, seed: int) -> set[int]:
    """The indices of the validation files: ``round(valid_percent x num_files)`` of them (at
    least one if ``valid_percent`` is positive, and never all)."""
    if valid_percent == 0.0 or num_files < 2:
        return set()

    count = min(num_files - 1, max(1, round(valid_percent * num_files)))

    return set(random.Random(seed).sample(range(num_files), count))
