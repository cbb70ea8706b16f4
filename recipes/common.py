"""Checks and look-ups that the recipes of w2v-knnvq share."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, TypeVar, final

import torch
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

# fairseq2.recipe must be imported before fairseq2.evaluator, which imports it back.
from fairseq2.recipe.base import RecipeContext  # isort: skip
from fairseq2.assets import AssetCard, AssetCardError
from fairseq2.checkpoint import CheckpointDir
from fairseq2.checkpoint.manager import CheckpointStateNotValidError
from fairseq2.datasets import DataReader, Seq2SeqBatch, SequenceBatch
from fairseq2.device import CPU, SupportsDeviceTransfer
from fairseq2.evaluator import Evaluator, EvalUnit
from fairseq2.gang import Gangs, broadcast_flag
from fairseq2.logging import log
from fairseq2.metrics import MetricBag, Sum, format_as_int
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.models import load_model
from fairseq2.nn.data_parallel import get_data_parallel_facade
from fairseq2.recipe.cli import register_cli_error
from fairseq2.recipe.config import (
    CommonSection,
    CosineAnnealingLRConfig,
    EvaluatorSection,
    RegimeSection,
    TrainerSection,
)
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyContainer, DependencyResolver, wire_object
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit
from fairseq2.utils.validation import ValidationResult
from fairseq2.validator import StandardValidator

from w2v_knnvq.data.audio_reading import BadAudioBudgetError
from w2v_knnvq.data.manifest_dataset import split_name_error
from w2v_knnvq.report import EVALUATION_FILE, SUMMARY_FILE
from w2v_knnvq.runs import (
    CheckpointChoice,
    CheckpointStepNotFoundError,
    RunCheckpoint,
    RunCheckpointError,
    check_card_checkpoint,
    check_checkpoint_files,
    find_run_checkpoint,
    read_validation_records,
)
from w2v_knnvq.wav2vec2.lengths import model_min_num_samples

BatchT = TypeVar("BatchT", bound=SupportsDeviceTransfer)

SKIPPED_AUDIO: Final = "num_skipped_audio"
"""The utterances whose audio could not be used (see :mod:`w2v_knnvq.data.audio_reading`)."""


def register_bad_audio_handling(container: DependencyContainer) -> None:
    """Names the skip counter in the logged metrics and turns
    :class:`BadAudioBudgetError` into a one-paragraph error of the recipe CLI."""
    descriptor = MetricDescriptor(SKIPPED_AUDIO, "Skipped Utterances", 900, format_as_int)

    container.collection.register_instance(MetricDescriptor, descriptor)

    register_cli_error(container, BadAudioBudgetError, _handle_bad_audio_budget_error)


def _handle_bad_audio_budget_error(ex: BadAudioBudgetError) -> int:
    log.error("Too many unusable audio files. {}", ex)

    return 1


def register_checkpoint_save_errors(container: DependencyContainer) -> None:
    """Turns a checkpoint that could not be saved for want of space (fairseq2 reports it as
    a state that cannot be pickled, "file a bug report") into the one sentence a full disk
    deserves: which folder, which step, and the step a rerun resumes from."""

    def handle(ex: CheckpointStateNotValidError) -> int:
        if _disk_full(ex):
            checkpoints_dir = _checkpoints_dir(container)

            last = _last_resumable_step(checkpoints_dir)

            resume = f"resume from step {last[0]}" if last is not None else "start over (no checkpoint is complete)"

            log.error(
                "No space left on {} while saving the checkpoint of step {}; free space and rerun the same command to {}.",
                checkpoints_dir,
                ex.step_nr,
                resume,
            )

            return 1

        log.exception("The `{}` state of step {} cannot be saved. See the logged stack trace.", ex.kind, ex.step_nr)

        return 1

    register_cli_error(container, CheckpointStateNotValidError, handle)


def _disk_full(ex: BaseException) -> bool:
    """Whether ``ex`` or an exception it was raised from or during is "no space left" (or a
    disk quota exceeded)."""
    seen: set[int] = set()

    pending: list[BaseException | None] = [ex]

    while pending:
        current = pending.pop()

        if current is None or id(current) in seen:
            continue

        seen.add(id(current))

        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True

        pending.extend((current.__cause__, current.__context__))

    return False


def add_skipped_audio_metric(metric_bag: MetricBag) -> None:
    metric_bag.add(SKIPPED_AUDIO, Sum())


@torch.inference_mode()
def update_skipped_audio(metric_bag: MetricBag, batch: SequenceBatch | Seq2SeqBatch) -> None:
    """Adds the utterances that the reader skipped before ``batch`` (its ``example``'s
    ``num_skipped``) to the metric."""
    example = batch.example

    num_skipped = example.get("num_skipped", 0) if isinstance(example, dict) else 0

    metric_bag.get(SKIPPED_AUDIO, Sum).update(num_skipped)


def check_warmup(scheduler_config: object, num_steps: int | None) -> None:
    """Refuses a cosine annealing schedule whose warmup leaves no step to anneal.

    fairseq2's :class:`CosineAnnealingLR` without ``cycle_len`` anneals over
    ``num_steps - num_warmup_steps`` steps and divides by zero when that is not positive;
    this turns it into an error that names both options before training starts.

    :param scheduler_config: ``lr_scheduler.config`` of the recipe; only a
        :class:`CosineAnnealingLRConfig` without ``cycle_len`` is checked.
    :param num_steps: ``regime.num_steps``; ``None`` (no limit) passes.

    :raises RecipeError: if ``num_warmup_steps`` is not smaller than ``num_steps``.
    """
    if not isinstance(scheduler_config, CosineAnnealingLRConfig):
        return

    if scheduler_config.cycle_len is not None or num_steps is None:
        return

    if scheduler_config.num_warmup_steps >= num_steps:
        raise RecipeError(
            f"`lr_scheduler.config.num_warmup_steps` must be smaller than `regime.num_steps` ({num_steps}) "
            f"for the cosine annealing to have steps left, but is {scheduler_config.num_warmup_steps} instead; "
            "lower the warmup or raise `regime.num_steps`."
        )


def find_recipe_checkpoint(
    path: Path,
    checkpoint: CheckpointChoice | None,
    *,
    path_option: str,
    checkpoint_option: str,
    other_choices: str = "",
) -> RunCheckpoint:
    """:func:`~w2v_knnvq.runs.find_run_checkpoint` for a recipe option: its errors become
    :class:`RecipeError` naming the options.

    :param path_option: The option that gave ``path``, e.g. ``pretrained_encoder.path``.
    :param checkpoint_option: The option that gave ``checkpoint``.
    :param other_choices: What else ``checkpoint`` may be, e.g. ``", 'best' or 'last'"``.
    """
    try:
        return find_run_checkpoint(path, checkpoint=checkpoint)
    except CheckpointStepNotFoundError as ex:
        if ex.step is None:
            raise RecipeError(f"`{path_option}`: {ex}") from None

        raise RecipeError(
            f"`{checkpoint_option}` must be one of the steps saved in {ex.checkpoints_dir} "
            f"({ex.available_steps}){other_choices}, but is {ex.step} instead."
        ) from None
    except RunCheckpointError as ex:
        raise RecipeError(f"`{path_option}`: {ex}") from None


def validate_model_step(result: ValidationResult, step: int | None, path: Path | None) -> None:
    """Adds the errors of a section's ``step`` of the model at ``path`` (a step of a run's
    checkpoints, which only a path can name) to ``result``."""
    if step is None:
        return

    if path is None:
        result.add_error("`step` can only be specified with `path`.")

    if step < 1:
        result.add_error(f"`step` must be at least 1, but is {step} instead.")


_HELD_LOCKS: list[IO[str]] = []
"""The open lock files of this process: a lock lasts as long as its file stays open."""

LOCK_FILE: Final = ".lock"


def lock_output_dir(context: RecipeContext) -> None:
    """Makes the run of ``context`` the only one writing to its output directory.

    Rank 0 holds an exclusive ``flock`` on ``OUTPUT/.lock`` until its process ends (a kill
    releases it too); the file says which process holds it. Every rank learns the outcome.

    :raises RecipeError: if another run holds the lock.
    """
    gangs = context.gangs

    holder = ""

    if gangs.root.rank == 0:
        holder = _try_lock(context.output_dir / LOCK_FILE)

    if broadcast_flag(gangs.root, not holder):
        return

    raise RecipeError(
        f"{context.output_dir} is in use by another run ({holder or 'see rank 0'}); wait for it to end, "
        "or give this run another output directory."
    )


def _try_lock(file: Path) -> str:
    """:returns: ``""`` once this process holds the lock on ``file``, else who holds it."""
    handle = file.open("a+", encoding="utf-8")

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)

        holder = handle.read().strip() or "a process that wrote nothing"

        handle.close()

        return holder

    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()

    _HELD_LOCKS.append(handle)

    return ""


def check_resume(context: RecipeContext) -> None:
    """Locks the output directory (:func:`lock_output_dir`) and checks the checkpoint that
    the trainer of ``context`` will resume from, if any.

    The checkpoint directory is the one the trainer really uses (``--checkpoint-dir`` or
    ``OUTPUT/checkpoints``). Its last step with a trainer state must have been written by
    as many processes as this run has (see :func:`_check_resume_world_size`), and every state
    file of it must load with the restricted unpickler
    (:func:`~w2v_knnvq.runs.check_checkpoint_files`): fairseq2 unpickles the trainer,
    optimizer and data-reader states without restriction.

    :raises RecipeError: naming the step or file and the fix.
    """
    lock_output_dir(context)

    checkpoints_dir = _checkpoints_dir(context.resolver)

    last = _last_resumable_step(checkpoints_dir)

    if last is None:
        return

    step, step_dir = last

    _check_resume_world_size(checkpoints_dir, step, step_dir, context.gangs.root.size)

    try:
        check_checkpoint_files(step_dir)
    except RunCheckpointError as ex:
        raise RecipeError(f"The run cannot resume from step {step}: {ex}") from None


def _check_resume_world_size(checkpoints_dir: Path, step: int, step_dir: Path, world_size: int) -> None:
    """Refuses to resume from a checkpoint written by another number of processes.

    fairseq2 restores the trainer and data-reader state of each rank from that rank's own
    file: with more processes the new ranks find none, and with fewer the readers would take
    the state of a differently sharded pipeline. The error says how to go on instead.

    :param step_dir: The directory of ``step``, the step the run resumes from.
    :param world_size: The number of processes of this run.

    :raises RecipeError: if ``step_dir`` was written by another number of processes.
    """
    saved_world_size = len(list((step_dir / "trainer").glob("rank_*.pt")))

    if saved_world_size in (0, world_size):
        return

    raise RecipeError(
        f"The last checkpoint in {checkpoints_dir} (step {step}) was written by {_processes(saved_world_size)}, "
        f"but this run has {world_size}; fairseq2 restores the trainer and data-reader state of each process, "
        f"so a run resumes with the number of processes it was started with. Restart it with {_processes(saved_world_size)} "
        f"(`torchrun --nproc-per-node` or the job's task count), or start a new output directory "
        f"initialized from this checkpoint with `model.path={step_dir / 'model'}` (the optimizer, learning-rate "
        "schedule and data order then start over)."
    )


def _checkpoints_dir(resolver: DependencyResolver) -> Path:
    """The checkpoints directory the trainer uses: ``--checkpoint-dir`` (with fairseq2's sweep
    tag), else ``OUTPUT/checkpoints``."""
    return resolver.resolve(CheckpointDir).path or resolver.resolve(Path) / "checkpoints"


def _last_resumable_step(checkpoints_dir: Path) -> tuple[int, Path] | None:
    """The highest complete step directory with a trainer state (fairseq2 writes
    ``step_N.tmp`` and renames it when the save is complete)."""
    steps = []

    for step_dir in checkpoints_dir.glob("step_*"):
        number = step_dir.name.removeprefix("step_")

        if number.isdigit() and (step_dir / "trainer").is_dir():
            steps.append((int(number), step_dir))

    return max(steps, default=None)


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def load_pretrained_state_dict(card: AssetCard, run: RunCheckpoint | None, source: str) -> dict[str, Tensor]:
    """The state dict of the model that ``card`` names (``init_from``, ``pretrained_encoder``),
    loaded on CPU in float32.

    :param run: The run of ``card`` if the model was named by a path; a file of its checkpoint
        that the weights-only unpickler refuses is then named with the global it refers to.
    :param source: How messages name the model.

    :raises RecipeError: if the checkpoint holds a pickle that could run code.
    """
    try:
        model = load_model(card, device=CPU, dtype=torch.float32)
    except AssetCardError:
        try:
            check_card_checkpoint(card)
        except RunCheckpointError as ex:
            raise RecipeError(f"The pretrained model {source} cannot be loaded: {ex}") from None

        raise

    return model.state_dict()


def training_min_audio_len(min_audio_len: int | None, model: Module) -> int:
    """``dataset.min_audio_len`` of a training run, checked against the fewest samples from
    which the CNN of ``model`` makes the frames its temporal masker needs (fairseq2's masker
    would otherwise fail at the first short crop); ``None`` takes that least length.

    :raises RecipeError: if ``min_audio_len`` is below it.
    """
    needed = model_min_num_samples(model, masked=True)

    if min_audio_len is None:
        log.info("Utterances need at least {} samples for the model's CNN and temporal masker (`dataset.min_audio_len`).", needed)  # fmt: skip

        return needed

    if min_audio_len < needed:
        raise RecipeError(
            f"`dataset.min_audio_len` must be at least {needed}, the fewest samples from which the model's CNN makes "
            "the frames its temporal masker needs (`temporal_mask_span_len`, `max_temporal_mask_prob` and "
            f"`min_num_temporal_mask_spans` of the model), but is {min_audio_len} instead. Raise it, or shorten or "
            "lessen the mask spans."
        )

    return min_audio_len


def create_trainer(
    context: RecipeContext,
    train_unit: TrainUnit[BatchT],
    train_reader: DataReader[BatchT],
    valid_units: Sequence[EvalUnit[BatchT]] = (),
    valid_readers: Sequence[DataReader[BatchT]] = (),
) -> Task:
    """fairseq2's trainer of ``context``, which first validates the step it resumes from if
    that step was due for validation but has no record of it.

    fairseq2 saves a checkpoint before it validates the step: a run killed in between
    resumes after the step and never validates it, so that step has no validation figures
    (and, with ``regime.score_metric``, no score: ``best`` cannot pick it and
    ``keep_best_n_checkpoints`` may delete it).
    """
    trainer = context.create_trainer(train_unit, train_reader, list(valid_units), list(valid_readers))

    if not valid_units:
        return trainer

    step = _unvalidated_resume_step(context)

    if step is None:
        return trainer

    return _ValidateFirst(trainer, lambda: _validate_restored_step(context, step, valid_units, valid_readers))


def _unvalidated_resume_step(context: RecipeContext) -> int | None:
    """The step the run resumes from, if it was due for validation (every
    ``validate_every_n_steps`` after ``validate_after_n_steps``, or the last step) and has
    no record in ``metrics/valid.jsonl`` or, with a score metric, no score."""
    checkpoints_dir = _checkpoints_dir(context.resolver)

    last = _last_resumable_step(checkpoints_dir)

    if last is None:
        return None

    step = last[0]

    regime = context.resolver.resolve(RegimeSection)

    every = regime.validate_every_n_steps

    due = (every is not None and step > regime.validate_after_n_steps and step % every == 0) or step == regime.num_steps

    if not due:
        return None

    if regime.score_metric is not None and not (checkpoints_dir / f"scores/step_{step}.txt").is_file():
        return step

    recorded = any(record.get("Step") == step for record in read_validation_records(context.output_dir))

    return None if recorded else step


def _validate_restored_step(
    context: RecipeContext, step: int, units: Sequence[EvalUnit[BatchT]], readers: Sequence[DataReader[BatchT]]
) -> None:
    """Loads the model of ``step`` and validates it as the trainer would have: the same
    units, readers, seed and precision, the record in ``metrics/valid.jsonl`` under ``step``
    and, with a score metric, its score. The trainer then restores the whole state anew."""
    log.info("Step {} was saved but not validated (the run stopped in between); validating it before training resumes.", step)  # fmt: skip

    trainer_section = context.resolver.resolve(TrainerSection)

    precision = trainer_section.mixed_precision

    # As fairseq2's validator factory decides it.
    if precision.mode == "static":
        amp = context.gangs.root.size == 1 or trainer_section.data_parallelism != "fsdp"
    else:
        amp = precision.mode == "auto"

    validator = wire_object(
        context.resolver,
        StandardValidator,
        units=units,
        data_readers=readers,
        amp=amp,
        amp_dtype=precision.dtype,
        seed=context.resolver.resolve(CommonSection).seed + 3,
    )

    model = context.get_data_parallel_model()

    facade = get_data_parallel_facade(model)

    checkpoint_manager = context.get_checkpoint_manager()

    checkpoint_manager.load_model_state(step, facade)

    model.eval()

    with facade.summon_full_parameters():
        score = validator.run(step)

    model.train()

    if score is not None:
        checkpoint_manager.save_score(step, score)


@final
class _ValidateFirst(Task):
    """Runs ``validate``, then the trainer."""

    def __init__(self, trainer: Task, validate: Callable[[], None]) -> None:
        self._trainer = trainer
        self._validate = validate

    @override
    def run(self) -> None:
        self._validate()

        self._trainer.run()

    @override
    def request_stop(self) -> None:
        self._trainer.request_stop()

    @property
    @override
    def step_nr(self) -> int:
        return self._trainer.step_nr

    @override
    def close(self) -> None:
        self._trainer.close()


# Evaluation recipes: the run and checkpoint they evaluate, how they run, what they write.

CHECKPOINT_NAMES: Final = ("best", "last")


@dataclass(kw_only=True)
class EvaluatedRunSection:
    """The ``run`` section of an evaluation recipe: the training run and its checkpoint.

    The model is loaded from the checkpoint with the run's own configuration
    (``checkpoints/model.yaml``) through the restricted loaders of :mod:`w2v_knnvq.runs`.
    """

    run_dir: Path | None = None
    """The output directory of a training run, or its ``checkpoints`` directory; a relative
    path is taken from the directory the recipe is started in."""

    checkpoint: CheckpointChoice = "last"
    """``last``, ``best`` (the best validation score; the last step if the run kept no
    scores), or a step number."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.run_dir is None:
            result.add_error("`run_dir` must be the output directory of a training run, but is not set.")

        if isinstance(self.checkpoint, str) and self.checkpoint not in CHECKPOINT_NAMES:
            result.add_error(
                f"`checkpoint` must be 'best', 'last' or a step number, but is '{self.checkpoint}' instead."
            )

        if isinstance(self.checkpoint, int) and self.checkpoint < 1:
            result.add_error(f"`checkpoint` must be a step number of at least 1, but is {self.checkpoint} instead.")

        return result


