"""Gathering what each data-parallel rank computed, for figures that must equal those of one
process (counts, percentiles and scores over a whole evaluation set)."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist

from fairseq2.gang import Gang

T = TypeVar("T")


def gather_objects(gang: Gang, value: T) -> list[T]:
    """``value`` of every rank of ``gang``, in rank order (pickled through
    ``torch.distributed``). Every rank must call it."""
    if gang.size == 1:
        return [value]

    parts: list[T | None] = [None] * gang.size

    dist.all_gather_object(parts, value, group=gang.as_process_group())

    return [part for part in parts if part is not None]
