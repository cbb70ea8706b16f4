"""The README's main job, shortened: both methods pretrain, validate and leave checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_usage_of_both_methods_side_by_side(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "recipes.wav2vec2_knnvq.demo", "--output-dir", str(tmp_path), "--num-steps", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]

    out = completed.stdout
    assert "| metric | softmax-knn-ce | softmax-ppl |" in out

    # Two codebooks (tiny_2x320), each with a percentage for both methods.
    rows = re.findall(r"^\| codebook (\d) usage \| ([\d.]+)% \| ([\d.]+)% \|$", out, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["1", "2"]
    for _, knn, ppl in rows:
        assert 0.0 < float(knn) <= 100.0 and 0.0 < float(ppl) <= 100.0

    perplexity_rows = re.findall(
        r"^\| codebook (\d) mean individual perplexity \| ([\d.]+) \| ([\d.]+) \|$", out, flags=re.MULTILINE
    )
    assert [row[0] for row in perplexity_rows] == ["1", "2"]
    for _, knn, ppl in perplexity_rows:
        assert 1.0 <= float(knn) <= 320.0 and 1.0 <= float(ppl) <= 320.0

    for method in ("softmax-knn-ce", "softmax-ppl"):
        assert (tmp_path / method / "checkpoints" / "step_2").is_dir()
