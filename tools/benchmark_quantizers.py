"""Speed and memory of the quantizer beside fairseq2's own, measured side by side.

Three tables, each of ratios measured in one run:

- ``speed``: forward+backward of one quantizer step on ``--frames`` 512-d features (about one
  wav2vec2-base batch of masked frames) at 1 x 1024 and 2 x 320 codebooks, 256-d quantized
  vectors. Every variant runs in the same process, in interleaved rounds (each round times
  every variant once, in turn, starting one variant later each round), and the table reports
  the median time over rounds and the median over rounds of each variant's time over the
  baseline's in the same round. Variants:
  fairseq2's ``GumbelWav2Vec2VectorQuantizer`` as fairseq2 runs it (its compiled matmul+sum,
  warmed up before timing), a bare softmax quantizer (cosine softmax and ``Q^T p`` only) eager
  and compiled, ``softmax-knn-ce`` dense eager and compiled (``torch.compile(dynamic=True)``)
  and chunked, and any ``--methods``.
- ``memory``: peak memory of one ``softmax-knn-ce`` forward+backward, dense against chunked,
  at N = 32,768, M = 8196, D = 32 and at the image autoencoder's f64 per-rank shape (16 images
  x 64 x 64 = 65,536 latent pixels, M = 8196, D = 32). Each measurement runs in its own
  subprocess: the growth of the peak resident set size on the CPU, ``max_memory_allocated``
  on CUDA.
- ``training``: training steps per second of the ``tiny``, ``small`` and ``base`` archs with
  ``softmax-knn-ce`` against fairseq2's own ``wav2vec2`` (Gumbel, compiled) model of the same
  shape, interleaved in one process, without and with ``model.compile`` (each family's layers,
  and our quantizer).

    python tools/benchmark_quantizers.py [--device cuda] [--tables speed memory training] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from w2v_knnvq.tool import tool_parser

LAYOUTS = {"1x1024": (1, 1024), "2x320": (2, 320)}
INPUT_DIM = 512
QUANTIZED_DIM = 256
DEFAULT_CHUNK = 1024

GUMBEL = "fairseq2-gumbel (compiled)"
BARE = "bare-softmax (compiled)"

MEMORY_SHAPES = {"N=32768": 32_768, "f64 per rank (N=65536)": 65_536}
MEMORY_CODES = 8196
MEMORY_DIM = 32
MEMORY_CHUNK = 4096

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(steps: dict[str, Step], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Times every step once per round, in turn, each round starting one step further down the
    list (so that no variant always follows the same one); :returns: the seconds of each step,
    round by round."""
    timings: dict[str, list[float]] = {name: [] for name in steps}

    names = list(steps)

    for round_index in range(rounds):
        shift = round_index % len(names)

        for name in names[shift:] + names[:shift]:
            synchronize(device)

            start = time.perf_counter()

            steps[name]()

            synchronize(device)

            timings[name].append(time.perf_counter() - start)

    return timings


