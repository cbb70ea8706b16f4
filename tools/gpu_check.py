"""One command that checks what the quantizer promises a GPU, prints a table and exits non-zero
when a check fails (about 5 minutes on one H100; ``--device cpu`` runs the same checks here,
smaller, in a few minutes):

1. ``equality``: forward and backward of all 14 methods, dense and chunked, on the device with
   TF32 switched on process-wide (fairseq2's default on CUDA) against the CPU, in IEEE float32,
   with the same Gumbel noise on both sides; chunked against dense on the device.
2. ``global``: the global KNN of 2 processes on the one device over gloo against one process.
3. ``family``: training steps of the ``wav2vec2_knnvq`` family under bf16 autocast, under FSDP2
   with bf16 autocast (fairseq2's ``mixed_precision.mode=auto``; the quantizer's parameters
   float32), and with ``model.compile``; synchronizations counted with
   ``torch.cuda.set_sync_debug_mode`` on CUDA.
4. ``memory``: peak memory of a dense and a chunked ``softmax-knn-ce`` step at N = 65,536,
   M = 8196 (N = 32,768 on the CPU).
5. ``speed``: the speed table of ``tools/benchmark_quantizers.py`` at N = 3,000 and 24,000
   (3,000 on the CPU).

    python tools/gpu_check.py [--device cuda] [--checks equality global family memory speed]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from w2v_knnvq_tools.benchmark_quantizers import LAYOUTS, interleaved_timings, median_ratio

from w2v_knnvq.quantizer import METHOD_NAMES, METHODS, QuantizerConfig, VectorQuantizer
from w2v_knnvq.quantizer import assign as assign_module
from w2v_knnvq.tool import tool_parser

RESULTS: list[tuple[str, str, bool]] = []


def report(check: str, detail: str, passed: bool) -> None:
    RESULTS.append((check, detail, passed))

    print(f"| {check} | {detail} | {'ok' if passed else 'FAILED'} |", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def cpu_drawn_noise() -> Iterator[None]:
    """Gumbel noise drawn by the CPU's generator on every device, so that the device and the
    CPU quantize with the same samples (``torch.utils.checkpoint`` replays the CPU's generator,
    so the chunked recomputation draws them again)."""
    original = assign_module.uniform_noise

    def cpu_noise(like: Tensor) -> Tensor:
        return torch.rand(like.shape, dtype=like.dtype).to(like.device)

    assign_module.uniform_noise = cpu_noise

    try:
        yield
    finally:
        assign_module.uniform_noise = original


def _quantizer(method: str, chunk_size: int | None, device: torch.device) -> VectorQuantizer:
    torch.manual_seed(0)

    config = QuantizerConfig.from_method(
        method, input_dim=48, num_codebooks=2, codebook_size=40, codebook_dim=16, knn_k=3, chunk_size=chunk_size
    )

    return VectorQuantizer(config).to(device).train()


def _step(method: str, chunk_size: int | None, device: torch.device) -> dict[str, Tensor]:
    quantizer = _quantizer(method, chunk_size, device)

    generator = torch.Generator().manual_seed(1)

    x = torch.randn(300, 48, generator=generator).to(device).requires_grad_()

    mask = (torch.rand(300, generator=generator) > 0.2).to(device)

    torch.manual_seed(2)

    output = quantizer(x, mask)

    weights = torch.linspace(-1.0, 1.0, output.quantized.numel(), device=device).view_as(output.quantized)

    ((output.quantized * weights).sum() + 3.0 * output.loss).backward()

    assert x.grad is not None

    result = {"loss": output.loss.detach(), "quantized": output.quantized.detach(), "x_grad": x.grad}

    result.update({f"{name}.grad": p.grad for name, p in quantizer.named_parameters() if p.grad is not None})

    return {name: value.cpu() for name, value in result.items()}


def _largest_difference(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The largest difference relative to each tensor's largest entry."""
    return max(
        ((actual[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        for name, value in expected.items()
    )


def check_equality(device: torch.device, args: argparse.Namespace) -> None:
    previous = torch.backends.cuda.matmul.allow_tf32

    try:
        with cpu_drawn_noise():
            for method in METHOD_NAMES:
                for chunk_size in (None, 64):
                    expected = _step(method, chunk_size, torch.device("cpu"))

                    torch.backends.cuda.matmul.allow_tf32 = True

                    actual = _step(method, chunk_size, device)

                    torch.backends.cuda.matmul.allow_tf32 = previous

                    error = _largest_difference(actual, expected)

                    mode = "dense" if chunk_size is None else "chunked"

                    report("equality", f"{method} {mode}: {device} vs cpu, max rel. diff {error:.1e}", error < 1e-4)

                if METHODS[method].smoothed and not METHODS[method].assignment.startswith("gumbel"):
                    error = _largest_difference(_step(method, 64, device), _step(method, None, device))

                    report("equality", f"{method}: chunked vs dense on {device}, max rel. diff {error:.1e}", error < 1e-4)  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _global_worker(rank: int, device: str, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    try:
        for method in ("softmax-knn-ce", "softmax-knn-l2"):
            for chunk_size in (None, 64):
                result = _global_step(method, chunk_size, torch.device(device), rank)

                torch.save(result, Path(result_dir, f"{method}-{chunk_size}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_step(method: str, chunk_size: int | None, device: torch.device, rank: int | None) -> dict[str, Tensor]:
    quantizer = _quantizer(method, chunk_size, device)

    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(3))

    part = slice(None) if rank is None else slice(0, 170) if rank == 0 else slice(170, 300)

    rows = x[part].to(device).requires_grad_()

    output = quantizer(rows)

    (3.0 * output.loss).backward()

    assert rows.grad is not None and quantizer.codebook.weight.grad is not None

    return {
        "loss": output.loss.detach().cpu(),
        "x_grad": rows.grad.cpu(),
        "codebook": quantizer.codebook.weight.grad.cpu(),
    }


def check_global(device: torch.device, args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(  # type: ignore[attr-defined]  # torch does not re-export it in __all__
            _global_worker,
            args=(str(device), f"{directory}/store", directory),
            nprocs=2,
            join=True,
            start_method="spawn",
        )

        for method in ("softmax-knn-ce", "softmax-knn-l2"):
            for chunk_size in (None, 64):
                expected = _global_step(method, chunk_size, device, None)

                parts = [torch.load(f"{directory}/{method}-{chunk_size}-{rank}.pt") for rank in range(2)]

                errors = [
                    abs(parts[0]["loss"] - expected["loss"]).item(),
                    abs(parts[1]["loss"] - expected["loss"]).item(),
                    (torch.cat([parts[0]["x_grad"], parts[1]["x_grad"]]) - expected["x_grad"]).abs().max().item(),
                    (parts[0]["codebook"] + parts[1]["codebook"] - expected["codebook"]).abs().max().item(),
                ]

                mode = "dense" if chunk_size is None else "chunked"

                report("global", f"{method} {mode}, 2 processes on {device} vs 1: max diff {max(errors):.1e}", max(errors) < 1e-5)  # fmt: skip


def _family_model(device: torch.device, method: str = "softmax-knn-ce") -> Any:
    from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

    config = WAV2VEC2_KNNVQ_ARCHS["small_2x320"]()

    config.quantizer.method = method

    torch.manual_seed(0)

    return create_wav2vec2_knnvq_model(config).to(device).train()


def _family_step(model: Any, waveforms: Tensor) -> tuple[Tensor, Any]:
    from fairseq2.nn import BatchLayout

    losses, output = model(waveforms, BatchLayout.of(waveforms))

    losses.aggregate.backward()

    return losses.aggregate.detach(), output


@contextmanager
def counted_synchronizations(device: torch.device) -> Iterator[list[str]]:
    """The synchronizing CUDA calls inside, as ``torch.cuda.set_sync_debug_mode`` warns of them."""
    found: list[str] = []

    if device.type != "cuda":
        yield found

        return

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        torch.cuda.set_sync_debug_mode("warn")

        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")

    found.extend(str(warning.message).splitlines()[0] for warning in caught if "synchroniz" in str(warning.message))


def check_family(device: torch.device, args: argparse.Namespace) -> None:
    waveforms = torch.randn(4, 32_000, generator=torch.Generator().manual_seed(4)).to(device)

    # bf16 autocast: the quantizer's outputs float32.
    model = _family_model(device)

    dtypes: dict[str, torch.dtype] = {}

    def record(module: Any, args: Any, output: Any) -> None:
        dtypes["quantized"] = output.quantized.dtype

    model.quantizer.register_forward_hook(record)

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss, _ = _family_step(model, waveforms)

    report("family", f"bf16 autocast step: loss {loss.item():.3f}, quantized {dtypes['quantized']}", bool(torch.isfinite(loss)) and dtypes["quantized"] == torch.float32)  # fmt: skip

    check_fsdp(device)

    # model.compile: a few steps, then synchronizations counted on one more.
    from w2v_knnvq.wav2vec2.fsdp import compile_wav2vec2_knnvq

    eager, compiled = _family_model(device), _family_model(device)

    compile_wav2vec2_knnvq(compiled, dynamic=True)

    start = time.perf_counter()

    # Dropout inside the compiled layers draws as eager dropout does.
    torch._inductor.config.fallback_random = True

    for step in range(3):
        torch.manual_seed(step)
        expected, _ = _family_step(eager, waveforms)

        torch.manual_seed(step)
        actual, _ = _family_step(compiled, waveforms)

        difference = abs(actual - expected).item() / max(abs(expected).item(), 1e-6)

        report("family", f"model.compile step {step}: loss {actual.item():.4f} vs eager {expected.item():.4f}", difference < 1e-3)  # fmt: skip

    report("family", f"model.compile: 3 steps in {time.perf_counter() - start:.0f} s (compilation included)", True)

    quantizer = compiled.quantizer

    x = torch.randn(3000, quantizer.input_dim, device=device, requires_grad=True)

    with counted_synchronizations(device) as found:
        output = quantizer(x)

        (output.quantized.sum() + output.loss_times(3000)).backward()

        synchronize(device)

    report("family", f"synchronizations in a compiled quantizer step: {len(found)} {found[:2]}", not found)


def _fsdp_worker(rank: int, device: str, init_file: str, result_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from w2v_knnvq.wav2vec2.fsdp import apply_fsdp_to_wav2vec2_knnvq

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)

    try:
        mesh = init_device_mesh(torch.device(device).type, (1,))

        # fairseq2's `trainer.mixed_precision.mode=auto`: FSDP2 casts no parameter, autocast runs
        # the layers in bf16 and the quantizer switches it off.
        policy = MixedPrecisionPolicy()

        def wrapper(module: torch.nn.Module, reshard_after_forward: bool | None = None) -> torch.nn.Module:
            fully_shard(module, mesh=mesh, mp_policy=policy)

            return module

        model = _family_model(torch.device(device))

        apply_fsdp_to_wav2vec2_knnvq(model, "layer", wrapper)

        wrapper(model)

        dtypes: dict[str, str] = {}

        def record(module: Any, args: Any) -> None:
            dtypes["codebook"] = str(module.codebook.weight.dtype)

        model.quantizer.register_forward_pre_hook(record)

        waveforms = torch.randn(4, 32_000, device=device)

        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            loss, _ = _family_step(model, waveforms)

        torch.save({"loss": loss.float().cpu(), **dtypes}, result_file)
    finally:
        dist.destroy_process_group()


def check_fsdp(device: torch.device) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(  # type: ignore[attr-defined]
            _fsdp_worker,
            args=(str(device), f"{directory}/store", f"{directory}/result.pt"),
            nprocs=1,
            join=True,
            start_method="spawn",
        )

        result = torch.load(f"{directory}/result.pt")

    report("family", f"FSDP2 with bf16 autocast (mixed_precision.mode=auto) step: loss {result['loss'].item():.3f}, quantizer codebook {result['codebook']}", bool(torch.isfinite(result["loss"])) and result["codebook"] == "torch.float32")  # fmt: skip


def check_memory(device: torch.device, args: argparse.Namespace) -> None:
    # On a CPU the peak resident set size only sees what exceeds the import's own peak.
    num_rows = 65_536 if device.type == "cuda" else 32_768

    from w2v_knnvq_tools.benchmark_quantizers import memory_subprocess

    dense = memory_subprocess(num_rows, None, device)

    chunked = memory_subprocess(num_rows, 4096, device)

    ratio = chunked / max(dense, 1e-6)

    report("memory", f"N = {num_rows}, M = 8196: dense {dense:.0f} MiB, chunked {chunked:.0f} MiB ({ratio:.2f} x)", ratio <= 0.25)  # fmt: skip


def check_speed(device: torch.device, args: argparse.Namespace) -> None:
    from w2v_knnvq_tools.benchmark_quantizers import GUMBEL, bare_softmax_step, compiled, gumbel_step, quantizer_step

    for num_rows in (3000, 24_000) if device.type == "cuda" else (3000,):
        for layout in LAYOUTS:
            torch.manual_seed(0)

            x = torch.randn(4, num_rows // 4, 512, device=device, requires_grad=True)

            steps: dict[str, Callable[[], None]] = {
                GUMBEL: gumbel_step(layout, x),
                "bare-softmax (compiled)": compiled(bare_softmax_step(layout, x)),
                "softmax-knn-ce (eager)": quantizer_step(layout, "softmax-knn-ce", x),
                "softmax-knn-ce (compiled)": quantizer_step(layout, "softmax-knn-ce", x, compile=True),
            }

            for step in steps.values():
                for _ in range(3):
                    step()

            timings = interleaved_timings(steps, args.rounds, device)

            for name in steps:
                milliseconds = 1000 * sorted(timings[name])[len(timings[name]) // 2]

                report(
                    "speed",
                    f"N = {num_rows}, {layout}, {name}: {milliseconds:.1f} ms, "
                    f"{median_ratio(timings, name, GUMBEL):.2f} x Gumbel, "
                    f"{median_ratio(timings, name, 'bare-softmax (compiled)'):.2f} x bare softmax",
                    True,
                )


CHECKS = {
    "equality": check_equality,
    "global": check_global,
    "family": check_family,
    "memory": check_memory,
    "speed": check_speed,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    print(f"# GPU check on {name}, torch {torch.__version__}\n\n| check | what | result |\n|---|---|---|", flush=True)

    start = time.perf_counter()

    for check in args.checks:
        try:
            CHECKS[check](device, args)
        except Exception as error:  # a broken check is a failed row, the others still run
            report(check, f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}", False)

    failed = [row for row in RESULTS if not row[2]]

    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - start:.0f} s")

    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    sys.exit(main())
