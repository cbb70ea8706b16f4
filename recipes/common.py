"""Checks that the recipes of w2v-knnvq share."""

from __future__ import annotations

from fairseq2.recipe.config import CosineAnnealingLRConfig
from fairseq2.recipe.error import RecipeError


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
