"""The configuration of the pretraining evaluation: the run, its checkpoint and the splits.

The model, its crop lengths, audio normalization and loss weights come from the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fairseq2.recipe.config import CommonSection, DatasetSection, EvaluatorSection, GangSection
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.data.speech_dataset import SPEECH_MANIFEST_DATASET_FAMILY

from ....common import EvaluatedRunSection, split_list_errors


@dataclass(kw_only=True)
class SslEvalDatasetSection(DatasetSection):
    """The splits to evaluate, ``{manifest_dir}/{split}.tsv`` (``config_overrides.manifest_dir``),
    each read whole in manifest order as the pretraining recipe reads its validation split."""

    family: str | None = SPEECH_MANIFEST_DATASET_FAMILY

    splits: list[str] = field(default_factory=lambda: ["valid"])

    max_num_elements: int = 3_200_000
    """The number of audio samples per batch and rank, padding included (raised to the
    run's ``max_audio_len`` if smaller)."""

    def validate(self) -> ValidationResult:
        result = super().validate()

        for message in split_list_errors("splits", self.splits):
            result.add_error(message)

        if self.max_num_elements < 1:
            result.add_error(f"`max_num_elements` must be at least 1, but is {self.max_num_elements} instead.")

        return result


@dataclass(kw_only=True)
class SslEvalOutputSection:
    histograms: bool = True
    """Write Figure 2's histograms (needs matplotlib)."""


@dataclass(kw_only=True)
class SslEvalRecipeConfig:
    run: EvaluatedRunSection = field(default_factory=lambda: EvaluatedRunSection())

    dataset: SslEvalDatasetSection = field(default_factory=lambda: SslEvalDatasetSection())

    output: SslEvalOutputSection = field(default_factory=lambda: SslEvalOutputSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    evaluator: EvaluatorSection = field(default_factory=lambda: EvaluatorSection())

    common: CommonSection = field(default_factory=lambda: CommonSection(no_sweep_dir=True))
    """``no_sweep_dir``: the figures and tables go straight to the output directory."""
