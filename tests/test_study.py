"""The study runner and the report tool through their command lines: a grid of methods and K
values, one run each, every run evaluated, one report in the paper's table layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_study_runs_the_grid_and_reports_it(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "recipes.wav2vec2_knnvq.study", "--output-dir", str(tmp_path),
        "--methods", "ste-euclid", "softmax-knn-ce", "--k", "1", "3", "--num-steps", "2",
    ]  # fmt: skip

    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-3000:]

    # One run per non-KNN method, one per (KNN method, K).
    for name in ("ste-euclid", "softmax-knn-ce-k1", "softmax-knn-ce-k3"):
        record = json.loads((tmp_path / name / "eval" / "valid" / "evaluation.json").read_text())

        assert record["method"] == ("ste-euclid" if name == "ste-euclid" else "softmax-knn-ce")
        assert record["knn_k"] == (None if name == "ste-euclid" else int(name[-1]))

    report = (tmp_path / "report.md").read_text()

    assert "| softmax-knn-ce | 1 |" in report and "| softmax-knn-ce | 3 |" in report and "| ste-euclid | — |" in report
    assert "Codebook 2 (valid)" in report and "code_popularity.png" in report

    # The report tool gathers speech and image evaluations alike, and names what is not one.
    image = {
        "method": "hg-ppl",
        "knn_k": None,
        "feature_map": "8x8x8",
        "codebook_size": 64,
        "code_use": [0.5],
        "rmse": 0.2,
        "rmse_imagenet": 0.44,
        "fid": None,
        "inception_score": None,
        "perplexity_percentiles": None,
    }
    (tmp_path / "image.json").write_text(json.dumps(image))

    gathered = subprocess.run(
        [sys.executable, "-m", "recipes.report", str(tmp_path / "ste-euclid"), str(tmp_path / "image.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert gathered.returncode == 0, gathered.stderr
    assert "## Speech" in gathered.stdout and "## Images" in gathered.stdout
    assert "| hg-ppl | — | 50.0% | 0.200 | 0.440 |" in gathered.stdout

    (tmp_path / "bad.json").write_text("[]")

    bad = subprocess.run(
        [sys.executable, "-m", "recipes.report", str(tmp_path / "bad.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert bad.returncode == 1 and "bad.json is no evaluation record" in bad.stderr


@pytest.mark.parametrize("method", ["no-such-method"])
def test_study_refuses_an_unknown_method(method: str, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "recipes.wav2vec2_knnvq.study", "--output-dir", str(tmp_path), "--methods", method],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert completed.returncode != 0 and "must be one of" in completed.stderr
