"""Build a small ImageNet-layout image set from the photos bundled with scikit-image.

Each class is one photo; every image is a random square crop of that photo (side 15-50% of
the photo's shorter side), resized to ``--size`` and saved as JPEG:
``OUT/train/CLASS/CLASS_NNNN.JPEG`` and ``OUT/val/CLASS/CLASS_NNNN.JPEG``.

Example::

    python tools/make_image_set.py tests/data/miniimages --size 64 --train-per-class 24 --val-per-class 4
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from w2v_knnvq.tool import tool_parser


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("This tool needs scikit-image for its bundled photos: pip install scikit-image") from None

    return {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "hubble": data.hubble_deep_field,
        "retina": data.retina,
        "tissue": data.immunohistochemistry,
        "motorcycle": lambda: data.stereo_motorcycle()[0],  # type: ignore[no-untyped-call]  # scikit-image leaves it unannotated
    }


def _random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    image = Image.fromarray(photo).convert("RGB")
    width, height = image.size
    shorter = min(width, height)

    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.15, 0.5) * shorter)
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))

        crop = image.crop((left, top, left + side, top + side))
        crops.append(crop.resize((size, size), Image.Resampling.LANCZOS))

    return crops


def make_image_set(
    output_dir: Path,
    *,
    size: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    quality: int,
) -> int:
    """Write the image set and return the number of images written."""
    rng = np.random.default_rng(seed)

    photos = _photos()

    num_written = 0

    for class_name, load in photos.items():
        print(f"Cropping {class_name} ...", flush=True)

        photo = load()

        crops = _random_crops(photo, train_per_class + val_per_class, size, rng)

        for split, split_crops in (
            ("train", crops[:train_per_class]),
            ("val", crops[train_per_class:]),
        ):
            class_dir = output_dir / split / class_name
            class_dir.mkdir(parents=True, exist_ok=True)

            for index, crop in enumerate(split_crops):
                crop.save(class_dir / f"{class_name}_{index:04d}.JPEG", quality=quality)

                num_written += 1

    return num_written


def main() -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("output_dir", type=Path, help="root of the ImageNet-layout set to write")
    parser.add_argument("--size", type=int, default=64, help="side of the square crops (default: 64)")
    parser.add_argument("--train-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")

    args = parser.parse_args()

    num_written = make_image_set(
        args.output_dir,
        size=args.size,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        quality=args.quality,
    )

    print(f"Wrote {num_written} images under {args.output_dir}.")


if __name__ == "__main__":
    main()
