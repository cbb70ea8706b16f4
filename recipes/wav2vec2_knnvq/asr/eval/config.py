"""The configuration of the evaluation recipe.

Only the fine-tuning run (``run``, as in every evaluation recipe) is required;
the model, its tokenizer and the audio normalization come from the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fairseq2.recipe.config import CommonSection, DatasetSection, EvaluatorSection, GangSection
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.data.asr_dataset import ASR_MANIFEST_DATASET_FAMILY
from w2v_knnvq.data.audio_reading import DEFAULT_MAX_BAD_AUDIO_FRACTION, bad_audio_fraction_error
from w2v_knnvq.text import beam_search_setting_errors

from ....common import EvaluatedRunSection, split_list_errors


@dataclass(kw_only=True)
class AsrEvalDatasetSection(DatasetSection):
    """The splits to evaluate, each ``{manifest_dir}/{split}.tsv`` with its ``{split}.wrd``
    transcripts (``config_overrides.manifest_dir``), read whole in manifest order as the
    fine-tuning recipe reads its validation split."""

    family: str | None = ASR_MANIFEST_DATASET_FAMILY

    splits: list[str] = field(default_factory=lambda: ["valid"])

    max_num_elements: int = 3_200_000
    """The number of audio samples per batch and rank, padding included (at least the
    longest utterance of the split)."""

    num_parallel_calls: int = 4
    """The number of utterances decoded in parallel."""

    num_prefetch: int = 4

    max_bad_audio_fraction: float = DEFAULT_MAX_BAD_AUDIO_FRACTION
    """Utterances whose audio cannot be used are skipped with a warning and counted; the
    evaluation stops, naming the files, once they pass this fraction of the split."""

    def validate(self) -> ValidationResult:
        result = super().validate()

        for message in split_list_errors("splits", self.splits):
            result.add_error(message)

        if self.max_num_elements < 1:
            result.add_error(f"`max_num_elements` must be at least 1, but is {self.max_num_elements} instead.")

        if (error := bad_audio_fraction_error(self.max_bad_audio_fraction)) is not None:
            result.add_error(error)

        return result


@dataclass(kw_only=True)
class EvalTokenizerSection:
    path: Path | None = None
    """The asset card (``NAME.yaml``) or ``NAME.model`` file of the tokenizer; ``None``
    takes the one the fine-tuning run used, as its ``config.yaml`` records it."""

    def __post_init__(self) -> None:
        # Resolved here so that the evaluation's `config.yaml` records the absolute path.
        if self.path is not None:
            self.path = self.path.expanduser().resolve()


@dataclass(kw_only=True)
class DecodingSection:
    """Beam-search decoding with a lexicon and a KenLM language model, scored next to greedy
    decoding (:class:`~w2v_knnvq.text.CtcBeamSearchDecoder`). It runs when ``beam_search``
    is set or a lexicon or language model is given."""

    beam_search: bool = False

    lexicon: Path | None = None
    """The lexicon (``WORD<TAB>T O K E N S`` per line); ``None`` builds one from the
    fine-tuning run's training transcripts (``{manifest_dir}/{train_split}.wrd`` of the
    evaluated dataset) into the output directory."""

    lm: Path | None = None
    """A KenLM n-gram over words, ARPA or binary; ``None`` searches with the lexicon alone."""

    lm_weight: float = 2.0

    word_score: float = 0.0

    beam_size: int = 50

    beam_threshold: float = 25.0

    def __post_init__(self) -> None:
        # Resolved here so that the evaluation's `config.yaml` records absolute paths.
        if self.lexicon is not None:
            self.lexicon = self.lexicon.expanduser().resolve()

        if self.lm is not None:
            self.lm = self.lm.expanduser().resolve()

    @property
    def enabled(self) -> bool:
        return self.beam_search or self.lexicon is not None or self.lm is not None

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        for error in beam_search_setting_errors(
            beam_size=self.beam_size,
            beam_threshold=self.beam_threshold,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
        ):
            result.add_error(error)

        for name, path in (("lexicon", self.lexicon), ("lm", self.lm)):
            if path is not None and not path.is_file():
                result.add_error(f"`{name}` must be an existing file, but {path} is not one.")

        return result


@dataclass(kw_only=True)
class AsrEvalRecipeConfig:
    run: EvaluatedRunSection = field(default_factory=lambda: EvaluatedRunSection(checkpoint="best"))
    """The fine-tuning run; ``checkpoint`` ``best`` (the default) has the lowest validation WER."""

    dataset: AsrEvalDatasetSection = field(default_factory=lambda: AsrEvalDatasetSection())

    tokenizer: EvalTokenizerSection = field(default_factory=lambda: EvalTokenizerSection())

    decoding: DecodingSection = field(default_factory=lambda: DecodingSection())

    gang: GangSection = field(default_factory=lambda: GangSection())

    evaluator: EvaluatorSection = field(default_factory=lambda: EvaluatorSection())

    common: CommonSection = field(default_factory=lambda: CommonSection(no_sweep_dir=True))
    """``no_sweep_dir``: the transcripts and figures go straight to the output directory."""
