"""Discrete units: k-means on the frames of one layer, as fairseq's HuBERT ``simple_kmeans``
learns them, and unit sequences in its ``.km`` format.

- :func:`sample_frames` reads a seeded sample of utterances (fairseq's ``percent``) of the
  parts of a split (:mod:`w2v_knnvq.features.fairseq_layout`);
- :func:`learn_kmeans` fits scikit-learn's ``MiniBatchKMeans`` with fairseq's settings;
  :func:`save_kmeans` keeps the centroids as ``kmeans.npy`` with the settings in
  ``kmeans.json`` (no pickle: loading them runs no code);
- :func:`write_units` writes ``{split}_{rank}_{nshard}.km``: one line per utterance, in
  manifest order, its units separated by spaces, run-length deduplicated on request. The
  quantizer's codes are units too: ``G`` codebooks as one product id
  (``c_0 V^{G-1} + ... + c_{G-1}``) or as ``G`` streams (``.g{g}.km``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from w2v_knnvq.features.fairseq_layout import part_stem, read_codebook, read_fairseq_part
from w2v_knnvq.files import write_atomically, write_lines_atomically

CodeUnits = Literal["product", "streams"]

CENTROIDS_FILE = "kmeans.npy"

KMEANS_SETTINGS_FILE = "kmeans.json"


class UnitsError(ValueError):
    """Units cannot be learned or written as asked; the message names the file or setting."""


@dataclass(kw_only=True)
class KMeansSettings:
    """fairseq's ``learn_kmeans.py`` defaults."""

    n_clusters: int = 100

    fraction: float = 0.1
    """The fraction of each part's utterances whose frames are sampled (fairseq's ``percent``);
    1 takes every frame."""

    seed: int = 0

    batch_size: int = 10_000

    max_iter: int = 100

    n_init: int = 20

    max_no_improvement: int = 100

    reassignment_ratio: float = 0.0

    def validate(self) -> None:
        """:raises UnitsError: naming the first setting out of range."""
        if self.n_clusters < 2:
            raise UnitsError(f"`n_clusters` must be at least 2, but is {self.n_clusters} instead.")

        if not 0.0 < self.fraction <= 1.0:
            raise UnitsError(f"`fraction` must be in (0, 1], but is {self.fraction} instead.")

        for name in ("batch_size", "max_iter", "n_init", "max_no_improvement"):
            if getattr(self, name) < 1:
                raise UnitsError(f"`{name}` must be at least 1, but is {getattr(self, name)} instead.")


def sample_frames(feature_dir: Path, split: str, nshard: int, fraction: float, seed: int) -> np.ndarray:
    """The frames of a seeded sample of ``fraction`` of the utterances of each part (all
    ``nshard`` parts of ``split`` in ``feature_dir``), concatenated: ``(T, D)`` float32."""
    generator = np.random.default_rng(seed)

    sampled: list[np.ndarray] = []

    for rank in range(nshard):
        frames, lengths = read_fairseq_part(feature_dir, split, rank, nshard)

        offsets = np.concatenate([[0], np.cumsum(lengths)])

        count = len(lengths) if fraction >= 1.0 else max(1, math.ceil(len(lengths) * fraction))

        chosen = np.sort(generator.choice(len(lengths), count, replace=False))

        sampled.extend(np.asarray(frames[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in chosen)

    return np.concatenate(sampled, axis=0)


def learn_kmeans(frames: np.ndarray, settings: KMeansSettings) -> tuple[np.ndarray, float]:
    """Fits ``MiniBatchKMeans`` (k-means++ initialization) to ``frames``.

    :returns: The centroids ``(C, D)`` float32 and the inertia per frame.
    :raises UnitsError: if there are fewer frames than clusters.
    """
    from sklearn.cluster import MiniBatchKMeans

    settings.validate()

    if len(frames) < settings.n_clusters:
        raise UnitsError(
            f"{len(frames)} sampled frames cannot make {settings.n_clusters} clusters; raise `fraction` or lower `n_clusters`."
        )

    kmeans = MiniBatchKMeans(
        n_clusters=settings.n_clusters,
        init="k-means++",
        max_iter=settings.max_iter,
        batch_size=settings.batch_size,
        tol=0.0,
        max_no_improvement=settings.max_no_improvement,
        n_init=settings.n_init,
        reassignment_ratio=settings.reassignment_ratio,
        random_state=settings.seed,
        compute_labels=False,
    )

    kmeans.fit(frames)

    inertia = -float(kmeans.score(frames)) / len(frames)

    return kmeans.cluster_centers_.astype(np.float32), inertia


def save_kmeans(output_dir: Path, centroids: np.ndarray, record: dict[str, object]) -> None:
    """Writes ``kmeans.npy`` and ``kmeans.json`` (``record``: what the centroids were learned from)."""
    output_dir.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with tmp.open("wb") as file:
            np.save(file, centroids)

    write_atomically(output_dir / CENTROIDS_FILE, save)

    text = json.dumps(record, indent=2) + "\n"

    write_atomically(output_dir / KMEANS_SETTINGS_FILE, lambda tmp: tmp.write_text(text))


def load_kmeans(kmeans_dir: Path) -> tuple[np.ndarray, dict[str, object]]:
    """:returns: The centroids and the record of :func:`save_kmeans`."""
    centroids_file = kmeans_dir / CENTROIDS_FILE

    if not centroids_file.is_file():
        raise UnitsError(f"{centroids_file}: missing; learn the units first (tools/learn_units.py learn).")

    record = json.loads((kmeans_dir / KMEANS_SETTINGS_FILE).read_text())

    return np.load(centroids_file, allow_pickle=False), record


def assign_units(frames: np.ndarray, centroids: np.ndarray, *, chunk_size: int = 65_536) -> np.ndarray:
    """The nearest centroid (Euclidean, as ``MiniBatchKMeans.predict``) of each frame: ``(T,)`` int64."""
    centers = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))

    units = []

    for start in range(0, len(frames), chunk_size):
        # A copy: a memory-mapped part is read-only, which torch does not take.
        chunk = torch.from_numpy(np.array(frames[start : start + chunk_size], dtype=np.float32))

        units.append(torch.cdist(chunk, centers).argmin(dim=1))

    return torch.cat(units).numpy() if units else np.zeros(0, dtype=np.int64)


