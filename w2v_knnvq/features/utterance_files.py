"""Extracts a corpus into one file per utterance and kind: the layout that ABX
evaluations and k-means unit pipelines read (a directory of ``{utterance id}.npy``).

An output directory holds, for every utterance of id ``ID``:

- ``cnn/ID.npy`` ``(T, F)`` float32, ``layer{L}/ID.npy`` ``(T, M)`` float32 and
  ``codes/ID.npy`` ``(T, G)`` int64, or ``.pt`` files holding one such tensor each;
- one ``{"utterance", "id", "frames"}`` line in ``index.jsonl``, in input order, written
  once every utterance is done; ``extraction.json`` records the settings.

Each file is written atomically, so a rerun with the same settings skips the utterances
whose files all exist and never leaves a partial file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.features.extractor import SpeechFeatureExtractor
from w2v_knnvq.features.shards import (
    INDEX_FILE,
    ShardExtractionError,
    ShardFormat,
    ShardSettings,
    Utterance,
    UtteranceIdScheme,
    check_settings,
    feature_kinds,
    save_npy,
)
from w2v_knnvq.files import write_atomically, write_lines_atomically

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(kw_only=True)
class UtteranceFilesSummary:
    num_utterances: int

    num_written: int
    """Utterances written by this run; the others were complete already."""

    index_file: Path


def utterance_ids(utterances: Sequence[Utterance], scheme: UtteranceIdScheme) -> list[str]:
    """Names each utterance's files: with ``stem`` its file name without the suffix (the
    ids of LibriSpeech and of ABX item files), with ``path`` its relative path without the
    suffix, ``/`` written as ``__``. Characters other than letters, digits, ``.``, ``-``
    and ``_`` become ``_``, and so does a leading ``.``.

    :raises ShardExtractionError: if two utterances get the same id.
    """
    ids = [_utterance_id(utterance.name, scheme) for utterance in utterances]

    first_of: dict[str, str] = {}

    for utterance, utterance_id in zip(utterances, ids, strict=True):
        other = first_of.setdefault(utterance_id, utterance.name)

        if other != utterance.name:
            fix = "name files by their relative path (`path`)" if scheme == "stem" else "rename one of the files"

            raise ShardExtractionError(
                f"{utterance.name}: gets the utterance id `{utterance_id}` of {other}, so their files would collide; {fix}."
            )

    return ids


def _utterance_id(name: str, scheme: UtteranceIdScheme) -> str:
    path = PurePosixPath(name)

    raw = path.stem if scheme == "stem" else str(path.with_suffix("")).replace("/", "__")

    safe = _UNSAFE_CHARACTERS.sub("_", raw)

    return "_" + safe[1:] if safe.startswith(".") else safe


def extract_per_utterance(
    extractor: SpeechFeatureExtractor,
    utterances: Sequence[Utterance],
    output_dir: Path,
    settings: ShardSettings,
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> UtteranceFilesSummary:
    """Extracts every utterance into its own files under ``output_dir``, skipping the
    utterances whose files all exist.

    :raises ShardExtractionError: if ``output_dir`` holds a run with other settings, or
        two utterances get the same id.
    :raises AudioInputError: naming the first unreadable file; the files written so far stay.
    """
    if settings.layout != "per-utterance":
        raise ValueError(
            f"`settings.layout` must be `per-utterance`, but is `{settings.layout}` instead; use `extract_to_shards` for shards."
        )

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, but is {batch_size} instead.")

    settings.utterances = [utterance.name for utterance in utterances]

    ids = utterance_ids(utterances, settings.utterance_ids)

    kinds = _kind_names(settings)

    output_dir.mkdir(parents=True, exist_ok=True)

    check_settings(output_dir, settings)

    for kind in kinds:
        (output_dir / kind).mkdir(exist_ok=True)

    suffix = _suffix(settings.shard_format)

    pending = [
        (utterance, utterance_id)
        for utterance, utterance_id in zip(utterances, ids, strict=True)
        if not all((output_dir / kind / f"{utterance_id}{suffix}").is_file() for kind in kinds)
    ]

    progress = ProgressLine("extracting features", len(utterances)) if show_progress else None

    num_done = len(utterances) - len(pending)

    if progress is not None:
        progress.update(num_done)

    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]

        _write_batch(extractor, batch, output_dir, settings)

        num_done += len(batch)

        if progress is not None:
            progress.update(num_done)

    index_file = output_dir / INDEX_FILE

    records = [
        {
            "utterance": utterance.name,
            "id": utterance_id,
            "frames": _num_frames(output_dir / "cnn" / f"{utterance_id}{suffix}"),
        }
        for utterance, utterance_id in zip(utterances, ids, strict=True)
    ]

    write_lines_atomically(index_file, (json.dumps(record) for record in records))

    return UtteranceFilesSummary(num_utterances=len(utterances), num_written=len(pending), index_file=index_file)


def load_utterance(output_dir: Path, utterance_id: str, file_format: ShardFormat) -> dict[str, np.ndarray]:
    """:returns: Each kind (``cnn``, ``layer{L}``, ``codes``) of one utterance, ``(T, *)``."""
    suffix = _suffix(file_format)

    files = sorted(output_dir.glob(f"*/{utterance_id}{suffix}"))

    if not files:
        raise ShardExtractionError(
            f"{output_dir}: holds no file of utterance `{utterance_id}`; check the id in {INDEX_FILE}."
        )

    return {file.parent.name: _load_array(file) for file in files}


def _write_batch(
    extractor: SpeechFeatureExtractor, batch: list[tuple[Utterance, str]], output_dir: Path, settings: ShardSettings
) -> None:
    features = extractor.extract_files([utterance.path for utterance, _ in batch], layers=settings.layers)

    suffix = _suffix(settings.shard_format)

    for row, (_, utterance_id) in enumerate(batch):
        for kind, tensor in feature_kinds(features.utterance(row), settings.codes).items():
            _write_tensor(output_dir / kind / f"{utterance_id}{suffix}", tensor.cpu())


def _write_tensor(path: Path, tensor: Tensor) -> None:
    if path.suffix == ".pt":
        # `clone` saves the frames alone, not the padded batch they are a view of.
        write_atomically(path, partial(torch.save, tensor.clone()))
    else:
        write_atomically(path, partial(save_npy, array=tensor.numpy()))


def _kind_names(settings: ShardSettings) -> list[str]:
    """The kinds :func:`~w2v_knnvq.features.shards.feature_kinds` gives for ``settings``."""
    kinds = ["cnn"] + [f"layer{layer}" for layer in settings.layers]

    return kinds + ["codes"] if settings.codes else kinds


def _suffix(file_format: ShardFormat) -> str:
    return f".{file_format}"


def _num_frames(path: Path) -> int:
    """Reads the number of frames of a written file without reading its frames."""
    if path.suffix == ".pt":
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).shape[0])

    return int(np.load(path, mmap_mode="r").shape[0])


def _load_array(path: Path) -> np.ndarray:
    if path.suffix == ".pt":
        tensor: Tensor = torch.load(path, map_location="cpu", weights_only=True)

        return tensor.numpy()

    return np.load(path)
