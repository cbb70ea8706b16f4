"""The configuration of the wav2vec 2.0 pretraining recipe.

The defaults are a starting point on the ``paper_2x320`` architecture (AdamW betas
(0.9, 0.99), no weight decay, cosine annealing to 5e-6); the paper's two settings, with
their masking, batch sizes and schedules, are the presets ``configs/paper_1x1024.yaml`` and
``configs/paper_2x320.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fairseq2.recipe.config import (
    ADAMW_OPTIMIZER,
    COSINE_ANNEALING_LR,
    AdamWConfig,
    CommonSection,
    CosineAnnealingLRConfig,
    GangSection,
    LRSchedulerSection,
    MixedPrecisionConfig,
    ModelSection,
    OptimizerSection,
    RegimeSection,
    TrainerSection,
)

from .criterion import SslLossSection
from .dataset import SslDatasetSection
from .warm_start import InitFromSection


@dataclass(kw_only=True)
class SslRecipeConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(family="wav2vec2_knnvq", arch="paper_2x320"))

    init_from: InitFromSection = field(default_factory=lambda: InitFromSection())
    """A pretrained wav2vec 2.0 model whose CNN and Transformer a new run starts from;
    unset, the model starts from random weights."""

    dataset: SslDatasetSection = field(default_factory=lambda: SslDatasetSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    trainer: TrainerSection = field(
        default_factory=lambda: TrainerSection(
            mixed_precision=MixedPrecisionConfig(mode="static", dtype=torch.bfloat16)
        )
    )

    loss: SslLossSection = field(default_factory=lambda: SslLossSection())

    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(
            name=ADAMW_OPTIMIZER,
            config=AdamWConfig(lr=5e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0),
        )
    )

    lr_scheduler: LRSchedulerSection = field(
        default_factory=lambda: LRSchedulerSection(
            name=COSINE_ANNEALING_LR,
            config=CosineAnnealingLRConfig(num_warmup_steps=10_000, final_lr=5e-6, final_lr_scale=None),
        )
    )

    regime: RegimeSection = field(
        default_factory=lambda: RegimeSection(
            num_steps=61_200,
            validate_every_n_steps=5_000,
            checkpoint_every_n_steps=5_000,
            keep_last_n_checkpoints=2,
            publish_metrics_every_n_steps=200,
        )
    )

    common: CommonSection = field(default_factory=lambda: CommonSection())
