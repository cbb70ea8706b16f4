"""The main job: pretrain the tiny model on the bundled corpus twice and compare codebook usage.

Writes manifests of the bundled ``minispeech`` corpus, then runs the pretraining recipe's
``tiny_cpu`` preset once with ``softmax-knn-ce`` (the paper's method) and once with
``softmax-ppl`` (the perplexity baseline), and prints each codebook's usage on the whole
validation split side by side (the metric of the paper's Table 3). The runs stay in the
output directory; their checkpoints serve fine-tuning and feature extraction, and a rerun
resumes them.

    python -m recipes.wav2vec2_knnvq.demo [--output-dir outputs/demo] [--num-steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from w2v_knnvq.data.manifest import ManifestConfig, make_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = REPO_ROOT / "tests" / "data" / "minispeech"
PRESET = REPO_ROOT / "recipes" / "wav2vec2_knnvq" / "ssl" / "configs" / "tiny_cpu.yaml"
METHODS = ("softmax-knn-ce", "softmax-ppl")


def write_manifests(manifest_dir: Path) -> None:
    for split, name in (("train", "train"), ("dev", "valid")):
        make_manifest(ManifestConfig(corpus_dir=CORPUS_DIR, splits=[split], name=name, output_dir=manifest_dir))


def pretrain(method: str, output_dir: Path, manifest_dir: Path, num_steps: int) -> None:
    # The preset's schedule (20 warm-up steps, metrics every 10) shrinks with short runs.
    num_warmup_steps = min(20, num_steps // 2)
    publish_every = 10 if num_steps % 10 == 0 else 1

    command = [
        sys.executable,
        "-m",
        # `recipes.wav2vec2_knnvq.ssl` in a checkout, `w2v_knnvq_recipes...` when installed.
        f"{__package__}.ssl",
        "--config-file",
        str(PRESET),
        "--config",
        f"model.config_overrides.quantizer.method={method}",
        f"regime.num_steps={num_steps}",
        f"regime.validate_every_n_steps={num_steps}",
        f"regime.checkpoint_every_n_steps={num_steps}",
        f"regime.publish_metrics_every_n_steps={publish_every}",
        f"lr_scheduler.config.num_warmup_steps={num_warmup_steps}",
        "--",
        str(output_dir),
    ]

    env = {**os.environ, "MINISPEECH_MANIFEST_DIR": str(manifest_dir)}

    print(f"\n== Pretraining the tiny 2x320 model with {method} ({num_steps} steps) -> {output_dir}", flush=True)

    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)


def last_validation(output_dir: Path) -> dict[str, Any]:
    metrics_file = output_dir / "metrics" / "valid.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} is missing: the run of {output_dir} did not validate.")

    lines = [line for line in metrics_file.read_text().splitlines() if line.strip()]

    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "demo")
    parser.add_argument("--num-steps", type=int, default=150)
    args = parser.parse_args()

    output_dir: Path = args.output_dir.resolve()

    manifest_dir = output_dir / "manifests"
    write_manifests(manifest_dir)

    results = {}
    for method in METHODS:
        run_dir = output_dir / method
        pretrain(method, run_dir, manifest_dir, args.num_steps)
        results[method] = last_validation(run_dir)

    print(
        "\nOn the whole validation split: codebook usage (fraction of entries used at least once) and"
        "\nthe mean individual perplexity of the smoothed quantizers (1 = onehot, lower is tighter):\n"
    )
    print(f"| metric | {' | '.join(METHODS)} |")
    print(f"|---|{'---:|' * len(METHODS)}")

    # Keys of the metrics jsonl are the metrics' display names.
    rows = [
        ("Codebook Usage", "codebook {} usage"),
        ("Mean Utterance Codebook Usage", "codebook {} mean usage per utterance"),
    ]
    for key, label in rows:
        num_codebooks = len(results[METHODS[0]][key])
        for g in range(num_codebooks):
            cells = [f"{100 * results[m][key][g]:.1f}%" for m in METHODS]
            print(f"| {label.format(g + 1)} | {' | '.join(cells)} |")

    # Table 2's tightness: exp(-sum_m p_m log p_m) of each frame, 1 for onehot quantizers.
    num_codebooks = len(results[METHODS[0]]["Mean Individual Perplexity"])
    for g in range(num_codebooks):
        cells = [f"{results[m]['Mean Individual Perplexity'][g]:.1f}" for m in METHODS]
        print(f"| codebook {g + 1} mean individual perplexity | {' | '.join(cells)} |")

    print(f"\nCheckpoints: {', '.join(str(output_dir / m / 'checkpoints') for m in METHODS)}")


if __name__ == "__main__":
    main()
