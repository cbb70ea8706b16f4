"""A fairseq2 data reader over an ImageNet-layout image folder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import Self, override

from fairseq2.datasets import DataReader
from fairseq2.device import Device, SupportsDeviceTransfer
from fairseq2.gang import Gangs

from w2v_knnvq.image.data import ImageFileDataset


@dataclass
class ImageBatch(SupportsDeviceTransfer):
    """A batch of images, ``(N, 3, H, W)`` float32 in ``[-1, 1]``."""

    images: Tensor

    @override
    def to(self, device: Device, *, non_blocking: bool = False) -> None:
        self.images = self.images.to(device, non_blocking=non_blocking)

    @property
    def batch_size(self) -> int:
        return self.images.size(0)


class ImageFolderReader(DataReader[ImageBatch]):
    """Reads one data epoch of images in batches, then raises :class:`StopIteration`.

    Each data parallel rank reads its own strided share of a permutation of the files; the
    permutation is drawn from ``seed + epoch`` so that the reader resumes at the exact batch
    after a restart (its state is the epoch and the number of batches read).

    Every share is trimmed to ``len(files) // dp.size`` files, dropping the remaining
    ``len(files) % dp.size`` files of the permutation (as ``DistributedSampler`` with
    ``drop_last=True``), so that all ranks read the same number of batches and end each epoch
    on the same step instead of waiting on a collective that the others never reach.
    """

    def __init__(
        self,
        files: Sequence[Path],
        gangs: Gangs,
        *,
        image_size: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
        num_accumulate: int = 1,
    ) -> None:
        if len(files) < gangs.dp.size:
            raise ValueError(
                f"The image folder holds {len(files)} image(s), fewer than the {gangs.dp.size} data "
                "parallel ranks, so some rank would read nothing; add images or use fewer ranks."
            )

        self._files = list(files)
        self._gangs = gangs
        self._image_size = image_size
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._num_workers = num_workers
        self._num_accumulate = num_accumulate

        self._epoch = 0
        self._num_batches_read = 0
        self._batches: Iterator[Tensor] | None = None

    def _rank_files(self) -> list[Path]:
        if self._shuffle:
            generator = torch.Generator().manual_seed(self._seed + self._epoch)

            order = torch.randperm(len(self._files), generator=generator).tolist()
        else:
            order = list(range(len(self._files)))

        dp = self._gangs.dp

        share_size = len(order) // dp.size

        return [self._files[i] for i in order[dp.rank :: dp.size][:share_size]]

    def _open_epoch(self) -> Iterator[Tensor]:
        files = self._rank_files()[self._num_batches_read * self._batch_size :]

        loader = DataLoader(
            ImageFileDataset(files, self._image_size),
            batch_size=self._batch_size,
            shuffle=False,
            num_workers=self._num_workers,
        )

        return iter(loader)

    @override
    def __iter__(self) -> Self:
        return self

    @override
    def __next__(self) -> list[ImageBatch]:
        if self._batches is None:
            self._batches = self._open_epoch()

        batches = []

        for images in self._batches:
            batches.append(ImageBatch(images))

            self._num_batches_read += 1

            if len(batches) == self._num_accumulate:
                break

        if not batches:
            raise StopIteration()

        return batches

    @override
    def reset(self) -> None:
        self._epoch += 1
        self._num_batches_read = 0
        self._batches = None

    @override
    def state_dict(self) -> dict[str, object]:
        return {"epoch": self._epoch, "num_batches_read": self._num_batches_read}

    @override
    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        epoch, num_batches_read = state_dict["epoch"], state_dict["num_batches_read"]
        if not isinstance(epoch, int) or not isinstance(num_batches_read, int):
            raise ValueError(f"The image reader state {state_dict} is malformed.")

        self._epoch = epoch
        self._num_batches_read = num_batches_read
        self._batches = None

    @property
    @override
    def num_accumulate(self) -> int:
        return self._num_accumulate