def find_evaluated_checkpoint(section: EvaluatedRunSection, *, section_name: str = "run") -> RunCheckpoint:
    """The checkpoint that ``section`` names.

    :raises RecipeError: naming ``run.run_dir`` or ``run.checkpoint`` and the fix.
    """
    if section.run_dir is None:
        raise RecipeError(f"`{section_name}.run_dir` must be the output directory of a training run, but is not set.")

    return find_recipe_checkpoint(
        section.run_dir,
        section.checkpoint,
        path_option=f"{section_name}.run_dir",
        checkpoint_option=f"{section_name}.checkpoint",
        other_choices=", 'best' or 'last'",
    )


def create_run_evaluator(
    context: RecipeContext,
    model: Module,
    units: Sequence[EvalUnit[BatchT]],
    readers: Sequence[DataReader[BatchT]],
) -> Evaluator:
    """fairseq2's evaluator of ``context`` (``evaluator`` and ``common`` sections, gangs,
    metric recorders) for ``model``, which the recipe loaded itself from a run's checkpoint
    instead of through a ``model`` section."""
    section = context.resolver.resolve(EvaluatorSection)

    return wire_object(
        context.resolver,
        Evaluator,
        model=model,
        units=units,
        data_readers=readers,
        amp=section.amp,
        amp_dtype=section.amp_dtype,
        # As fairseq2's evaluator factory seeds it.
        seed=context.resolver.resolve(CommonSection).seed + 3,
    )


