"""A global KNN under DDP on two CPU processes (gloo): the update of two processes on halves
of a batch equals that of one process on the whole batch, for the image autoencoder's
training unit and for the regularizer term of the ``wav2vec2_knnvq`` family, with fairseq2's
normalization (gradients summed over ranks, divided by all ranks' targets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from fairseq2.device import CPU
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2 import Wav2Vec2Masker
from fairseq2.nn import BatchLayout

from recipes.image_vqae.recipe import ImageVqaeTrainUnit
from w2v_knnvq.image import IMAGE_VQAE_ARCHS, ImageVqaeModel, create_image_vqae_model
from w2v_knnvq.image.reader import ImageBatch
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

pytestmark = pytest.mark.e2e

WORLD_SIZE = 2

# Rows of the batch on rank 0 and rank 1: unequal shares.
IMAGE_ROWS = (3, 1)

SPEECH_ROWS = (1, 2)


class EveryOtherFrameMasker(Wav2Vec2Masker):
    """Masks every other frame: the targets of a row do not depend on the batch or the RNG."""

    @override
    def forward(self, seqs: Tensor, seqs_layout: BatchLayout) -> tuple[Tensor, Tensor]:
        mask = torch.zeros(seqs.shape[:2], dtype=torch.bool, device=seqs.device)

        mask[:, ::2] = True

        return seqs.masked_fill(mask.unsqueeze(-1), 0.0), mask


def _image_model() -> ImageVqaeModel:
    config = IMAGE_VQAE_ARCHS["tiny"]()

    config.quantizer.knn_k = 3

    torch.manual_seed(0)

    return create_image_vqae_model(config)


def _images() -> Tensor:
    generator = torch.Generator().manual_seed(1)

    size = IMAGE_VQAE_ARCHS["tiny"]().image_size

    return torch.rand(sum(IMAGE_ROWS), 3, size, size, generator=generator) * 2.0 - 1.0


class RegularizerTerm(Module):
    """The family's regularizer term as the module's only output, so that DDP sees which
    parameters it reaches (the rest of the loss depends on sampled distractors)."""

    def __init__(self) -> None:
        super().__init__()

        torch.manual_seed(0)

        self.model = create_wav2vec2_knnvq_model(WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]())

        self.model.masker = EveryOtherFrameMasker()

    @override
    def forward(self, waveforms: Tensor) -> tuple[Tensor, int]:
        loss, output = self.model(waveforms, BatchLayout.of(waveforms))

        return loss.regularizer, output.num_targets


def _speech_model() -> RegularizerTerm:
    return RegularizerTerm()


def _waveforms() -> Tensor:
    return torch.randn(sum(SPEECH_ROWS), 16_000, generator=torch.Generator().manual_seed(2))


def _image_step(model: Module, images: Tensor) -> tuple[int, float]:
    """:returns: The number of targets and the loss, after backward."""
    unit = ImageVqaeTrainUnit(model, smoothed=True)

    metric_bag = MetricBag(device=CPU)

    unit.prepare_metric_bag(metric_bag)

    loss, num_targets = unit.process_batch(ImageBatch(images), metric_bag)

    loss.backward()

    return num_targets, loss.item()


def _speech_step(model: Module, waveforms: Tensor) -> tuple[int, float]:
    regularizer, num_targets = model(waveforms)

    regularizer.backward()

    return num_targets, regularizer.item()


def _gradients(model: Module, scale: float) -> dict[str, Tensor]:
    return {name: p.grad * scale for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)

    try:
        for name, make_model, data, rows, step in (
            ("image", _image_model, _images(), IMAGE_ROWS, _image_step),
            ("speech", _speech_model, _waveforms(), SPEECH_ROWS, _speech_step),
        ):
            model = make_model()

            ddp_model = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)

            start = sum(rows[:rank])

            num_targets, loss = step(ddp_model, data[start : start + rows[rank]])

            total = torch.tensor([num_targets])

            dist.all_reduce(total)

            # fairseq2's `normalize_grads`: undo DDP's mean, divide by all ranks' targets.
            torch.save(
                {"grads": _gradients(model, WORLD_SIZE / int(total)), "loss": loss},
                Path(result_dir, f"{name}_rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


def test_two_processes_on_halves_update_as_one_on_the_whole_batch(tmp_path: Path) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    mp.start_processes(  # type: ignore[attr-defined]  # torch does not re-export it in __all__
        _worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork"
    )

    for name, make_model, data, step in (
        ("image", _image_model, _images(), _image_step),
        ("speech", _speech_model, _waveforms(), _speech_step),
    ):
        model = make_model()

        num_targets, loss = step(model, data)

        expected = _gradients(model, 1.0 / num_targets)

        results = [torch.load(tmp_path / f"{name}_rank{rank}.pt") for rank in range(WORLD_SIZE)]

        # The ranks' sum-reduced losses add up to the whole batch's.
        assert abs(sum(result["loss"] for result in results) - loss) <= 1e-5 * abs(loss), name

        # Float32 sums in another order differ by about 1e-6 of the largest gradient (a bias
        # before a normalization has a true gradient of 0 and a few 1e-6 of noise); a wrong
        # scaling differs by the gradients themselves.
        atol = 1e-5 * max(float(value.abs().max()) for value in expected.values())

        for rank_result in results:
            grads = rank_result["grads"]

            assert grads.keys() == expected.keys(), name

            for key, value in expected.items():
                assert torch.allclose(grads[key], value, atol=atol, rtol=1e-4), (name, key)
