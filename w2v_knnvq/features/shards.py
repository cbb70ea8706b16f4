"""Extracts a corpus into resumable feature shards.

An output directory holds, for shard ``k`` of ``shard_size`` consecutive utterances:

- ``shard_{k:05d}.pt`` (a dict of tensors) or ``shard_{k:05d}.{kind}.npy`` (one array
  per kind), each kind holding the frames of its utterances concatenated along
  time: ``cnn`` ``(T, F)`` float32, ``layer{L}`` ``(T, M)`` float32, ``codes`` ``(T, G)`` int64;
- ``shard_{k:05d}.jsonl``: one ``{"utterance", "shard", "offset", "frames"}`` line per
  utterance; it is written last, so its presence marks the shard complete.

``index.jsonl`` gathers the shard indexes in order once every shard is done, and
``extraction.json`` records the settings; a rerun with the same settings skips the
complete shards and never writes an utterance twice.

The other layout, one file per utterance and kind, is :mod:`w2v_knnvq.features.utterance_files`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from w2v_knnvq.data.manifest import read_manifest
from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.features.extractor import SpeechFeatureExtractor, SpeechFeatures
from w2v_knnvq.files import write_atomically

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")
"""Files that a directory input contributes (soundfile reads them all)."""

INDEX_FILE = "index.jsonl"

SETTINGS_FILE = "extraction.json"

ShardFormat = Literal["npy", "pt"]

Layout = Literal["shards", "per-utterance"]

UtteranceIdScheme = Literal["stem", "path"]


class ShardExtractionError(ValueError):
    """An input or output directory that extraction cannot use; the message names the path."""


@dataclass(frozen=True, kw_only=True)
class Utterance:
    name: str
    """The path relative to the input root, with ``/`` separators."""

    path: Path


def list_utterances(input_path: Path) -> list[Utterance]:
    """Lists a ``.tsv`` manifest's entries in order, or a directory's audio files sorted by path.

    :raises ShardExtractionError: if the input is missing or holds no audio.
    """
    if input_path.is_file():
        root, entries = read_manifest(input_path)

        utterances = [Utterance(name=rel_path, path=root / rel_path) for rel_path, _ in entries]

        if not utterances:
            raise ShardExtractionError(f"{input_path}: the manifest lists no utterance.")

        return utterances

    if not input_path.is_dir():
        raise ShardExtractionError(f"{input_path}: neither a manifest file nor a directory.")

    files = sorted(path for path in input_path.rglob("*") if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file())

    if not files:
        raise ShardExtractionError(f"{input_path}: holds no audio file ({', '.join(AUDIO_SUFFIXES)}).")

    return [Utterance(name=path.relative_to(input_path).as_posix(), path=path) for path in files]


@dataclass(kw_only=True)
class ShardSettings:
    """What makes two runs produce the same shards; a resumed run must match."""

    model: str

    layers: list[int]

    codes: bool = True

    shard_format: ShardFormat = "npy"
    """The file format of the shards, or of the utterance files."""

    shard_size: int = 256
    """Utterances per shard."""

    layout: Layout = "shards"
    """``shards`` of ``shard_size`` utterances, or ``per-utterance`` files
    (:mod:`w2v_knnvq.features.utterance_files`)."""

    utterance_ids: UtteranceIdScheme = "stem"
    """How the ``per-utterance`` layout names files (see :func:`~w2v_knnvq.features.utterance_files.utterance_ids`)."""

    utterances: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ShardSummary:
    num_shards: int

    num_written: int
    """Shards written by this run; the others were complete already."""

    index_file: Path


def extract_to_shards(
    extractor: SpeechFeatureExtractor,
    utterances: Sequence[Utterance],
    output_dir: Path,
    settings: ShardSettings,
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> ShardSummary:
    """Extracts every utterance into shards under ``output_dir``, skipping complete shards.

    :raises ShardExtractionError: if ``output_dir`` holds a run with other settings.
    :raises AudioInputError: naming the first unreadable file; shards written so far stay.
    """
    if settings.layout != "shards":
        raise ValueError(
            f"`settings.layout` must be `shards`, but is `{settings.layout}` instead; use `extract_per_utterance` for that layout."
        )

    if settings.shard_size < 1 or batch_size < 1:
        raise ValueError("`shard_size` and `batch_size` must be at least 1.")

    settings.utterances = [utterance.name for utterance in utterances]

    output_dir.mkdir(parents=True, exist_ok=True)

    check_settings(output_dir, settings)

    shards = [
        list(utterances[start : start + settings.shard_size])
        for start in range(0, len(utterances), settings.shard_size)
    ]

    progress = ProgressLine("extracting features", len(utterances)) if show_progress else None

    num_done = 0
    num_written = 0

    for shard_idx, shard in enumerate(shards):
        if not _shard_index_file(output_dir, shard_idx).is_file():
            _write_shard(extractor, shard, shard_idx, output_dir, settings, batch_size)

            num_written += 1

        num_done += len(shard)

        if progress is not None:
            progress.update(num_done)

    index_file = output_dir / INDEX_FILE

    lines = []

    for shard_idx in range(len(shards)):
        lines.extend(_shard_index_file(output_dir, shard_idx).read_text().splitlines())

    write_atomically(index_file, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))

    return ShardSummary(num_shards=len(shards), num_written=num_written, index_file=index_file)


def read_index(output_dir: Path) -> list[dict[str, object]]:
    """:returns: The ``index.jsonl`` records of a finished extraction."""
    index_file = output_dir / INDEX_FILE

    if not index_file.is_file():
        raise ShardExtractionError(f"{index_file}: missing; the extraction has not finished (rerun it to resume).")

    return [json.loads(line) for line in index_file.read_text().splitlines() if line]


def load_shard(
    output_dir: Path, shard_idx: int, shard_format: ShardFormat, *, kind: str | None = None
) -> dict[str, np.ndarray]:
    """:returns: Each kind (``cnn``, ``layer{L}``, ``codes``) of shard ``shard_idx``, or only
    ``kind`` (with ``npy`` shards, only its file is read)."""
    stem = _shard_stem(shard_idx)

    if shard_format == "pt":
        tensors = torch.load(output_dir / f"{stem}.pt", map_location="cpu", weights_only=True)

        return {name: tensor.numpy() for name, tensor in tensors.items() if kind in (None, name)}

    pattern = f"{stem}.{kind or '*'}.npy"

    return {path.name[len(stem) + 1 : -len(".npy")]: np.load(path) for path in sorted(output_dir.glob(pattern))}


def check_settings(output_dir: Path, settings: ShardSettings) -> None:
    """Records ``settings`` in a new ``output_dir``, or checks that they are those recorded.

    :raises ShardExtractionError: if ``output_dir`` holds an extraction with other settings.
    """
    settings_file = output_dir / SETTINGS_FILE

    current = asdict(settings)

    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text())

        # A settings file written before a setting existed holds its default.
        defaults = asdict(ShardSettings(model=settings.model, layers=settings.layers))

        previous = {key: recorded.get(key, defaults[key]) for key in current}

        if previous != current:
            differing = sorted(key for key in current if previous.get(key) != current[key])

            raise ShardExtractionError(
                f"{output_dir}: holds an extraction with other settings ({', '.join(differing)} differ); "
                "rerun with the same settings to resume, or choose a new output directory."
            )

        return

    write_atomically(settings_file, lambda tmp: tmp.write_text(json.dumps(current, indent=2) + "\n"))


def _write_shard(
    extractor: SpeechFeatureExtractor,
    shard: list[Utterance],
    shard_idx: int,
    output_dir: Path,
    settings: ShardSettings,
    batch_size: int,
) -> None:
    kinds: dict[str, list[Tensor]] = {}

    records = []

    offset = 0

    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]

        features = extractor.extract_files([utterance.path for utterance in batch], layers=settings.layers)

        for row, utterance in enumerate(batch):
            for kind, tensor in feature_kinds(features.utterance(row), settings.codes).items():
                kinds.setdefault(kind, []).append(tensor)

            num_frames = int(features.frame_lengths[row])

            records.append(
                {"utterance": utterance.name, "shard": _shard_stem(shard_idx), "offset": offset, "frames": num_frames}
            )

            offset += num_frames

    stacked = {kind: torch.cat(tensors, dim=0).cpu() for kind, tensors in kinds.items()}

    stem = _shard_stem(shard_idx)

    if settings.shard_format == "pt":
        write_atomically(output_dir / f"{stem}.pt", lambda tmp: torch.save(stacked, tmp))
    else:
        for kind, tensor in stacked.items():
            write_atomically(output_dir / f"{stem}.{kind}.npy", partial(save_npy, array=tensor.numpy()))

    index_lines = "".join(json.dumps(record) + "\n" for record in records)

    write_atomically(_shard_index_file(output_dir, shard_idx), lambda tmp: tmp.write_text(index_lines))


def feature_kinds(features: SpeechFeatures, codes: bool) -> dict[str, Tensor]:
    """:returns: Each kind of one unpadded utterance, frames first: ``(T, *)``."""
    kinds = {"cnn": features.cnn_features[0].float()}

    for layer, states in features.hidden_states.items():
        kinds[f"layer{layer}"] = states[0].float()

    if codes:
        kinds["codes"] = features.codes[0]

    return kinds


def save_npy(path: Path, array: np.ndarray) -> None:
    # np.save appends `.npy` to a name without it; an open file keeps the temporary name.
    with path.open("wb") as fp:
        np.save(fp, array)


def _shard_stem(shard_idx: int) -> str:
    return f"shard_{shard_idx:05d}"


def _shard_index_file(output_dir: Path, shard_idx: int) -> Path:
    return output_dir / f"{_shard_stem(shard_idx)}.jsonl"