def split_list_errors(
    option: str, splits: Sequence[str], name_error: Callable[[str, str], str | None] = split_name_error
) -> list[str]:
    """The validation errors of the splits ``option`` an evaluation reads: at least one, each a
    valid name (``name_error(option, split)``; by default a manifest's,
    :func:`~w2v_knnvq.data.manifest_dataset.split_name_error`), none twice."""
    errors = [] if splits else [f"`{option}` must name at least one split, but is empty."]

    errors += [error for split in splits if (error := name_error(option, split)) is not None]

    if len(set(splits)) != len(splits):
        errors.append(f"`{option}` must name each split once, but is {list(splits)} instead.")

    return errors


def evaluation_figure_dir(output_dir: Path, split: str, splits: Sequence[str]) -> Path:
    """Where the figures of ``split`` go: the output directory itself, or a folder per
    split when the evaluation has several."""
    return output_dir / split if len(splits) > 1 else output_dir


def write_evaluation(
    output_dir: Path, run: RunCheckpoint, records: Sequence[Mapping[str, object]], summary: str
) -> Path:
    """Writes ``evaluation.json`` (the run directory, the checkpoint and its step, and
    ``records`` under ``splits``) and ``summary.md`` (``summary``) into ``output_dir``.

    :param records: One JSON record per split, each with its ``split``.
    :returns: The path of ``evaluation.json``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)

    document = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.model_dir),
        "step": run.step,
        "splits": [dict(record) for record in records],
    }

    file = output_dir / EVALUATION_FILE

    file.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    (output_dir / SUMMARY_FILE).write_text(summary.rstrip("\n") + "\n", encoding="utf-8")

    return file


@final
class EvaluationTask(Task):
    """Runs an evaluator, then writes what its units collected (on rank 0 only)."""

    def __init__(self, evaluator: Task, gangs: Gangs, write: Callable[[], None]) -> None:
        self._evaluator = evaluator
        # The evaluator closes the gangs when it is done.
        self._writer = gangs.root.rank == 0
        self._write = write

    @override
    def run(self) -> None:
        self._evaluator.run()

        if self._writer:
            self._write()

    @override
    def request_stop(self) -> None:
        self._evaluator.request_stop()

    @property
    @override
    def step_nr(self) -> int:
        return self._evaluator.step_nr

    @override
    def close(self) -> None:
        self._evaluator.close()
