"""CTC fine-tuning of a pretrained wav2vec 2.0 encoder on fairseq2's recipe API.

Run ``python -m recipes.wav2vec2_knnvq.asr --config-file CONFIG OUTPUT_DIR``; rerunning
with the same ``OUTPUT_DIR`` resumes from its last checkpoint. The ASR model is
fairseq2's ``wav2vec2_asr`` (encoder plus a linear CTC head, blank id 0); its encoder
starts from the model named by ``pretrained_encoder``.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from pathlib import Path
from typing import final

import torch
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.data.tokenizers import TokenDecoder, Tokenizer
from fairseq2.datasets import Seq2SeqBatch
from fairseq2.evaluator import EvalUnit
from fairseq2.logging import log
from fairseq2.metrics import Mean, MetricBag, Sum, format_as_float
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrModel
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.composition.config import register_config_section
from fairseq2.recipe.config import ModelSection
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer, DependencyResolver
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit

from recipes.wav2vec2_knnvq.asr.config import AsrRecipeConfig, FinetuneSection
from recipes.wav2vec2_knnvq.asr.dataset import (
    create_train_reader,
    create_valid_reader,
    register_asr_manifest_dataset,
)
from recipes.wav2vec2_knnvq.asr.pretrained import (
    PretrainedEncoderSection,
    PretrainedModel,
    check_audio_normalization,
    load_pretrained_encoder,
    resolve_pretrained_model,
    share_encoder_config,
)
from recipes.wav2vec2_knnvq.asr.tokenizer import prepare_ctc_tokenizer
from w2v_knnvq.data.asr_dataset import AsrManifestDataset
from w2v_knnvq.text import ErrorRateMetric, check_vocab_size, ctc_greedy_decode

ERROR_RATES = "error_rates"
"""The metric bag entry that accumulates word and character edits; published as
``wer`` and ``cer``."""


def register_asr_metric_descriptors(container: DependencyContainer) -> None:
    """fairseq2 knows ``ctc_loss`` and ``wer`` (lower is better); CER is new."""
    descriptor = MetricDescriptor("cer", "Character Error Rate (CER)", 201, format_as_float)

    container.collection.register_instance(MetricDescriptor, descriptor)


@final
class AsrRecipe(Recipe):
    @override
    def register(self, container: DependencyContainer) -> None:
        register_asr_manifest_dataset(container)

        register_asr_metric_descriptors(container)

        register_config_section(container, "pretrained_encoder", PretrainedEncoderSection)

        def get_pretrained_model(resolver: DependencyResolver) -> PretrainedModel:
            section = resolver.resolve(PretrainedEncoderSection, key="pretrained_encoder")

            return resolve_pretrained_model(resolver, section)

        container.register(PretrainedModel, get_pretrained_model, singleton=True)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(AsrRecipeConfig)

        pretrained = context.resolver.resolve(PretrainedModel)

        check_audio_normalization(pretrained, config.dataset.normalize_audio, context.output_dir / "config.yaml")

        dataset = context.get_dataset_as(AsrManifestDataset)

        tokenizer, tokenizer_path = prepare_ctc_tokenizer(
            config.tokenizer,
            dataset.transcript_file(config.dataset.train_split),
            context.output_dir,
            context.gangs,
        )

        # The model is built on the first `get_model()` from the (singleton) model
        # section, so its overrides must be complete by then.
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
            seed=config.common.seed,
            num_accumulate=config.trainer.grad_accumulation.num_batches,
        )

        train_unit = AsrTrainUnit(criterion, model, config.finetune)

        if config.dataset.valid_split is None:
            return context.create_trainer(train_unit, train_reader)

        valid_reader = create_valid_reader(
            dataset, config.dataset, tokenizer, context.gangs, seed=config.common.seed + 1
        )

        valid_unit = AsrEvalUnit(criterion, tokenizer.create_decoder())

        return context.create_trainer(train_unit, train_reader, [valid_unit], [valid_reader])

    @override
    def setup_model(self, context: RecipeContext, model: Module, newly_initialized: bool) -> Module:
        # A resumed run restores the whole model from its own checkpoint afterwards.
        if newly_initialized:
            pretrained = context.resolver.resolve(PretrainedModel)

            load_pretrained_encoder(model, pretrained.load_shared_state_dict(), pretrained.card.name)

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
    overrides = section.config_overrides

    if overrides is None:
        overrides = section.config_overrides = {}

    if not isinstance(overrides, MutableMapping):
        raise RecipeError("`model.config_overrides` must be a mapping of model configuration fields.")

    return overrides


def _set_target_vocab_size(overrides: MutableMapping[str, object], tokenizer: Tokenizer, tokenizer_path: Path) -> None:
    """Sizes the CTC head to the tokenizer, or checks a size the user set explicitly."""
    vocab_size = tokenizer.vocab_info.size

    explicit_size = overrides.get("target_vocab_size")

    if explicit_size is None:
        overrides["target_vocab_size"] = vocab_size

        return

    try:
        check_vocab_size(vocab_size, int(explicit_size), tokenizer_path)  # type: ignore[call-overload]
    except ValueError as ex:
        raise RecipeError(f"`model.config_overrides.target_vocab_size`: {ex}") from None


@final
class CtcCriterion:
    """Computes the CTC loss of a batch and records it."""

    def __init__(self, model: Module) -> None:
        """:param model: The ASR model, possibly wrapped for data parallelism."""
        self._model = model

    def __call__(
        self, batch: Seq2SeqBatch, metric_bag: MetricBag, *, return_logits: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """:returns: The CTC loss summed over the batch's utterances and, with
        ``return_logits``, the logits ``(N, S_enc, V)`` and the frame counts ``(N,)``."""
        source_seqs, source_layout = batch.as_source_input()
        target_seqs, target_layout = batch.as_target_input()

        loss, logits, logits_layout = self._model(
            source_seqs, source_layout, target_seqs, target_layout, return_logits=True
        )

        if not torch.isfinite(loss):
            raise RecipeError(
                f"The CTC loss is {float(loss)} on a batch of {batch.num_examples} utterances "
                f"({batch.example['ids'][:4]}...); lower the learning rate or check the audio."  # type: ignore[index]
            )

        _update_ctc_metrics(metric_bag, loss, batch)

        if not return_logits:
            return loss, None, None

        return loss, logits, logits_layout.seq_lens_pt


def _add_ctc_metrics(metric_bag: MetricBag) -> None:
    metric_bag.add("ctc_loss", Mean())
    metric_bag.add("num_examples", Sum())
    metric_bag.add("num_source_elements", Sum())
    metric_bag.add("num_target_elements", Sum())


@torch.inference_mode()
def _update_ctc_metrics(metric_bag: MetricBag, loss: Tensor, batch: Seq2SeqBatch) -> None:
    """Records the loss per utterance, the normalization wav2vec 2.0 fine-tuning uses."""
    metric_bag.get("ctc_loss", Mean).update(loss.detach().float() / batch.num_examples, weight=batch.num_examples)
    metric_bag.get("num_examples", Sum).update(batch.num_examples)
    metric_bag.get("num_source_elements", Sum).update(sum(batch.source_seq_lens))
    metric_bag.get("num_target_elements", Sum).update(sum(batch.target_seq_lens))


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
        model = self._model
        freeze_steps = self._section.freeze_encoder_steps

        encoder_frozen = step_nr <= freeze_steps

        if step_nr == 1 and encoder_frozen:
            log.info("Training only the CTC head for the first {} steps.", freeze_steps)
        elif step_nr == freeze_steps + 1:
            log.info("Unfreezing the encoder at step {}.", step_nr)

        for module in (model.encoder_frontend, model.encoder, model.masker):
            if module is not None:
                module.requires_grad_(not encoder_frozen)

        if self._section.freeze_feature_extractor:
            feature_extractor = model.encoder_frontend.feature_extractor

            if feature_extractor is not None:
                feature_extractor.requires_grad_(False)

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        _add_ctc_metrics(metric_bag)

    @override
    def process_batch(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        loss, _, _ = self._criterion(batch, metric_bag)

        return loss, batch.num_examples


@final
class AsrEvalUnit(EvalUnit[Seq2SeqBatch]):
    """Validates the CTC loss and the WER and CER of greedy CTC decoding."""

    def __init__(self, criterion: CtcCriterion, decoder: TokenDecoder) -> None:
        self._criterion = criterion
        self._decoder = decoder

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        _add_ctc_metrics(metric_bag)

        metric_bag.add(ERROR_RATES, ErrorRateMetric())

    @override
    def process_batch(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> None:
        _, logits, frame_counts = self._criterion(batch, metric_bag, return_logits=True)

        if logits is None or frame_counts is None:
            raise RecipeError("The CTC criterion returned no logits to decode.")

        hyps = ctc_greedy_decode(logits, frame_counts, self._decoder)

        refs = batch.example["transcripts"]  # type: ignore[index]

        metric_bag.get(ERROR_RATES, ErrorRateMetric).update(hyps=hyps, refs=refs)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        publish_error_rates(values)


def publish_error_rates(values: MutableMapping[str, object]) -> None:
    """Replaces the accumulated edits with the ``wer`` and ``cer`` figures (percent)."""
    rates = values.pop(ERROR_RATES, None)

    if rates is None:
        return

    for name, value in rates.as_metric_values().items():  # type: ignore[attr-defined]
        if not math.isfinite(value):
            raise RecipeError(f"The validation {name.upper()} is {value}; the references may be empty.")

        values[name] = value


def main() -> None:
    """The console entry point of the recipe."""
    run_recipe_cli(AsrRecipe())
