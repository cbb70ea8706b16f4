"""Forward+backward time and peak memory of every quantizer method at wav2vec2-base shapes.

Each method runs beside fairseq2's own ``GumbelWav2Vec2VectorQuantizer``, a bare softmax
quantizer (cosine softmax and ``Q^T p`` alone) and ``softmax-knn-ce`` with its KNN loss
removed (codes, log-probabilities and perplexities kept) in the same run, and the table
reports ratios to the first two. torch.compile is off for all of them. Each measurement runs in a fresh subprocess so that
peak memory is that of the measured method alone: CUDA allocator statistics on a GPU; on the
CPU, the growth of the process's peak resident set size during its first step (a coarser figure
that includes one-time allocations).

    python tools/benchmark_quantizers.py [--device cuda] [--frames 3000] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from torch import Tensor

LAYOUTS = {"1x1024": (1, 1024), "2x320": (2, 320)}
INPUT_DIM = 512
QUANTIZED_DIM = 256
GUMBEL = "fairseq2-gumbel"
BARE_SOFTMAX = "bare-softmax"
NO_REGULARIZER = "softmax-knn-ce-minus-knn"


def build_step(name: str, layout: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    """Return a function that runs one forward pass and returns the loss to backpropagate."""
    from w2v_knnvq.quantizer import QuantizerConfig, VectorQuantizer
    from w2v_knnvq.quantizer.assign import cosine_logits

    num_codebooks, codebook_size = LAYOUTS[layout]

    if name == GUMBEL:
        from fairseq2.models.wav2vec2.vector_quantizer import GumbelWav2Vec2VectorQuantizer

        gumbel = GumbelWav2Vec2VectorQuantizer(
            INPUT_DIM, QUANTIZED_DIM, num_codebooks, codebook_size, (2.0, 0.5, 0.999995), device=device
        ).train()

        def gumbel_step(x: Tensor) -> Tensor:
            output = gumbel(x)
            num_entries = num_codebooks * codebook_size
            diversity = (num_entries - output.prob_perplexity) / num_entries
            return output.quantized_vectors.sum() + diversity

        return gumbel_step

    method = "softmax-knn-ce" if name in (BARE_SOFTMAX, NO_REGULARIZER) else name

    if name == NO_REGULARIZER:
        import w2v_knnvq.quantizer.quantizer as quantizer_module

        # The module with its outputs and metrics, minus the KNN loss: the regularizer's own
        # cost. Each measurement runs in its own process, so the patch stays here.
        vars(quantizer_module)["knn_loss"] = lambda log_probs, *args, **kwargs: log_probs.new_zeros(())

    config = QuantizerConfig.from_method(
        method,
        input_dim=INPUT_DIM,
        num_codebooks=num_codebooks,
        codebook_size=codebook_size,
        codebook_dim=QUANTIZED_DIM // num_codebooks,
        knn_k=2,
    )
    quantizer = VectorQuantizer(config, device=device).train()

    if name == BARE_SOFTMAX:
        input_proj = quantizer.input_proj

        assert input_proj is not None

        def bare_step(x: Tensor) -> Tensor:
            z = input_proj(x).reshape(-1, num_codebooks, config.codebook_dim)
            codebook = quantizer.codebook()
            probs = torch.softmax(cosine_logits(z, codebook, quantizer.temperature()), dim=-1)
            return torch.einsum("ngm,gmd->ngd", probs, codebook).sum()

        return bare_step

    def method_step(x: Tensor) -> Tensor:
        output = quantizer(x)
        return output.quantized.sum() + output.loss

    return method_step


def measure(name: str, layout: str, device_name: str, frames: int, repeats: int) -> dict[str, float]:
    device = torch.device(device_name)

    torch.manual_seed(0)

    x = torch.randn(4, frames // 4, INPUT_DIM, device=device, requires_grad=True)

    step = build_step(name, layout, device)

    def run() -> None:
        torch.autograd.backward(step(x))
        x.grad = None

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cpu":
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # Warm-up, then the peak memory of one step on top of what is already held.
    run()
    synchronize()

    if device.type == "cpu":
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    else:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        synchronize()
        peak_mib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20

    timings = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - start)

    timings.sort()

    return {"ms": 1000.0 * timings[len(timings) // 2], "peak_mib": peak_mib}


def run_worker(args: list[str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", *args]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"Benchmark worker {args} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    from w2v_knnvq.quantizer import METHOD_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=3000, help="quantized frames per step (default: 3000)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method (default: 10)")
    parser.add_argument("--methods", nargs="*", default=list(METHOD_NAMES), help="methods to measure (default: all)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        name, layout = args.worker
        print(json.dumps(measure(name, layout, args.device, args.frames, args.repeats)))
        return

    common = ["--device", args.device, "--frames", str(args.frames), "--repeats", str(args.repeats)]

    print(
        f"Quantizer forward+backward, {args.frames} frames of {INPUT_DIM}-d features, device {args.device}, "
        f"median of {args.repeats} steps; ratios to fairseq2's Gumbel quantizer and to a bare softmax quantizer.",
        flush=True,
    )

    for layout in LAYOUTS:
        results = {}
        for name in [GUMBEL, BARE_SOFTMAX, NO_REGULARIZER, *args.methods]:
            result = run_worker([name, layout, *common])
            results[name] = result
            print(f"  measured {layout} {name}", file=sys.stderr, flush=True)

        gumbel, bare = results[GUMBEL], results[BARE_SOFTMAX]

        print(f"\n### {layout}\n")
        print("| method | time (ms) | x Gumbel | x bare softmax | peak memory (MiB) | x Gumbel |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, result in results.items():
            print(
                f"| {name} | {result['ms']:.1f} | {result['ms'] / gumbel['ms']:.2f} | "
                f"{result['ms'] / bare['ms']:.2f} | {result['peak_mib']:.0f} | "
                f"{result['peak_mib'] / max(gumbel['peak_mib'], 1e-9):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
