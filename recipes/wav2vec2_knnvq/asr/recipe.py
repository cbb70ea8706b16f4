"""CTC fine-tuning of a pretrained wav2vec 2.0 encoder on fairseq2's recipe API.

Run ``python -m recipes.wav2vec2_knnvq.asr --config-file CONFIG OUTPUT_DIR``; rerunning
with the same ``OUTPUT_DIR`` resumes from its last checkpoint. The ASR model is
fairseq2's ``wav2vec2_asr`` (encoder plus a linear CTC head, blank id 0); its encoder
starts from the model named by ``pretrained_encoder``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TypeAlias, final

from torch import Tensor
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.data.tokenizers import TokenDecoder, Tokenizer
from fairseq2.datasets import Seq2SeqBatch
from fairseq2.error import InternalError
from fairseq2.evaluator import EvalUnit
from fairseq2.logging import log
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrModel
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.composition.config import register_config_section
from fairseq2.recipe.config import ModelSection
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer, DependencyResolver
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit

from w2v_knnvq.data.asr_dataset import AsrManifestDataset
from w2v_knnvq.text import check_vocab_size, ctc_greedy_decode

from ...common import (
    check_resume,
    create_trainer,
    register_bad_audio_handling,
    register_checkpoint_save_errors,
    training_min_audio_len,
)
from .config import AsrRecipeConfig, FinetuneSection
from .criterion import CtcCriterion, CtcOutput
from .dataset import (
    batch_transcripts,
    create_train_reader,
    create_valid_reader,
    register_asr_manifest_dataset,
    section_read_options,
)
from .metrics import (
    add_ctc_metrics,
    add_error_rate_metrics,
    publish_error_rates,
    register_asr_metric_descriptors,
    update_error_rates,
)
from .pretrained import (
    PretrainedEncoder,
    PretrainedEncoderSection,
    check_audio_normalization,
    load_pretrained_encoder,
    resolve_pretrained_encoder,
    share_encoder_config,
)
from .tokenizer import prepare_ctc_tokenizer

HypothesisSink: TypeAlias = Callable[[Seq2SeqBatch, CtcOutput, list[str]], None]
"""Receives each batch an :class:`AsrEvalUnit` decodes with the model's output and the
greedy hypotheses, in batch order."""


@final
class AsrRecipe(Recipe):
    @override
    def register(self, container: DependencyContainer) -> None:
        register_asr_manifest_dataset(container)

        register_asr_metric_descriptors(container)

        register_bad_audio_handling(container)

        register_checkpoint_save_errors(container)

        register_config_section(container, "pretrained_encoder", PretrainedEncoderSection)

        def get_pretrained_encoder(resolver: DependencyResolver) -> PretrainedEncoder:
            section = resolver.resolve(PretrainedEncoderSection, key="pretrained_encoder")

            return resolve_pretrained_encoder(resolver, section)

        container.register(PretrainedEncoder, get_pretrained_encoder, singleton=True)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(AsrRecipeConfig)

        check_resume(context)

        pretrained = context.resolver.resolve(PretrainedEncoder)

        check_audio_normalization(pretrained, config.dataset.normalize_audio, context.output_dir / "config.yaml")

        dataset = context.get_dataset_as(AsrManifestDataset)

        tokenizer, tokenizer_path = prepare_ctc_tokenizer(
            config.tokenizer,
            dataset.transcript_file(config.dataset.train_split),
            context.output_dir,
            context.gangs,
        )

        # These values come from the tokenizer the run trains into its output directory and
        # from a model found through the run's asset store: neither exists when fairseq2 reads
        # the configuration (`SupportsStructure` there cannot reach them), so the recipe
        # completes the (singleton) model section here, before its first `get_model()`, and
        # `setup_model` refuses a model that fairseq2 built without them.
        model_overrides = _model_overrides(context.resolver.resolve(ModelSection))

        _set_target_vocab_size(model_overrides, tokenizer, tokenizer_path)

        share_encoder_config(context.resolver, pretrained, model_overrides)

        model = context.get_model_as(Wav2Vec2AsrModel)

        criterion = CtcCriterion(context.get_data_parallel_model())

        train_reader = create_train_reader(
            dataset,
            config.dataset,
            tokenizer,
            context.gangs,
            min_audio_len=training_min_audio_len(config.dataset.min_audio_len, model),
            seed=config.common.seed,
            num_accumulate=config.trainer.grad_accumulation.num_batches,
        )

        train_unit = AsrTrainUnit(criterion, model, config.finetune)

        valid_split = config.dataset.valid_split

        if valid_split is None:
            return context.create_trainer(train_unit, train_reader)

        valid_reader = create_valid_reader(
            dataset,
            valid_split,
            tokenizer,
            context.gangs,
            section_read_options(config.dataset, seed=config.common.seed + 1),
            max_num_batches=config.dataset.max_num_valid_batches,
        )

        valid_unit = AsrEvalUnit(criterion, tokenizer.create_decoder())

        return create_trainer(context, train_unit, train_reader, [valid_unit], [valid_reader])

    @override
    def setup_model(self, context: RecipeContext, model: Module, newly_initialized: bool) -> Module:
        _check_completed_model(model, context.resolver.resolve(ModelSection))

        # A resumed run restores the whole model from its own checkpoint afterwards.
        if newly_initialized:
            pretrained = context.resolver.resolve(PretrainedEncoder)

            if context.get_config_as(AsrRecipeConfig).pretrained_encoder.load_weights:
                load_pretrained_encoder(model, pretrained.load_shared_state_dict(), pretrained.source)
            else:
                log.info("The encoder of the structure of {} starts from random weights (`pretrained_encoder.load_weights=false`).", pretrained.source)  # fmt: skip

        return model

    @override
    def has_static_autograd_graph(self, context: RecipeContext) -> bool:
        # Freezing changes which parameters receive gradients during the run.
        return False

    @property
    @override
    def config_kls(self) -> type[object]:
        return AsrRecipeConfig


def _model_overrides(section: ModelSection) -> MutableMapping[str, object]:
    """``model.config_overrides``, a mapping (:meth:`AsrRecipeConfig.validate`), created if unset."""
    overrides = section.config_overrides

    if overrides is None:
        overrides = section.config_overrides = {}

    if not isinstance(overrides, MutableMapping):
        raise InternalError(f"`model.config_overrides` is of type `{type(overrides)}` after validation.")

    return overrides


def _check_completed_model(model: Module, section: ModelSection) -> None:
    """:raises RecipeError: if fairseq2 built ``model`` before the recipe completed ``section``
    (a fairseq2 whose build order differs from 0.8.1's): its CTC head or encoder would not be
    the ones the tokenizer and the pretrained model need."""
    overrides = section.config_overrides

    completed = False

    if isinstance(overrides, Mapping) and isinstance(model, Wav2Vec2AsrModel):
        encoder_overrides = overrides.get("encoder_config")

        completed = (
            isinstance(encoder_overrides, Mapping)
            and model.final_proj.output_dim == overrides.get("target_vocab_size")
            and model.model_dim == encoder_overrides.get("model_dim")
        )

    if not completed:
        raise RecipeError(
            "The ASR model was built before the recipe set `target_vocab_size` and the encoder structure in "
            "`model.config_overrides` (fairseq2's recipe runner builds the model at another point than 0.8.1's); "
            "run the recipe with fairseq2 0.8.1."
        )


def _set_target_vocab_size(overrides: MutableMapping[str, object], tokenizer: Tokenizer, tokenizer_path: Path) -> None:
    """Sizes the CTC head to the tokenizer, or checks a size the user set explicitly."""
    vocab_size = tokenizer.vocab_info.size

    explicit_size = overrides.setdefault("target_vocab_size", vocab_size)

    if not isinstance(explicit_size, int):
        raise RecipeError(
            f"`model.config_overrides.target_vocab_size` must be an integer, but is {explicit_size!r} instead."
        )

    try:
        check_vocab_size(vocab_size, explicit_size, tokenizer_path)
    except ValueError as ex:
        raise RecipeError(f"`model.config_overrides.target_vocab_size`: {ex}") from None


@final
class AsrTrainUnit(TrainUnit[Seq2SeqBatch]):
    """Trains with the CTC loss averaged over utterances.

    For the first ``freeze_encoder_steps`` steps only the CTC head trains; the CNN stays
    frozen throughout when ``freeze_feature_extractor`` is set.
    """

    def __init__(self, criterion: CtcCriterion, model: Wav2Vec2AsrModel, section: FinetuneSection) -> None:
        self._criterion = criterion
        self._model = model
        self._section = section

    @override
    def set_step_nr(self, step_nr: int) -> None:
        freeze_steps = self._section.freeze_encoder_steps

        encoder_frozen = step_nr <= freeze_steps

        if step_nr == 1 and encoder_frozen:
            log.info("Training only the CTC head for the first {} steps.", freeze_steps)
        elif step_nr == freeze_steps + 1:
            log.info("Unfreezing the encoder at step {}.", step_nr)

        self._freeze(encoder_frozen)

    def _freeze(self, encoder_frozen: bool) -> None:
        model = self._model

        for module in (model.encoder_frontend, model.encoder, model.masker):
            if module is not None:
                module.requires_grad_(not encoder_frozen)

        feature_extractor = model.encoder_frontend.feature_extractor

        if self._section.freeze_feature_extractor and feature_extractor is not None:
            feature_extractor.requires_grad_(False)

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        add_ctc_metrics(metric_bag)

    @override
    def process_batch(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        output = self._criterion(batch, metric_bag)

        return output.loss, batch.num_examples


@final
class AsrEvalUnit(EvalUnit[Seq2SeqBatch]):
    """Validates the CTC loss and the WER and CER of greedy CTC decoding."""

    def __init__(
        self, criterion: CtcCriterion, decoder: TokenDecoder, *, hypothesis_sink: HypothesisSink | None = None
    ) -> None:
        """:param hypothesis_sink: Also receives every decoded batch (the evaluation
        recipe keeps the transcriptions this way)."""
        self._criterion = criterion
        self._decoder = decoder
        self._hypothesis_sink = hypothesis_sink

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        add_ctc_metrics(metric_bag)

        add_error_rate_metrics(metric_bag)

    @override
    def process_batch(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> None:
        output = self._criterion(batch, metric_bag)

        hyps = ctc_greedy_decode(output.logits, output.frame_counts, self._decoder)

        update_error_rates(metric_bag, hyps=hyps, refs=batch_transcripts(batch))

        if self._hypothesis_sink is not None:
            self._hypothesis_sink(batch, output, hyps)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        publish_error_rates(values)


def main() -> None:
    """The console entry point of the recipe."""
    run_recipe_cli(AsrRecipe())
