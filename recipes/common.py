"""Checks and look-ups that the recipes of w2v-knnvq share."""

from __future__ import annotations

from pathlib import Path

from fairseq2.recipe.config import CosineAnnealingLRConfig
from fairseq2.recipe.error import RecipeError

from w2v_knnvq.runs import (
    CheckpointChoice,
    CheckpointStepNotFoundError,
    RunCheckpoint,
    RunCheckpointError,
    find_run_checkpoint,
)


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