def unit_lines(units: np.ndarray, lengths: Sequence[int], *, dedup: bool = False) -> list[str]:
    """One line per utterance: its units, separated by spaces; with ``dedup`` each run of one
    unit written once."""
    lines = []

    offset = 0

    for length in lengths:
        sequence = units[offset : offset + length].tolist()

        if dedup:
            sequence = [unit for unit, _ in itertools.groupby(sequence)]

        lines.append(" ".join(map(str, sequence)))

        offset += length

    return lines


def write_units(
    feature_dir: Path,
    output_dir: Path,
    *,
    split: str,
    nshard: int = 1,
    rank: int = 0,
    kind: str,
    centroids: np.ndarray | None = None,
    code_units: CodeUnits = "product",
    dedup: bool = False,
) -> list[Path]:
    """Writes the unit sequences of part ``rank`` of ``nshard``.

    :param kind: The features: ``layer{L}`` or ``cnn`` (with ``centroids``), or ``codes``.
    :returns: The ``.km`` files written.
    """
    frames, lengths = read_fairseq_part(feature_dir / kind, split, rank, nshard)

    stem = part_stem(split, rank, nshard)

    output_dir.mkdir(parents=True, exist_ok=True)

    if kind != "codes":
        if centroids is None:
            raise UnitsError(f"`{kind}` features need the centroids of a k-means (tools/learn_units.py learn).")

        if centroids.shape[1] != frames.shape[1]:
            raise UnitsError(
                f"The centroids have {centroids.shape[1]} dimensions, but the `{kind}` frames {frames.shape[1]}; "
                "use the k-means learned on this kind of features."
            )

        file = output_dir / f"{stem}.km"

        write_lines_atomically(file, unit_lines(assign_units(frames, centroids), lengths, dedup=dedup))

        return [file]

    codes = np.asarray(frames, dtype=np.int64)

    num_codebooks, codebook_size = read_codebook(feature_dir / kind)

    if code_units == "product":
        product = np.zeros(len(codes), dtype=np.int64)

        for group in range(num_codebooks):
            product = product * codebook_size + codes[:, group]

        file = output_dir / f"{stem}.km"

        write_lines_atomically(file, unit_lines(product, lengths, dedup=dedup))

        return [file]

    files = []

    for group in range(num_codebooks):
        file = output_dir / f"{stem}.g{group}.km"

        write_lines_atomically(file, unit_lines(codes[:, group], lengths, dedup=dedup))

        files.append(file)

    return files


def kmeans_record(settings: KMeansSettings, **extra: object) -> dict[str, object]:
    return {**asdict(settings), **extra}
