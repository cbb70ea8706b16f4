"""What the quantizer promises a GPU training step, checked on the CPU: no host-device
synchronization, compiled equals eager over changing batch sizes without a recompilation per
step, IEEE float32 products whatever the TF32 setting; and, where CUDA is present, CUDA equals
the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend
from torch.overrides import TorchFunctionMode

from tests.quantizer_helpers import GUMBEL, NOISELESS, assert_close, make_inputs, make_quantizer, training_step
from w2v_knnvq.quantizer import METHOD_NAMES
from w2v_knnvq.quantizer.assign import ieee_float32


class SynchronizationCounter(TorchFunctionMode):
    """Records the calls that make a CUDA host wait for the device: reading a value (``item``,
    ``bool``, ``int``, ``float``, ``tolist``), a data-dependent size (``nonzero``, boolean-mask
    indexing, ``masked_select``, ``unique``) or a copy to the host."""

    READS: ClassVar[set[str]] = {
        "item",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "tolist",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "cpu",
        "numpy",
    }

    def __init__(self) -> None:
        super().__init__()

        self.calls: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = getattr(func, "__name__", str(func))

        if name in self.READS:
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__") and _has_mask(args[1:2]):
            self.calls.append(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], Tensor):
            self.calls.append("repeat_interleave by a tensor")

        return func(*args, **(kwargs or {}))


def _has_mask(indices: tuple[Any, ...]) -> bool:
    for index in indices:
        if isinstance(index, Tensor) and index.dtype == torch.bool:
            return True

        if isinstance(index, tuple) and _has_mask(index):
            return True

    return False


def test_the_counter_sees_synchronizations() -> None:
    values = torch.tensor([1.0, -2.0])

    with SynchronizationCounter() as counter:
        _ = values[values > 0]
        _ = bool(values[0] > 0)
        _ = values.nonzero()
        _ = values.sum().item()

    assert counter.calls == ["__getitem__ with a boolean mask", "__bool__", "nonzero", "item"]


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_a_training_step_makes_no_host_synchronization(method: str, chunk_size: int | None) -> None:
    """Forward and backward of every method, dense and chunked, with padding, random vertex
    subsets and annealed Gumbel temperatures: counts stay tensors."""
    overrides: dict[str, Any] = {"chunk_size": chunk_size}

    if "knn" in method:
        overrides["knn_vertex_fraction"] = 0.5

    if method in GUMBEL:
        overrides["gumbel_tau_anneal"] = (2.0, 0.5, 0.999)

    quantizer = make_quantizer(method, 2, **overrides)

    x, mask = make_inputs(37)

    with SynchronizationCounter() as counter:
        output = quantizer(x.requires_grad_(), mask)

        (output.quantized.sum() + output.loss_times(5.0)).backward()

    assert counter.calls == [], method


# --- compiled against eager ----------------------------------------------------------------

COMPILE_CASES = [
    ("softmax-knn-ce", 2, None),
    ("softmax-knn-l2", 1, None),
    ("hg-ppl", 2, None),
    ("softmax-knn-ce", 2, 16),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "num_codebooks", "chunk_size"), COMPILE_CASES)
def test_compiled_equals_eager_over_four_batch_sizes(
    method: str, num_codebooks: int, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compile(dynamic=True)`` of the quantizer: outputs and gradients equal eager ones
    at N = 130, 161, 200 and 257 (padding included), with no recompilation as N changes (below
    32 K rows, where the block search has fewer than K blocks, a graph specializes once more). Gumbel noise is drawn as eager draws
    it (inductor's ``fallback_random``). Chunked mode runs its loop eagerly."""
    # Other test modules switch dynamo off for fairseq2's own compiled quantizer.
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)

    # Each test counts its own compilations.
    torch._dynamo.reset()

    eager = make_quantizer(method, num_codebooks, chunk_size=chunk_size)

    compiled_module = make_quantizer(method, num_codebooks, chunk_size=chunk_size)

    counter = CompileCounterWithBackend("inductor")

    compiled: Any = torch.compile(compiled_module, backend=counter, dynamic=True)

    compilations = []

    with torch._inductor.config.patch(fallback_random=True):
        for num_rows in (130, 161, 200, 257):
            x, mask = make_inputs(num_rows, seed=num_rows)

            torch.manual_seed(num_rows)

            expected = training_step(eager, x, mask)

            torch.manual_seed(num_rows)

            actual = training_step(compiled, x, mask)

            # Parameter names of the compiled wrapper carry its prefix.
            actual = {name.removeprefix("_orig_mod."): value for name, value in actual.items()}

            assert_close(actual, expected, atol=1e-5)

            compilations.append(counter.frame_count)

    if chunk_size is None:
        # No recompilation when N changes: none after the second size, by which dynamo has seen
        # N vary (how many frames the first two sizes take depends on inductor's cache).
        assert compilations[1:] == [compilations[1]] * 3, compilations


@pytest.mark.parametrize("method", ["softmax-knn-ce", "softmax-ppl"])
def test_the_family_compiles_its_quantizer(method: str) -> None:
    """``model.compile`` of the ``wav2vec2_knnvq`` family compiles the quantizer too."""
    from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model
    from w2v_knnvq.wav2vec2.fsdp import compile_wav2vec2_knnvq

    config = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]()

    config.quantizer.method = method

    model = create_wav2vec2_knnvq_model(config)

    compile_wav2vec2_knnvq(model, backend="eager", dynamic=True)

    assert model.quantizer._compiled_call_impl is not None


# --- IEEE float32 ---------------------------------------------------------------------------


def test_ieee_float32_turns_tf32_off_inside_and_restores_it() -> None:
    previous = torch.backends.cuda.matmul.allow_tf32

    try:
        torch.backends.cuda.matmul.allow_tf32 = True

        with ieee_float32():
            assert not torch.backends.cuda.matmul.allow_tf32

        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# --- CUDA, where there is one ---------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("method", NOISELESS)
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_cuda_equals_the_cpu_with_tf32_on(method: str, chunk_size: int | None) -> None:
    """Forward and backward on CUDA with TF32 switched on process-wide (fairseq2's default)
    equal the CPU's: the quantizer's products run in IEEE float32."""
    x, mask = make_inputs(37)

    expected = training_step(make_quantizer(method, 2, chunk_size=chunk_size), x, mask)

    previous = torch.backends.cuda.matmul.allow_tf32

    torch.backends.cuda.matmul.allow_tf32 = True

    try:
        quantizer = make_quantizer(method, 2, chunk_size=chunk_size).cuda()

        actual = training_step(quantizer, x.cuda(), mask.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

    assert_close({name: value.cpu() for name, value in actual.items()}, expected, atol=1e-4)


@cuda
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_cuda_training_step_makes_no_synchronization(method: str) -> None:
    quantizer = make_quantizer(method, 2).cuda()

    x, mask = make_inputs(37)

    torch.cuda.set_sync_debug_mode("error")

    try:
        output = quantizer(x.cuda().requires_grad_(), mask.cuda())

        (output.quantized.sum() + output.loss_times(5.0)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
