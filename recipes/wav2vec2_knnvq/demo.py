"""The main job: the paper's Table 3 pattern on the bundled corpus, in a few CPU minutes.

Writes manifests of the bundled ``minispeech`` corpus, pretrains the tiny 2 x 320 model once per
method with the recipe's ``tiny_cpu`` preset (two runs at a time, one thread each), evaluates
every run's last checkpoint on the whole validation split, and prints a table in the layout of
the paper's Table 3 (method, K, usage of each codebook) with the tightness of the smoothed
quantizers (Table 2's individual perplexity) and the mean per-utterance usage:

- the gradient-estimation baselines (``ste-euclid``, ``re-cosine``, ``simvq``) collapse onto a
  few codes;
- the perplexity regularizer (``softmax-ppl``) uses the codebook but its quantizers stay loose;
- ``softmax-knn-ce`` uses the whole codebook with tight quantizers.

Figure 2's histograms are written next to each run (``{method}/eval/valid/*.png``); the runs keep
their checkpoints for fine-tuning and feature extraction, and a rerun resumes them.

    python -m recipes.wav2vec2_knnvq.demo [--output-dir outputs/demo] [--num-steps 400] [--methods ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fairseq2 import init_fairseq2
from fairseq2.device import CPU

from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.runs import find_run_checkpoint
from w2v_knnvq.tool import tool_parser

from .ssl.evaluate import SplitEvaluation, evaluate_run, run_method

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = REPO_ROOT / "tests" / "data" / "minispeech"
PRESET = Path(__file__).resolve().parent / "ssl" / "configs" / "tiny_cpu.yaml"

METHODS = ("ste-euclid", "re-cosine", "simvq", "softmax-ppl", "softmax-knn-ce")
"""Table 3's story: two gradient estimators and SimVQ, the perplexity regularizer, the paper's method."""

PARALLEL_RUNS = 2


def write_manifests(manifest_dir: Path) -> None:
    for split, name in (("train", "train"), ("dev", "valid")):
        make_manifest(
            ManifestConfig(
                corpus_dir=CORPUS_DIR, splits=[split], name=name, output_dir=manifest_dir, show_progress=False
            )
        )


def pretrain_command(
    method: str,
    output_dir: Path,
    num_steps: int,
    num_threads: int,
    extra_overrides: Sequence[str] = (),
    *,
    preset: Path = PRESET,
) -> list[str]:
    # The preset's schedule (20 warm-up steps, metrics every 10) shrinks with short runs.
    num_warmup_steps = min(20, num_steps // 2)
    publish_every = 10 if num_steps % 10 == 0 else 1

    return [
        sys.executable,
        "-m",
        # `recipes.wav2vec2_knnvq.ssl` in a checkout, `w2v_knnvq_recipes...` when installed.
        f"{__package__}.ssl",
        "--no-rich",
        "--config-file",
        str(preset),
        "--config",
        f"model.config_overrides.quantizer.method={method}",
        f"regime.num_steps={num_steps}",
        f"regime.validate_every_n_steps={num_steps}",
        f"regime.checkpoint_every_n_steps={num_steps}",
        f"regime.publish_metrics_every_n_steps={publish_every}",
        f"lr_scheduler.config.num_warmup_steps={num_warmup_steps}",
        f"common.torch.num_threads={num_threads}",
        *extra_overrides,
        "--",
        str(output_dir),
    ]


@dataclass(frozen=True, kw_only=True)
class PretrainingRun:
    """One run of the preset: its folder name under the output directory, its method and any
    other overrides (e.g. K)."""

    name: str

    method: str

    overrides: tuple[str, ...] = ()


def pretrain_all(
    runs: Sequence[PretrainingRun | str], output_dir: Path, manifest_dir: Path, num_steps: int, *, preset: Path = PRESET
) -> None:
    """Runs ``PARALLEL_RUNS`` at a time; each run logs to ``{name}/pretrain.log``.

    :param runs: Runs, or method names for runs of the preset as it is.
    """
    env = {**os.environ, "MINISPEECH_MANIFEST_DIR": str(manifest_dir)}

    pending = [run if isinstance(run, PretrainingRun) else PretrainingRun(name=run, method=run) for run in runs]

    while pending:
        batch, pending = pending[:PARALLEL_RUNS], pending[PARALLEL_RUNS:]

        num_threads = max(1, (os.cpu_count() or 2) // len(batch))

        running = []

        start = time.monotonic()

        for run in batch:
            run_dir = output_dir / run.name

            run_dir.mkdir(parents=True, exist_ok=True)

            log = (run_dir / "pretrain.log").open("w", encoding="utf-8")

            print(f"== Pretraining with {run.name} ({num_steps} steps) -> {run_dir}", flush=True)

            command = pretrain_command(run.method, run_dir, num_steps, num_threads, run.overrides, preset=preset)

            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

            running.append((run.name, process, log))

        for name, process, log in running:
            returncode = process.wait()

            log.close()

            if returncode != 0:
                raise RuntimeError(
                    f"The pretraining run {name} failed (exit code {returncode}); see {output_dir / name / 'pretrain.log'}."
                )

        print(f"   done in {time.monotonic() - start:.0f} s", flush=True)


@dataclass(kw_only=True)
class MethodResult:
    method: str

    knn_k: int | None

    evaluation: SplitEvaluation


def evaluate_all(names: Sequence[str], output_dir: Path, manifest_dir: Path) -> list[MethodResult]:
    """Evaluates the last checkpoint of each run ``output_dir/{name}`` on the validation split."""
    init_fairseq2()

    results = []

    for name in names:
        run = find_run_checkpoint(output_dir / name)

        evaluation = evaluate_run(run, manifest_dir, ["valid"], output_dir / name / "eval", device=CPU)["valid"]

        method, knn_k = run_method(run)

        results.append(MethodResult(method=method, knn_k=knn_k, evaluation=evaluation))

    return results


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def result_table(results: Sequence[MethodResult], num_steps: int) -> str:
    """Table 3's layout (usage per codebook) with the tightness and per-utterance usage."""
    num_codebooks = results[0].evaluation.report.usage.numel()

    header = ["method", "K", *(f"codebook {g + 1} usage" for g in range(num_codebooks))]
    header += ["mean usage per utterance", "mean individual perplexity", "99th pct. individual perplexity"]

    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]

    for result in results:
        report = result.evaluation.report

        usage = [_percent(value) for value in report.usage.tolist()]

        per_utterance = _percent(float(report.per_sample_usage.mean()))

        mean_perplexity = result.evaluation.metrics.get("individual_perplexity")

        if isinstance(mean_perplexity, list) and report.perplexity_percentiles is not None:
            tightness = [
                f"{sum(mean_perplexity) / len(mean_perplexity):.1f}",
                f"{float(report.perplexity_percentiles[:, 2].mean()):.1f}",
            ]
        else:
            tightness = ["1 (hard)", "1 (hard)"]

        k = "—" if result.knn_k is None else str(result.knn_k)

        lines.append("| " + " | ".join([result.method, k, *usage, per_utterance, *tightness]) + " |")

    return (
        f"After {num_steps} steps, on the whole validation split ({results[0].evaluation.report.per_sample_usage.size(0)} "
        "utterances): the fraction of each codebook's 320 entries used (Table 3), the mean fraction used within "
        "an utterance, and the individual perplexity exp(-sum_m p_m log p_m) of the smoothed quantizers "
        "(Table 2: 1 is onehot, 320 uniform; lower is tighter), averaged over codebooks.\n\n" + "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "demo")
    parser.add_argument("--num-steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="quantizer methods, one run each")
    args = parser.parse_args(argv)

    output_dir: Path = args.output_dir.resolve()

    manifest_dir = output_dir / "manifests"

    write_manifests(manifest_dir)

    start = time.monotonic()

    pretrain_all(args.methods, output_dir, manifest_dir, args.num_steps)

    results = evaluate_all(args.methods, output_dir, manifest_dir)

    print(f"\n{result_table(results, args.num_steps)}\n")

    print(f"Figure 2 histograms: {output_dir}/<method>/eval/valid/{{per_utterance_usage,code_popularity}}.png")
    print(f"Checkpoints: {output_dir}/<method>/checkpoints  ({time.monotonic() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
