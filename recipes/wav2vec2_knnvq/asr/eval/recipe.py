"""Evaluates a fine-tuned CTC model on manifest splits: greedy decoding, and optionally beam
search with a lexicon and a KenLM language model, scored side by side (WER and CER).

Run through fairseq2's recipe CLI, e.g.::

    python -m recipes.wav2vec2_knnvq.asr.eval --config run.run_dir=FINETUNE_DIR \\
        dataset.config_overrides.manifest_dir=manifests "dataset.splits=[dev-clean,test-clean]" -- EVAL_DIR

``FINETUNE_DIR`` is the output directory of ``python -m recipes.wav2vec2_knnvq.asr`` (or
its ``checkpoints`` directory); ``run.checkpoint`` picks ``best`` (the default), ``last``
or a step number. The model is loaded from that checkpoint with the run's
``checkpoints/model.yaml``. The run's ``config.yaml`` names the tokenizer (unless
``tokenizer.path`` is set) and whether the audio is normalized, as in training. Each split is
read and scored by the fine-tuning recipe's validation reader and unit, on one process or
several (``torchrun``). Rank 0 writes ``EVAL_DIR/evaluation.json`` (the run, the step and a
record per split), ``EVAL_DIR/summary.md`` (the WER and CER table) and the transcript files of
:mod:`.transcripts`, next to fairseq2's ``config.yaml``, logs and metrics.

Beam search runs with any of (before ``--``)::

    --lm LM.arpa --lexicon LEXICON.txt --lm-weight 2 --word-score 0 --beam-size 50 --beam-search

which stand for ``decoding.lm`` and its neighbours (:class:`.config.DecodingSection`); with no
lexicon, one is built from the run's training transcripts, and with no language model the
lexicon alone constrains the search.
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import final

from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe import Recipe, RecipeContext  # isort: skip
from fairseq2.data.tokenizers import TokenDecoder, Tokenizer
from fairseq2.datasets import DataReader, Seq2SeqBatch
from fairseq2.evaluator import EvalUnit
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.metrics import MetricBag
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrModel
from fairseq2.recipe.cli import main as run_recipe_cli
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task

from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.text import check_vocab_size

from ....common import (
    EvaluationTask,
    create_run_evaluator,
    lock_output_dir,
    register_bad_audio_handling,
    write_evaluation,
)
from ..criterion import CtcCriterion
from ..dataset import create_valid_reader, register_asr_manifest_dataset
from ..metrics import register_asr_metric_descriptors
from ..recipe import AsrEvalUnit
from ..tokenizer import load_recipe_tokenizer
from .config import AsrEvalDatasetSection, AsrEvalRecipeConfig
from .decoding import beam_settings, create_beam_decoder, expand_decoding_options
from .finetune_run import (
    find_finetuned_checkpoint,
    load_finetuned_model,
    run_normalize_audio,
    run_tokenizer_path,
)
from .transcripts import TranscriptCollector, TranscriptFiles, rates_table


@final
class AsrEvalRecipe(Recipe):
    @override
    def register(self, container: DependencyContainer) -> None:
        register_asr_manifest_dataset(container)

        register_asr_metric_descriptors(container)

        register_bad_audio_handling(container)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(AsrEvalRecipeConfig)

        lock_output_dir(context)

        run = find_finetuned_checkpoint(config.run)

        log.info("Evaluating the checkpoint of step {} in {}.", run.step, run.checkpoints_dir)

        tokenizer_path = config.tokenizer.path if config.tokenizer.path is not None else run_tokenizer_path(run)

        normalize_audio = run_normalize_audio(run)

        tokenizer = load_recipe_tokenizer(tokenizer_path)

        model = load_finetuned_model(run, context.device)

        _check_vocab_size(tokenizer, model, tokenizer_path)

        dataset = context.get_dataset_as(AsrManifestDataset)

        splits = config.dataset.splits

        if context.output_dir.resolve() == dataset.manifest_dir.resolve():
            raise RecipeError(
                f"The output directory must not be the manifest directory {dataset.manifest_dir}, but is instead: "
                f"the evaluation writes `{splits[0]}.tsv` (its transcriptions), which would replace the "
                "manifest of the split. Give another output directory."
            )

        beam_decoder = None

        if config.decoding.enabled:
            beam_decoder = create_beam_decoder(config.decoding, tokenizer, dataset, run, context.output_dir, context.gangs)  # fmt: skip

        criterion = CtcCriterion(model)

        units: list[AsrReportUnit] = []
        readers: list[DataReader[Seq2SeqBatch]] = []

        for split in splits:
            files = TranscriptFiles(
                output_dir=context.output_dir,
                split=split,
                settings={
                    "split": split,
                    "checkpoint": str(run.model_dir),
                    "tokenizer": str(tokenizer_path),
                    "normalize_audio": normalize_audio,
                },
                beam_settings=None if beam_decoder is None else beam_settings(beam_decoder.options),
            )

            transcripts = TranscriptCollector(beam_decoder)

            units.append(AsrReportUnit(criterion, tokenizer.create_decoder(), transcripts, files, context.gangs))

            readers.append(
                create_eval_reader(
                    dataset,
                    config.dataset,
                    split,
                    tokenizer,
                    context.gangs,
                    normalize_audio=normalize_audio,
                    seed=config.common.seed,
                )
            )

        def write() -> None:
            records = []

            for unit in units:
                if unit.record is None:
                    raise RecipeError(f"The split `{unit.name}` was not scored.")

                records.append(unit.record)

            summary = "\n\n".join(f"## {record['split']}\n\n{rates_table(record)}" for record in records)

            write_evaluation(context.output_dir, run, records, summary)

        return EvaluationTask(create_run_evaluator(context, model, units, readers), context.gangs, write)

    @property
    @override
    def config_kls(self) -> type[object]:
        return AsrEvalRecipeConfig


def _check_vocab_size(tokenizer: Tokenizer, model: Wav2Vec2AsrModel, tokenizer_path: Path) -> None:
    """:raises RecipeError: if the CTC head of ``model`` does not fit ``tokenizer``."""
    try:
        check_vocab_size(tokenizer.vocab_info.size, model.final_proj.output_dim, tokenizer_path)
    except ValueError as ex:
        raise RecipeError(str(ex)) from None


def create_eval_reader(
    dataset: AsrManifestDataset,
    section: AsrEvalDatasetSection,
    split: str,
    tokenizer: Tokenizer,
    gangs: Gangs,
    *,
    normalize_audio: bool,
    seed: int,
) -> DataReader[Seq2SeqBatch]:
    """Reads ``split`` whole, in manifest order, with the reader of the fine-tuning
    recipe's validation (``section``'s batching and audio settings).

    :param normalize_audio: Standardize each utterance, as the model was fine-tuned.
    """
    options = AsrReadOptions(
        max_num_elements=section.max_num_elements,
        normalize_audio=normalize_audio,
        num_parallel_calls=section.num_parallel_calls,
        num_prefetch=section.num_prefetch,
        max_bad_audio_fraction=section.max_bad_audio_fraction,
        seed=seed,
    )

    return create_valid_reader(dataset, split, tokenizer, gangs, options)


@final
class AsrReportUnit(EvalUnit[Seq2SeqBatch]):
    """The fine-tuning recipe's validation (CTC loss, WER and CER of greedy decoding) of
    one split, which also writes the split's transcriptions on rank 0 and keeps its record."""

    def __init__(
        self,
        criterion: CtcCriterion,
        decoder: TokenDecoder,
        transcripts: TranscriptCollector,
        files: TranscriptFiles,
        gangs: Gangs,
    ) -> None:
        self._transcripts = transcripts
        self._unit = AsrEvalUnit(criterion, decoder, hypothesis_sink=self._transcripts)
        self._files = files
        self._gangs = gangs
        self.record: dict[str, object] | None = None
        """The split's record (rank 0, once finalized)."""

    @property
    @override
    def name(self) -> str:
        return self._files.split

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        self._unit.prepare_metric_bag(metric_bag)

    @override
    def process_batch(self, batch: Seq2SeqBatch, metric_bag: MetricBag) -> None:
        self._unit.process_batch(batch, metric_bag)

    @override
    def finalize(self, metric_bag: MetricBag) -> None:
        transcriptions = self._transcripts.gather(self._gangs.dp)

        if self._gangs.root.rank != 0:
            return

        record = self._files.write(transcriptions)

        self.record = record

        log.info("Wrote the {} transcriptions of {} to {}.", len(transcriptions), self._files.split, self._files.output_dir)  # fmt: skip

        for line in rates_table(record).splitlines():
            log.info(line)

        print(json.dumps(record), flush=True)

    @override
    def process_metric_values(self, values: MutableMapping[str, object]) -> None:
        self._unit.process_metric_values(values)


def main() -> None:
    """The console entry point of the evaluation; ``--lexicon``, ``--lm``, ``--lm-weight``,
    ``--word-score``, ``--beam-size`` and ``--beam-search`` stand for the ``decoding.*``
    options."""
    sys.argv[1:] = expand_decoding_options(sys.argv[1:])

    run_recipe_cli(AsrEvalRecipe())
