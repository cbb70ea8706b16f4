"""The configuration of the CTC fine-tuning recipe.

The defaults follow wav2vec 2.0's fine-tuning on the 10 h LibriSpeech subset (Baevski et
al., 2020, BASE model): Adam with betas (0.9, 0.98), learning rate 5e-5 on a tri-stage
schedule (10% warmup, 40% hold, 50% decay to 5%), 20k steps with the Transformer frozen
for the first 10k, the CNN frozen throughout, and time and channel masking. The presets
in ``configs/`` spell every choice out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fairseq2.recipe.config import (
    ADAMW_OPTIMIZER,
    TRI_STAGE_LR,
    AdamWConfig,
    CommonSection,
    GangSection,
    GradAccumulationConfig,
    LRSchedulerSection,
    MixedPrecisionConfig,
    ModelSection,
    OptimizerSection,
    RegimeSection,
    TrainerSection,
    TriStageLRConfig,
)
from fairseq2.utils.validation import ValidationResult

from .dataset import AsrDatasetSection
from .pretrained import PretrainedEncoderSection
from .tokenizer import CtcTokenizerSection


@dataclass(kw_only=True)
class FinetuneSection:
    freeze_encoder_steps: int = 10_000
    """The Transformer (and everything before it) is frozen for this many steps, so
    that only the new CTC head trains at first."""

    freeze_feature_extractor: bool = True
    """Keep the CNN feature extractor frozen for the whole run, as wav2vec 2.0 does."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.freeze_encoder_steps < 0:
            result.add_error(
                f"`freeze_encoder_steps` must be non-negative, but is {self.freeze_encoder_steps} instead."
            )

        return result


@dataclass(kw_only=True)
class AsrRecipeConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(family="wav2vec2_asr", arch="base_10h"))
    """The ASR model. The structure of its encoder (``encoder_config`` minus the
    dropout fields) is taken from the pretrained model; ``target_vocab_size`` from the
    tokenizer."""

    pretrained_encoder: PretrainedEncoderSection = field(default_factory=lambda: PretrainedEncoderSection())

    tokenizer: CtcTokenizerSection = field(default_factory=lambda: CtcTokenizerSection())

    dataset: AsrDatasetSection = field(default_factory=lambda: AsrDatasetSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    trainer: TrainerSection = field(
        default_factory=lambda: TrainerSection(
            mixed_precision=MixedPrecisionConfig(mode="static", dtype=torch.bfloat16),
            # 8 batches of 3.2M samples: the paper's 2 GPUs x 4 accumulated batches.
            grad_accumulation=GradAccumulationConfig(num_batches=8),
        )
    )

    finetune: FinetuneSection = field(default_factory=lambda: FinetuneSection())

    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(
            name=ADAMW_OPTIMIZER,
            config=AdamWConfig(lr=5e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0),
        )
    )

    lr_scheduler: LRSchedulerSection = field(
        default_factory=lambda: LRSchedulerSection(
            name=TRI_STAGE_LR,
            config=TriStageLRConfig(stage_ratio=(0.1, 0.4, 0.5), start_lr_scale=0.01, final_lr_scale=0.05),
        )
    )

    regime: RegimeSection = field(
        default_factory=lambda: RegimeSection(
            num_steps=20_000,
            validate_after_n_steps=10_000,
            validate_every_n_steps=1_000,
            checkpoint_every_n_steps=1_000,
            score_metric="wer",
            keep_best_n_checkpoints=1,
            keep_last_n_checkpoints=1,
            publish_metrics_every_n_steps=200,
        )
    )

    common: CommonSection = field(default_factory=lambda: CommonSection())

    def validate(self) -> ValidationResult:
        """The fields of ``model.config_overrides`` that the recipe completes at run time
        (``target_vocab_size`` from the tokenizer, ``encoder_config`` from the pretrained
        model) must have the form it completes, so a wrong form is a configuration error."""
        result = ValidationResult()

        overrides = self.model.config_overrides

        if overrides is None:
            return result

        if not isinstance(overrides, Mapping):
            result.add_error(
                "`model.config_overrides` must be a mapping of model configuration fields, "
                f"but is of type `{type(overrides).__name__}` instead."
            )

            return result

        encoder_overrides = overrides.get("encoder_config")

        if encoder_overrides is not None and not isinstance(encoder_overrides, Mapping):
            result.add_error(
                "`model.config_overrides.encoder_config` must be a mapping of encoder fields, "
                f"but is of type `{type(encoder_overrides).__name__}` instead."
            )

        vocab_size = overrides.get("target_vocab_size")

        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            result.add_error(
                f"`model.config_overrides.target_vocab_size` must be an integer, but is {vocab_size!r} instead."
            )

        return result