def median_ratio(timings: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of ``name``'s time over ``reference``'s in the same round: paired, so a
    slow phase of the machine slows both and cancels out."""
    return statistics.median(t / r for t, r in zip(timings[name], timings[reference], strict=True))


# --- quantizer speed ------------------------------------------------------------------------


def gumbel_step(layout: str, x: Tensor) -> Step:
    from fairseq2.models.wav2vec2.vector_quantizer import GumbelWav2Vec2VectorQuantizer

    num_codebooks, codebook_size = LAYOUTS[layout]

    quantizer = GumbelWav2Vec2VectorQuantizer(
        INPUT_DIM, QUANTIZED_DIM, num_codebooks, codebook_size, (2.0, 0.5, 0.999995), device=x.device
    ).train()

    def step() -> None:
        output = quantizer(x)

        num_entries = num_codebooks * codebook_size

        diversity = (num_entries - output.prob_perplexity) / num_entries

        torch.autograd.backward(output.quantized_vectors.sum() + diversity)

    return step


def compiled(step: Step) -> Step:
    """``step`` under ``torch.compile`` with dynamic shapes, as the family's ``model.compile`` runs."""
    return torch.compile(step, dynamic=True)


def quantizer_step(
    layout: str, method: str, x: Tensor, *, chunk_size: int | None = None, compile: bool = False
) -> Step:
    from w2v_knnvq.quantizer import QuantizerConfig, VectorQuantizer

    num_codebooks, codebook_size = LAYOUTS[layout]

    config = QuantizerConfig.from_method(
        method,
        input_dim=INPUT_DIM,
        num_codebooks=num_codebooks,
        codebook_size=codebook_size,
        codebook_dim=QUANTIZED_DIM // num_codebooks,
        knn_k=2,
        chunk_size=chunk_size,
    )

    quantizer = VectorQuantizer(config, device=x.device).train()

    if compile:
        quantizer.compile(dynamic=True)  # type: ignore[no-untyped-call]

    def step() -> None:
        output = quantizer(x)

        torch.autograd.backward(output.quantized.sum() + output.loss)

    return step


def bare_softmax_step(layout: str, x: Tensor) -> Step:
    """Cosine softmax over a learned temperature and ``Q^T p``: the least a softmax quantizer does."""
    num_codebooks, codebook_size = LAYOUTS[layout]

    codebook_dim = QUANTIZED_DIM // num_codebooks

    proj = torch.nn.Linear(INPUT_DIM, QUANTIZED_DIM, device=x.device)

    codebook = torch.nn.Parameter(torch.randn(num_codebooks, codebook_size, codebook_dim, device=x.device))

    log_temperature = torch.nn.Parameter(torch.tensor(-2.3, device=x.device))

    def step() -> None:
        z = torch.nn.functional.normalize(proj(x).reshape(-1, num_codebooks, codebook_dim), dim=-1)

        logits = torch.einsum(
            "ngd,gmd->ngm", z / log_temperature.exp(), torch.nn.functional.normalize(codebook, dim=-1)
        )

        quantized = torch.einsum("ngm,gmd->ngd", logits.softmax(dim=-1), codebook)

        torch.autograd.backward(quantized.sum())

    return step


def speed_table(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\n## Quantizer forward+backward: {args.frames} frames of {INPUT_DIM}-d features, device {device}, "
        f"median of {args.rounds} interleaved rounds\n",
        flush=True,
    )

    for layout in LAYOUTS:
        torch.manual_seed(0)

        # (N, S, F), as fairseq2's quantizer takes it: 4 utterances of masked frames.
        x = torch.randn(4, args.frames // 4, INPUT_DIM, device=device, requires_grad=True)

        bare = bare_softmax_step(layout, x)

        steps: dict[str, Step] = {
            GUMBEL: gumbel_step(layout, x),
            "bare-softmax (eager)": bare,
            BARE: compiled(bare),
            "softmax-knn-ce (eager)": quantizer_step(layout, "softmax-knn-ce", x),
            "softmax-knn-ce (compiled)": quantizer_step(layout, "softmax-knn-ce", x, compile=True),
            f"softmax-knn-ce chunked ({args.chunk_size}, eager)": quantizer_step(
                layout, "softmax-knn-ce", x, chunk_size=args.chunk_size
            ),
        }

        # Warm-up: compiles (fairseq2's Gumbel matmul, our variants) and fills the allocator caches.
        for step in steps.values():
            step()
            step()
            step()

        timings = interleaved_timings(steps, args.rounds, device)

        print(
            f"### {layout}\n\n| variant | time (ms) | x Gumbel (compiled) | x bare softmax (compiled) |\n|---|---:|---:|---:|"
        )

        for name, seconds in timings.items():
            print(
                f"| {name} | {1000 * statistics.median(seconds):.1f} | {median_ratio(timings, name, GUMBEL):.2f} "
                f"| {median_ratio(timings, name, BARE):.2f} |",
                flush=True,
            )

        print()


# --- memory ---------------------------------------------------------------------------------


def memory_worker(num_rows: int, chunk_size: int | None, device: torch.device, *, compile: bool = False) -> float:
    """:returns: The peak memory growth (MiB) of one softmax-knn-ce step of ``num_rows`` rows
    (``compile``: the second step of the compiled quantizer, after its compilation)."""
    from w2v_knnvq.quantizer import QuantizerConfig, VectorQuantizer

    config = QuantizerConfig.from_method(
        "softmax-knn-ce",
        input_dim=MEMORY_DIM,
        num_codebooks=1,
        codebook_size=MEMORY_CODES,
        codebook_dim=MEMORY_DIM,
        knn_k=2,
        chunk_size=chunk_size,
    )

    quantizer = VectorQuantizer(config, device=device).train()

    x = torch.randn(num_rows, MEMORY_DIM, device=device, requires_grad=True)

    if compile:
        quantizer.compile(dynamic=True)  # type: ignore[no-untyped-call]

        # Compiled on a small batch, so that the compiler's own peak stays below the step's.
        small = x[:4096].detach().requires_grad_()

        warm = quantizer(small)

        torch.autograd.backward(warm.quantized.sum() + warm.loss)

        del warm, small

    synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    output = quantizer(x)

    torch.autograd.backward(output.quantized.sum() + output.loss)

    synchronize(device)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return (peak - baseline) / 2**20


def memory_table(args: argparse.Namespace, device: torch.device) -> None:
    kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS growth"

    print(
        f"\n## Peak memory of one softmax-knn-ce forward+backward ({kind}, one subprocess each), "
        f"M = {MEMORY_CODES}, D = {MEMORY_DIM}, device {device}\n"
    )
    print(
        f"| shape | dense (MiB) | dense, compiled (MiB) | chunked {args.memory_chunk} (MiB) | chunked / dense |\n"
        "|---|---:|---:|---:|---:|"
    )

    for label, num_rows in MEMORY_SHAPES.items():
        results = [
            memory_subprocess(num_rows, chunk_size, device, compile=compile)
            for chunk_size, compile in ((None, False), (None, True), (args.memory_chunk, False))
        ]

        dense, compiled_dense, chunked = results

        print(f"| {label} | {dense:.0f} | {compiled_dense:.0f} | {chunked:.0f} | {chunked / dense:.2f} |", flush=True)


def memory_subprocess(num_rows: int, chunk_size: int | None, device: torch.device, *, compile: bool = False) -> float:
    """:func:`memory_worker` in a process of its own (a CPU's peak resident set size only grows)."""
    command = [
        sys.executable,
        "-m",
        "w2v_knnvq_tools.benchmark_quantizers",
        "--memory-worker",
        str(num_rows),
        str(chunk_size or 0),
        str(int(compile)),
        "--device",
        str(device),
    ]

    completed = subprocess.run(command, capture_output=True, text=True, check=False)

    if completed.returncode != 0:
        raise RuntimeError(f"The memory measurement {command} failed:\n{completed.stderr[-2000:]}")

    return float(completed.stdout.strip().splitlines()[-1])


# --- training steps -------------------------------------------------------------------------


def training_step(family: str, arch: str, waveforms: Tensor, *, compile: bool = False) -> Step:
    """One optimizer step; ``compile``: ``model.compile`` as the recipes run it (our family's
    layers and quantizer; fairseq2's layers, its quantizer compiling its own product always)."""
    from fairseq2.models.wav2vec2 import Wav2Vec2Config, create_wav2vec2_model
    from fairseq2.nn import BatchLayout

    from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, Wav2Vec2KnnVqModel, create_wav2vec2_knnvq_model

    config = WAV2VEC2_KNNVQ_ARCHS[f"{arch}_2x320"]()

    config.quantizer.method = "softmax-knn-ce"

    torch.manual_seed(0)

    model: torch.nn.Module

    if family == "wav2vec2_knnvq":
        model = create_wav2vec2_knnvq_model(config)
    else:
        stock = Wav2Vec2Config(
            encoder_config=config.encoder_config,
            final_dim=config.final_dim,
            quantized_dim=config.quantizer.output_dim,
            num_codebooks=config.quantizer.num_codebooks,
            num_codebook_entries=config.quantizer.codebook_size,
        )

        model = create_wav2vec2_model(stock)

    model = model.to(waveforms.device).train()

    if compile:
        from w2v_knnvq.wav2vec2.fsdp import compile_wav2vec2_knnvq

        if isinstance(model, Wav2Vec2KnnVqModel):
            compile_wav2vec2_knnvq(model, dynamic=True)
        else:
            for layer in model.encoder.layers:
                layer.compile(dynamic=True)  # type: ignore[no-untyped-call]

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    layout = BatchLayout.of(waveforms)

    def step() -> None:
        loss, _ = model(waveforms, layout)

        torch.autograd.backward(loss.aggregate)

        optimizer.step()

        optimizer.zero_grad(set_to_none=True)

    return step


def training_table(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\n## Training steps per second, wav2vec 2.0 with softmax-knn-ce against fairseq2's wav2vec2 "
        f"(Gumbel, compiled), 2 x 320 codebooks, device {device}, median of {args.rounds} interleaved rounds\n"
    )
    print(
        "| arch | model.compile | batch | wav2vec2_knnvq (steps/s) | wav2vec2 (steps/s) | ratio |\n"
        "|---|---|---|---:|---:|---:|"
    )

    for arch, batch in (("tiny", (8, 48_000)), ("small", (8, 48_000)), ("base", args.base_batch)):
        for compile in (False, True):
            torch.manual_seed(1)

            waveforms = torch.randn(*batch, device=device)

            steps = {
                family: training_step(family, arch, waveforms, compile=compile)
                for family in ("wav2vec2_knnvq", "wav2vec2")
            }

            for step in steps.values():
                step()
                step()

            timings = interleaved_timings(steps, args.rounds, device)

            ours, stock = (1 / statistics.median(timings[family]) for family in ("wav2vec2_knnvq", "wav2vec2"))

            ratio = median_ratio(timings, "wav2vec2", "wav2vec2_knnvq")

            print(
                f"| {arch} | {'yes' if compile else 'no'} | {batch[0]} x {batch[1]} | {ours:.2f} | {stock:.2f} "
                f"| {ratio:.2f} |",
                flush=True,
            )


# --- cost model of the global KNN ------------------------------------------------------------

# (preset, G, M, K): global K over all ranks (the paper's 4 ranks x 2 per rank = 8 for speech).
KNN_PRESETS = (("speech 1 x 1024", 1, 1024, 8), ("speech 2 x 320", 2, 320, 8), ("image f64, M = 8196", 1, 8196, 2))


def cost_table(args: argparse.Namespace, device: torch.device) -> None:
    """Bytes per rank and step of the global KNN's all-gather (``select_neighbours``: K x G x M
    float32 scores and a count per rank) against the ring all-reduce of the base model's
    gradients (2 (R - 1) / R x 4 bytes x parameters sent and received per rank)."""
    from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

    with torch.device("meta"):
        base = create_wav2vec2_knnvq_model(WAV2VEC2_KNNVQ_ARCHS["base_2x320"]())

    num_parameters = sum(p.numel() for p in base.parameters())

    print(
        f"\n## Global KNN traffic per rank and step (received; a ring all-gather sends as much) against the "
        f"gradient all-reduce of the base model ({num_parameters / 1e6:.1f} M float32 parameters)\n"
    )

    ranks = (8, 64, 256, 1024)

    header = " | ".join(f"R = {r}" for r in ranks)

    print(f"| preset (K global) | message | {header} |\n|---|---:|{'---:|' * len(ranks)}")

    def mib(num_bytes: float) -> str:
        return f"{num_bytes / 2**20:.2f} MiB"

    for name, num_codebooks, codebook_size, k in KNN_PRESETS:
        message = 4 * (k * num_codebooks * codebook_size + 1)

        cells = " | ".join(mib((r - 1) * message) for r in ranks)

        print(f"| {name} (K = {k}) | {message / 1024:.0f} KiB | {cells} |")

    cells = " | ".join(mib(2 * (r - 1) / r * 4 * num_parameters) for r in ranks)

    print(f"| gradient all-reduce, base | | {cells} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=["speed", "memory", "training", "cost"],
        default=["speed", "memory", "training", "cost"],
    )
    parser.add_argument("--frames", type=int, default=3000, help="quantized frames per step (default: 3000)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="rows per chunk in the speed table")
    parser.add_argument("--memory-chunk", type=int, default=MEMORY_CHUNK, help="rows per chunk in the memory table")
    parser.add_argument("--methods", nargs="*", default=[], help="more quantizer methods for the speed table")
    parser.add_argument(
        "--base-batch",
        type=int,
        nargs=2,
        default=(2, 32_000),
        metavar=("N", "SAMPLES"),
        help="waveforms of the base arch",
    )
    parser.add_argument("--memory-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)

    if args.memory_worker:
        num_rows, chunk_size, compile = args.memory_worker

        print(json.dumps(memory_worker(num_rows, chunk_size or None, device, compile=bool(compile))))

        return

    for table in args.tables:
        {"speed": speed_table, "memory": memory_table, "training": training_table, "cost": cost_table}[table](
            args, device
        )


if __name__ == "__main__":
    main()
