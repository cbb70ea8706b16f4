"""A pickle module that builds only what fairseq2's checkpoints hold, for ``torch.load``.

Unpickling can call any importable function: a crafted checkpoint runs code the moment it
is loaded. ``torch.load(..., weights_only=True)`` prevents that, but its unpickler does not
read pickle protocol 5, which fairseq2 uses for the trainer, optimizer and data-reader
states. This module is the restricted unpickler of Python's documentation ("Restricting
Globals"): the full pickle machine, whose :meth:`Unpickler.find_class` resolves only the
globals of :data:`ALLOWED_GLOBALS` and torch's dtypes. Pass it as
``torch.load(file, pickle_module=restricted_pickle, weights_only=False)``.
"""

from __future__ import annotations

import pickle
from typing import IO, Any, Final

import torch

ALLOWED_GLOBALS: Final = frozenset(
    {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("_codecs", "encode"),  # `bytes` under pickle protocol 2
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),
        ("torch.nn.parameter", "Parameter"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_wrapper_subclass"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        # The sharded optimizer states of FSDP2, as torch's weights-only unpickler allows them.
        ("torch.distributed.device_mesh", "DeviceMesh"),
        ("torch.distributed.tensor", "DTensor"),
        ("torch.distributed.tensor._dtensor_spec", "DTensorSpec"),
        ("torch.distributed.tensor._dtensor_spec", "TensorMeta"),
        ("torch.distributed.tensor.placement_types", "Partial"),
        ("torch.distributed.tensor.placement_types", "Replicate"),
        ("torch.distributed.tensor.placement_types", "Shard"),
        # Batches that a data reader of several processes holds back (plain classes, no
        # `__setstate__`).
        ("fairseq2.datasets.batch", "SequenceBatch"),
        ("fairseq2.datasets.batch", "Seq2SeqBatch"),
    }
)
"""The ``(module, name)`` pairs that the states fairseq2 saves need (tensors, DTensors and
batches in nested dictionaries, lists and numbers); storages are resolved by ``torch.load``
itself."""


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"the pickle refers to `{module}.{name}`, which a checkpoint never holds")

        self.module = module
        self.name = name


def is_allowed(module: str, name: str) -> bool:
    return (module, name) in ALLOWED_GLOBALS or (
        module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    )


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str, /) -> Any:
        if not is_allowed(module, name):
            raise ForbiddenGlobalError(module, name)

        return super().find_class(module, name)


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` with :class:`Unpickler` (``torch.load`` reads legacy headers with it)."""
    return Unpickler(file, **kwargs).load()
