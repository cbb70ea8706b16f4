"""Features in the layout of fairseq's HuBERT k-means scripts (``examples/hubert/simple_kmeans``).

Per kind (``cnn``, ``layer{L}``, ``codes``), the part ``rank`` of ``nshard`` of a split is

- ``{kind}/{split}_{rank}_{nshard}.npy``: the frames of its utterances, concatenated along
  time (``(T, D)`` float32; ``codes`` ``(T, G)`` int64);
- ``{kind}/{split}_{rank}_{nshard}.len``: one line per utterance, its number of frames,
  written last, so that its presence marks the part complete.

A part is the contiguous range of the manifest that fairseq's ``get_path_iterator`` gives a
rank (``ceil(N / nshard)`` utterances each, the last one shorter), so processes started with
``rank`` 0 to ``nshard - 1`` cover every utterance once, in manifest order. A part is
extracted into resumable shards under ``.work/`` first (:mod:`w2v_knnvq.features.shards`)
and then assembled with bounded memory, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from w2v_knnvq.features.extractor import SpeechFeatureExtractor
from w2v_knnvq.features.shards import (
    ShardExtractionError,
    ShardSettings,
    Utterance,
    extract_to_shards,
    load_shard,
    read_index,
)
from w2v_knnvq.files import write_atomically, write_lines_atomically

CODEBOOK_FILE = "codebook.json"
"""In ``codes/``: ``{"num_codebooks": G, "codebook_size": V}``, what turns codes into unit ids."""


def part_range(num_utterances: int, nshard: int, rank: int) -> range:
    """The utterances of part ``rank`` of ``nshard``, as fairseq's ``get_path_iterator`` splits them.

    :raises ValueError: unless ``0 <= rank < nshard``.
    """
    if nshard < 1 or not 0 <= rank < nshard:
        raise ValueError(f"`rank` must be in [0, {nshard}) with `nshard` at least 1, but is {rank} instead.")

    size = math.ceil(num_utterances / nshard)

    return range(min(rank * size, num_utterances), min((rank + 1) * size, num_utterances))


def part_stem(split: str, rank: int, nshard: int) -> str:
    return f"{split}_{rank}_{nshard}"


@dataclass(frozen=True, kw_only=True)
class FairseqPart:
    num_utterances: int

    num_frames: int

    files: list[Path]
    """The ``.npy`` and ``.len`` files of each kind."""

    written: bool
    """Whether this run wrote them; ``False`` if the part was complete already."""


def extract_fairseq_part(
    extractor: SpeechFeatureExtractor,
    utterances: Sequence[Utterance],
    output_dir: Path,
    settings: ShardSettings,
    *,
    split: str,
    nshard: int = 1,
    rank: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> FairseqPart:
    """Extracts part ``rank`` of ``nshard`` of ``utterances`` (the whole list of the split)
    into the layout of this module.

    :raises ShardExtractionError: if the part's work directory holds a run with other settings.
    :raises AudioInputError: naming the first unreadable file; what was extracted stays.
    """
    indices = part_range(len(utterances), nshard, rank)

    part = list(utterances[indices.start : indices.stop])

    if not part:
        raise ShardExtractionError(
            f"Part {rank} of {nshard} of {split} holds no utterance ({len(utterances)} in all); use fewer parts."
        )

    stem = part_stem(split, rank, nshard)

    kinds = _kinds(settings)

    len_files = [output_dir / kind / f"{stem}.len" for kind in kinds]

    if all(file.is_file() for file in len_files):
        lengths = [int(line) for line in len_files[0].read_text().split()]

        return FairseqPart(
            num_utterances=len(lengths), num_frames=sum(lengths), files=_files(output_dir, kinds, stem), written=False
        )

    work_dir = output_dir / ".work" / stem

    shard_settings = replace(settings, layout="shards", shard_format="npy")

    summary = extract_to_shards(
        extractor, part, work_dir, shard_settings, batch_size=batch_size, show_progress=show_progress
    )

    records = read_index(work_dir)

    lengths = [int(str(record["frames"])) for record in records]

    for kind in kinds:
        (output_dir / kind).mkdir(parents=True, exist_ok=True)

        _assemble(work_dir, summary.num_shards, kind, output_dir / kind / f"{stem}.npy", sum(lengths))

        write_lines_atomically(output_dir / kind / f"{stem}.len", map(str, lengths))

    if settings.codes:
        _write_codebook(output_dir / "codes" / CODEBOOK_FILE, extractor)

    shutil.rmtree(work_dir)

    return FairseqPart(
        num_utterances=len(part), num_frames=sum(lengths), files=_files(output_dir, kinds, stem), written=True
    )


def read_fairseq_part(feature_dir: Path, split: str, rank: int, nshard: int) -> tuple[np.ndarray, list[int]]:
    """:returns: The frames of a part (memory-mapped, ``(T, D)``) and the frames of each
    utterance, read as fairseq's ``load_feature_shard`` reads them.

    :param feature_dir: One kind's directory, e.g. ``OUT/layer6``.
    :raises ShardExtractionError: if the part is missing or its files disagree.
    """
    stem = part_stem(split, rank, nshard)

    len_file = feature_dir / f"{stem}.len"

    if not len_file.is_file():
        raise ShardExtractionError(
            f"{len_file}: missing; extract part {rank} of {nshard} of {split} first (tools/extract_features.py "
            f"--layout fairseq --nshard {nshard} --rank {rank})."
        )

    lengths = [int(line) for line in len_file.read_text().split()]

    frames = np.load(feature_dir / f"{stem}.npy", mmap_mode="r")

    if frames.shape[0] != sum(lengths):
        raise ShardExtractionError(
            f"{feature_dir / stem}.npy: holds {frames.shape[0]} frames, but {len_file} sums to {sum(lengths)}; "
            "delete both and extract the part again."
        )

    return frames, lengths


def read_codebook(codes_dir: Path) -> tuple[int, int]:
    """:returns: ``(G, V)`` of the codes in ``codes_dir``."""
    file = codes_dir / CODEBOOK_FILE

    if not file.is_file():
        raise ShardExtractionError(
            f"{file}: missing; extract the codes with tools/extract_features.py --layout fairseq."
        )

    record = json.loads(file.read_text())

    return int(record["num_codebooks"]), int(record["codebook_size"])


def _kinds(settings: ShardSettings) -> list[str]:
    return ["cnn", *(f"layer{layer}" for layer in settings.layers), *(["codes"] if settings.codes else [])]


def _files(output_dir: Path, kinds: list[str], stem: str) -> list[Path]:
    return [output_dir / kind / f"{stem}.{suffix}" for kind in kinds for suffix in ("npy", "len")]


def _assemble(work_dir: Path, num_shards: int, kind: str, output_file: Path, num_frames: int) -> None:
    """Concatenates ``kind`` of the shards into ``output_file``, one shard in memory at a time."""

    def write(tmp: Path) -> None:
        target: np.memmap | None = None

        offset = 0

        for shard_idx in range(num_shards):
            array = load_shard(work_dir, shard_idx, "npy", kind=kind)[kind]

            if target is None:
                shape = (num_frames, *array.shape[1:])

                target = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=shape)

            target[offset : offset + len(array)] = array

            offset += len(array)

        if target is not None:
            target.flush()

    write_atomically(output_file, write)


def _write_codebook(file: Path, extractor: SpeechFeatureExtractor) -> None:
    num_codebooks, codebook_size = extractor.codebook_shape

    text = json.dumps({"num_codebooks": num_codebooks, "codebook_size": codebook_size}) + "\n"

    write_atomically(file, lambda tmp: tmp.write_text(text))
