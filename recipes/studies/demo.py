"""The main job: the paper's Table 3 pattern on the bundled corpus, in a few CPU minutes.

Writes manifests of the bundled ``minispeech`` corpus, pretrains the tiny 2 x 320 model once per
method with the pretraining recipe's ``tiny_cpu`` preset (two runs at a time, one thread each),
evaluates every run's last checkpoint on the whole validation split, and prints a table in the
layout of the paper's Table 3 (method, K, usage of each codebook) with the tightness of the
smoothed quantizers (Table 2's individual perplexity) and the mean per-utterance usage:

- the gradient-estimation baselines (``ste-euclid``, ``re-cosine``, ``simvq``) collapse onto a
  few codes;
- the perplexity regularizer (``softmax-ppl``) uses the codebook but its quantizers stay loose;
- ``softmax-knn-ce`` uses the whole codebook with tight quantizers.

Figure 2's histograms are written next to each run (``{method}/eval/*.png``); the runs keep
their checkpoints for fine-tuning and feature extraction, and a rerun resumes them (finished
runs and evaluations are not redone).

    w2v-knnvq-demo [--output-dir outputs/demo] [--num-steps 400] [--methods ...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.tool import tool_parser

from .jobs import REPO_ROOT, JobError
from .pretraining import evaluate_all, pretrain_all, result_table, write_manifests

METHODS = ("ste-euclid", "re-cosine", "simvq", "softmax-ppl", "softmax-knn-ce")
"""Table 3's story: two gradient estimators and SimVQ, the perplexity regularizer, the paper's method."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__, prog="w2v-knnvq-demo")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "demo")
    parser.add_argument("--num-steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="quantizer methods, one run each")
    args = parser.parse_args(argv)

    output_dir: Path = args.output_dir.resolve()

    manifest_dir = output_dir / "manifests"

    write_manifests(manifest_dir)

    start = time.monotonic()

    try:
        runs = pretrain_all(args.methods, output_dir, manifest_dir, args.num_steps)

        records = evaluate_all(runs, manifest_dir)
    except JobError as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(f"\n{result_table(records, args.num_steps)}\n")

    print(f"Figure 2 histograms: {output_dir}/<method>/eval/{{per_utterance_usage,code_popularity}}.png")
    print(f"Checkpoints: {output_dir}/<method>/checkpoints  ({time.monotonic() - start:.0f} s in all)")

    return 0


if __name__ == "__main__":
    sys.exit(main())
