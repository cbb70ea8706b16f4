"""One training step of a tiny ``wav2vec2_knnvq`` model under DDP on two CPU
processes (gloo), with the paper's per-rank KNN regularizer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fairseq2.nn import BatchLayout

from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

pytestmark = pytest.mark.e2e

WORLD_SIZE = 2

NUM_STEPS = 2

# A smoothed method with the KNN regularizer and a hard one with the commitment
# loss; one process group serves both, since starting processes dominates.
METHODS = ("softmax-knn-ce", "ste-euclid")


def _train_all(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)

    try:
        for method in METHODS:
            result = _train(rank, method)

            Path(result_dir, f"{method}_rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _train(rank: int, method: str) -> dict[str, object]:
    config = WAV2VEC2_KNNVQ_ARCHS["tiny_1x1024"]()

    config.quantizer.method = method

    # Different initial weights per rank: DDP must broadcast rank 0's.
    torch.manual_seed(100 + rank)

    model = create_wav2vec2_knnvq_model(config)

    # As fairseq2 wraps it: no buffer broadcast, every parameter used.
    ddp_model = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=False)

    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)

    # Different audio per rank, so the per-rank KNN sees different batches.
    generator = torch.Generator().manual_seed(rank)

    losses = []

    for _ in range(NUM_STEPS):
        seqs = torch.randn((2, 16000), generator=generator)

        loss, output = ddp_model(seqs, BatchLayout(seqs.shape, seq_lens=[16000, 16000]))

        optimizer.zero_grad()

        (loss.aggregate / output.num_targets).backward()

        optimizer.step()

        losses.append(loss.aggregate.item())

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]

    dist.all_gather(gathered, flat)

    return {
        "losses": losses,
        "max_param_difference": (gathered[0] - gathered[1]).abs().max().item(),
        "codebook_grad_norm": model.quantizer.codebook.weight.grad.norm().item(),
    }


def test_ddp_training_steps_keep_ranks_identical(tmp_path: Path) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    # Forked workers skip re-importing torch and fairseq2, the bulk of the cost.
    mp.start_processes(  # type: ignore[attr-defined]  # torch does not re-export it in __all__
        _train_all,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="fork",
    )

    for method in METHODS:
        results = [json.loads((tmp_path / f"{method}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]

        for result in results:
            assert len(result["losses"]) == NUM_STEPS, method
            assert all(math.isfinite(loss) for loss in result["losses"]), method
            assert result["max_param_difference"] == 0.0, method
            assert result["codebook_grad_norm"] > 0.0, method

        # The ranks trained on different audio.
        assert results[0]["losses"] != results[1]["losses"], method
