"""wav2vec 2.0 self-supervised pretraining on fairseq2's recipe API.

Run ``python -m recipes.wav2vec2_knnvq.ssl --config-file CONFIG OUTPUT_DIR``; rerunning
with the same ``OUTPUT_DIR`` resumes from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import final

from torch import Tensor
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.datasets import SequenceBatch
from fairseq2.evaluator import EvalUnit
from fairseq2.logging import log
from fairseq2.metrics import MetricBag
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit

from w2v_knnvq.data.speech_dataset import SpeechManifestDataset, crop_to_start
from w2v_knnvq.quantizer import VectorQuantizer, code_counts
from w2v_knnvq.wav2vec2.frames import FrameCodes, PretrainingModel, quantize_frames, run_cnn
from w2v_knnvq.wav2vec2.lengths import model_conv_shapes, num_frames

from ...common import (
    check_resume,
    check_warmup,
    create_trainer,
    register_bad_audio_handling,
    register_checkpoint_save_errors,
    training_min_audio_len,
    update_skipped_audio,
)
from .config import SslRecipeConfig
from .criterion import CodebookShape, SslCriterion, adapt_pretraining_model
from .dataset import (
    SslDatasetSection,
    create_train_reader,
    create_valid_reader,
    register_speech_manifest_dataset,
)
from .metrics import (
    CODEBOOK_USAGE,
    INDIVIDUAL_PERPLEXITY,
    UTTERANCE_CODEBOOK_USAGE,
    CodeCounts,
    ElementwiseMean,
    UtteranceCodebookUsage,
    add_codebook_usage_metrics,
    add_ssl_metrics,
    publish_per_codebook,
    register_ssl_metric_descriptors,
)
from .warm_start import init_from_pretrained


@final
class SslRecipe(Recipe):
    @override
    def register(self, container: DependencyContainer) -> None:
        register_speech_manifest_dataset(container)

        register_ssl_metric_descriptors(container)

        register_bad_audio_handling(container)

        register_checkpoint_save_errors(container)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(SslRecipeConfig)

        check_warmup(config.lr_scheduler.config, config.regime.num_steps)

        check_resume(context)

        base_model = context.get_model()

        training_min_audio_len(config.dataset.min_audio_len, base_model)

        check_knn_k(base_model, config.dataset, context.gangs.dp.size)

        adapter = adapt_pretraining_model(base_model)

        criterion = SslCriterion(context.get_data_parallel_model(), adapter, config.loss)

        codebook_shape = adapter.codebook_shape

        dataset = context.get_dataset_as(SpeechManifestDataset)

        seed = config.common.seed

        train_reader = create_train_reader(
            dataset,
            config.dataset,
            context.gangs,
            seed=seed,
            num_accumulate=config.trainer.grad_accumulation.num_batches,
        )

        train_unit = SslTrainUnit(criterion, codebook_shape)

        if config.dataset.valid_split is None:
            return context.create_trainer(train_unit, train_reader)

        valid_reader = create_valid_reader(dataset, config.dataset, context.gangs, seed=seed + 1)

        valid_unit = SslEvalUnit(
            criterion,
            adapter.base_model,
            codebook_shape,
            min_audio_len=config.dataset.min_audio_len,
            max_audio_len=config.dataset.max_audio_len,
        )

        return create_trainer(context, train_unit, train_reader, [valid_unit], [valid_reader])

    @override
    def setup_model(self, context: RecipeContext, model: Module, newly_initialized: bool) -> Module:
        config = context.get_config_as(SslRecipeConfig)

        init_from_pretrained(
            context,
            model,
            config.init_from,
            newly_initialized=newly_initialized,
            normalize_audio=config.dataset.normalize_audio,
        )

        return model

    @property
    @override
    def config_kls(self) -> type[object]:
        return SslRecipeConfig


def check_knn_k(model: Module, section: SslDatasetSection, dp_size: int) -> None:
    """Checks ``knn_k`` of a KNN-regularized quantizer against the frames of a batch.

    The regularizer pulls the K frames nearest to each vertex; a batch with fewer frames (of
    this rank, or of all ranks with the global scope) gives it all of them instead.

    :raises RecipeError: if even the fullest batch (``max_num_elements`` samples) holds fewer
        frames than ``knn_k``.
    """
    quantizer = getattr(model, "quantizer", None)

    if not isinstance(quantizer, VectorQuantizer) or quantizer.config.spec.regularizer != "knn":
        return

    knn_k = quantizer.config.knn_k

    ranks = dp_size if quantizer.config.knn_scope == "global" else 1

    conv_shapes = model_conv_shapes(model)

    most = ranks * num_frames(section.max_num_elements, conv_shapes)

    if knn_k > most:
        raise RecipeError(
            f"`quantizer.knn_k` must be at most {most}, the frames of the fullest batch "
            f"(`dataset.max_num_elements` samples{' on each of the ' + str(ranks) + ' processes' if ranks > 1 else ''}), "
            f"but is {knn_k} instead. Lower it (the paper uses 2 to 16) or raise `dataset.max_num_elements`."
        )

    least = ranks * num_frames(section.min_audio_len, conv_shapes)

    if knn_k > least:
        log.warning(
            "`quantizer.knn_k` ({}) exceeds the {} frames of the smallest batch (one crop of `dataset.min_audio_len` samples); "
            "in such a batch the KNN regularizer pulls every frame toward every vertex.",
            knn_k,
            least,
        )


@final
class SslTrainUnit(TrainUnit[SequenceBatch]):
    def __init__(self, criterion: SslCriterion, codebook_shape: CodebookShape) -> None:
        self._criterion = criterion
        self._codebook_shape = codebook_shape

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        add_ssl_metrics(metric_bag, self._codebook_shape.num_codebooks)

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        return self._criterion(batch, metric_bag)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        publish_per_codebook(values)


@final
class SslEvalUnit(EvalUnit[SequenceBatch]):
    """Validates the loss on masked frames and the codebook usage on all frames.

    The usage figures count the codes that the eval-mode quantizer assigns to every
    frame of every validation utterance, read whole: ``codebook_usage`` over the whole
    split (summed over data-parallel ranks), ``utterance_codebook_usage`` averaged over
    utterances; ``individual_perplexity`` averages the tightness of the smoothed
    quantizers over the same frames. The loss sees what training would: utterances of
    at least ``min_audio_len`` samples, cropped to their first ``max_audio_len``.
    """

    def __init__(
        self,
        criterion: SslCriterion,
        base_model: PretrainingModel,
        codebook_shape: CodebookShape,
        *,
        min_audio_len: int,
        max_audio_len: int,
        frame_sink: Callable[[FrameCodes], None] | None = None,
    ) -> None:
        """
        :param frame_sink: Also receives the codes of every batch's frames, e.g. for the
            percentiles and histograms of an evaluation.
        """
        self._criterion = criterion
        self._base_model = base_model
        self._codebook_shape = codebook_shape
        self._min_audio_len = min_audio_len
        self._max_audio_len = max_audio_len
        self._frame_sink = frame_sink

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        shape = self._codebook_shape

        add_ssl_metrics(metric_bag, shape.num_codebooks)

        add_codebook_usage_metrics(metric_bag, shape.num_codebooks, shape.codebook_size)

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> None:
        # The utterances long enough for the loss, each cut to its first `max_audio_len` samples.
        loss_batch = crop_to_start(batch, self._max_audio_len, min_audio_len=self._min_audio_len)

        if loss_batch is not None:
            self._criterion(loss_batch, metric_bag)

        # The loss batch is a new one; the skips are the reader's note on this one.
        update_skipped_audio(metric_bag, batch)

        # Padded utterances get the codes they would get on their own: the CNN's group
        # norm ignores padding here.
        frames = quantize_frames(self._base_model, run_cnn(self._base_model, batch.seqs, batch.seq_lens))

        self._count_frames(frames, metric_bag)

        if self._frame_sink is not None:
            self._frame_sink(frames)

    def _count_frames(self, frames: FrameCodes, metric_bag: MetricBag) -> None:
        """Records the usage and tightness of the codes of every frame of a batch."""
        # (N, G, M)
        counts = code_counts(frames.codes, self._codebook_shape.codebook_size, frames.padding_mask)

        metric_bag.get(CODEBOOK_USAGE, CodeCounts).update(counts)

        metric_bag.get(UTTERANCE_CODEBOOK_USAGE, UtteranceCodebookUsage).update(counts)

        if frames.individual_perplexity is not None:
            # (N, S, G) -> (N_frames, G)
            perplexities = frames.individual_perplexity[frames.padding_mask]

            metric_bag.get(INDIVIDUAL_PERPLEXITY, ElementwiseMean).update(
                perplexities.mean(dim=0), weight=perplexities.size(0)
            )

    def _crop_for_loss(self, batch: SequenceBatch) -> SequenceBatch | None:
        """:returns: The utterances of ``batch`` long enough for the loss, each cut to its
        first ``max_audio_len`` samples; ``None`` if there are none."""
        seq_lens = batch.seq_lens

        rows = [row for row, seq_len in enumerate(seq_lens) if seq_len >= self._min_audio_len]
        if not rows:
            return None

        cropped_lens = [min(seq_lens[row], self._max_audio_len) for row in rows]

        seqs = batch.seqs[rows, : max(cropped_lens)]

        return SequenceBatch(seqs, cropped_lens)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        publish_per_codebook(values)


def main() -> None:
    """The console entry point of the recipe."""
    run_recipe_cli(SslRecipe())
