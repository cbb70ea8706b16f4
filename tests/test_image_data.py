"""Image folder reading: listing, decoding, errors, fairseq2 reader, bundled set builder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fairseq2.gang import FakeGang, Gangs

from tests.cli import run_recipe_command
from w2v_knnvq.image.data import ImageReadError, list_image_files, load_image, to_uint8
from w2v_knnvq.image.reader import ImageFolderReader

REPO = Path(__file__).resolve().parents[1]
MINIIMAGES = REPO / "tests" / "data" / "miniimages"


def _fake_gangs() -> Gangs:
    gang = FakeGang(torch.device("cpu"))
    return Gangs(root=gang, dp=gang, rdp=gang, sdp=gang, tp=gang, pp=gang)


def test_bundled_set_has_imagenet_layout_and_is_small() -> None:
    train = list_image_files(MINIIMAGES / "train")
    val = list_image_files(MINIIMAGES / "val")

    assert len(train) == 192 and len(val) == 32
    assert len({p.parent.name for p in train}) == 8
    assert sum(p.stat().st_size for p in MINIIMAGES.rglob("*") if p.is_file()) < 2_000_000


def test_load_image_centre_crops_to_range(tmp_path: Path) -> None:
    pixels = torch.zeros((40, 60, 3), dtype=torch.uint8)
    pixels[:, 20:40] = 255  # a white vertical band in the centre third
    Image.fromarray(pixels.numpy()).save(tmp_path / "band.png")

    image = load_image(tmp_path / "band.png", 20)

    assert image.shape == (3, 20, 20)
    assert image.min() >= -1.0 and image.max() <= 1.0
    # Resized by 1/2 then centre-cropped: the band covers the middle of the crop only.
    assert image[:, :, 10].mean() > 0.9
    assert image[:, :, 0].mean() < -0.9

    assert to_uint8(image).dtype == torch.uint8


def test_missing_empty_and_corrupt_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*ImageNet layout"):
        list_image_files(tmp_path / "train")

    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "cls" / "notes.txt").write_text("x")

    with pytest.raises(FileNotFoundError, match="holds no image"):
        list_image_files(tmp_path / "train")

    broken = tmp_path / "train" / "cls" / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")

    assert list_image_files(tmp_path / "train") == [broken]

    with pytest.raises(ImageReadError, match=r"broken.JPEG"):
        load_image(broken, 32)


def test_reader_shuffles_batches_and_resumes_exactly() -> None:
    files = list_image_files(MINIIMAGES / "val")

    def make() -> ImageFolderReader:
        return ImageFolderReader(files, _fake_gangs(), image_size=16, batch_size=8, shuffle=True, seed=3)

    reader = make()

    first = next(reader)[0].images
    state = reader.state_dict()
    second = next(reader)[0].images

    assert first.shape == (8, 3, 16, 16)

    resumed = make()
    resumed.load_state_dict(state)
    torch.testing.assert_close(next(resumed)[0].images, second)

    # One epoch is 4 batches of 8; the next epoch uses another order.
    assert len(list(reader)) == 2
    with pytest.raises(StopIteration):
        next(reader)

    reader.reset()
    next_epoch_first = next(reader)[0].images
    assert not torch.equal(next_epoch_first, first)


def test_reader_gives_every_rank_the_same_number_of_images() -> None:
    files = list_image_files(MINIIMAGES / "val")[:9]

    def read_epoch(rank: int) -> tuple[int, torch.Tensor]:
        gang = FakeGang(torch.device("cpu"), rank=rank, size=2)
        gangs = Gangs(root=gang, dp=gang, rdp=gang, sdp=gang, tp=gang, pp=gang)

        reader = ImageFolderReader(files, gangs, image_size=8, batch_size=2, shuffle=True, seed=5)

        batches = [batch.images for batches in reader for batch in batches]

        return len(batches), torch.cat(batches)

    (rank0_batches, rank0_images), (rank1_batches, rank1_images) = read_epoch(0), read_epoch(1)

    # 9 images over 2 ranks: each reads 4 (2 batches of 2) and one image is dropped.
    assert rank0_batches == rank1_batches == 2
    assert rank0_images.shape == rank1_images.shape == (4, 3, 8, 8)
    # The shares are disjoint.
    assert not any(torch.equal(a, b) for a in rank0_images for b in rank1_images)

    gang = FakeGang(torch.device("cpu"), rank=0, size=2)
    with pytest.raises(ValueError, match="1 image\\(s\\), fewer than the 2 data parallel ranks"):
        ImageFolderReader(
            files[:1],
            Gangs(root=gang, dp=gang, rdp=gang, sdp=gang, tp=gang, pp=gang),
            image_size=8,
            batch_size=2,
            shuffle=False,
            seed=0,
        )


@pytest.mark.e2e
def test_make_image_set_tool(tmp_path: Path) -> None:
    pytest.importorskip("skimage")

    run_recipe_command(
        [
            sys.executable,
            str(REPO / "tools" / "make_image_set.py"),
            str(tmp_path),
            "--size",
            "16",
            "--train-per-class",
            "2",
            "--val-per-class",
            "1",
        ]
    )

    assert len(list_image_files(tmp_path / "train")) == 16
    assert len(list_image_files(tmp_path / "val")) == 8
    with Image.open(next((tmp_path / "val").rglob("*.JPEG"))) as image:
        assert image.size == (16, 16)
