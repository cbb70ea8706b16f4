"""Reading image folders in the ImageNet layout (``SPLIT/CLASS/*.JPEG``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES: Final = frozenset({".jpeg", ".jpg", ".png"})


class ImageReadError(Exception):
    """Raised when an image file cannot be decoded."""


def list_image_files(split_dir: Path) -> list[Path]:
    """Return the image files of an ImageNet-layout split, ``split_dir/CLASS/*.{JPEG,jpg,png}``,
    sorted by path.

    :raises FileNotFoundError: when ``split_dir`` is missing or holds no image.
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"The image folder {split_dir} does not exist. Expected the ImageNet layout "
            "ROOT/SPLIT/CLASS/*.JPEG (also .jpg, .png)."
        )

    files = sorted(path for path in split_dir.glob("*/*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())

    if not files:
        raise FileNotFoundError(
            f"The image folder {split_dir} holds no image. Expected class subfolders with "
            "*.JPEG, *.jpg or *.png files (ROOT/SPLIT/CLASS/IMAGE)."
        )

    return files


def load_image(path: Path, size: int) -> Tensor:
    """Decode an image, resize its shorter side to ``size`` and centre-crop it to a square.

    :returns: ``(3, size, size)`` float32 in ``[-1, 1]``.

    :raises ImageReadError: when the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")

            width, height = image.size
            scale = size / min(width, height)
            if scale != 1.0:
                new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
                image = image.resize(new_size, Image.Resampling.BICUBIC)
                width, height = new_size

            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))

            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as ex:
        raise ImageReadError(f"{path} cannot be decoded as an image ({ex}). Remove or replace the file.") from ex

    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """Map ``(..., 3, H, W)`` images in ``[-1, 1]`` to uint8 ``[0, 255]`` (values clamped)."""
    return images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


class ImageFileDataset(Dataset[Tensor]):
    """Decodes and centre-crops the given image files on access."""

    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files = list(files)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.files[index], self.size)


def iterate_image_batches(
    files: Sequence[Path], *, size: int, batch_size: int, num_workers: int = 0
) -> DataLoader[Tensor]:
    """Iterate over ``files`` in order as ``(N, 3, size, size)`` batches (the last may be smaller)."""
    return DataLoader(
        ImageFileDataset(files, size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
