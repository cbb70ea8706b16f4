"""The README's main job, shortened: each method pretrains, is evaluated on the whole
validation split, and lands in one table with Figure 2's histograms beside its run; a rerun
redoes nothing that is finished."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.cli import run_recipe_command

METHODS = ("ste-euclid", "softmax-knn-ce")


@pytest.mark.e2e
def test_demo_prints_table_3_with_tightness(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "recipes.studies.demo", "--output-dir", str(tmp_path), "--num-steps", "2"]

    completed = run_recipe_command([*command, "--methods", *METHODS])

    out = completed.stdout
    assert "| method | K | codebook 1 usage | codebook 2 usage | mean usage per utterance |" in out

    rows = dict(
        (match[0], match[1:])
        for match in re.findall(
            r"^\| ([\w-]+) \| (\S+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| (.+?) \| (.+?) \|$", out, re.M
        )
    )

    assert set(rows) == set(METHODS)

    # K applies to the KNN method only; a hard quantizer is onehot (perplexity 1).
    assert rows["softmax-knn-ce"][0] == "2" and rows["ste-euclid"][0] == "—"
    assert rows["ste-euclid"][4] == "1 (hard)"
    assert 1.0 <= float(rows["softmax-knn-ce"][4]) <= float(rows["softmax-knn-ce"][5]) <= 320.0

    for method, cells in rows.items():
        usage = [float(cell) for cell in cells[1:4]]
        assert all(0.0 < value <= 100.0 for value in usage), method

        assert (tmp_path / method / "checkpoints" / "step_2").is_dir()
        assert (tmp_path / method / "eval" / "per_utterance_usage.png").stat().st_size > 0
        assert (tmp_path / method / "eval" / "code_popularity.png").stat().st_size > 0

    assert "No calls to update" not in completed.stderr

    # A rerun starts no run and no evaluation again, and prints the same table.
    rerun = run_recipe_command([*command, "--methods", *METHODS])

    assert rerun.stdout.count("(finished before, not rerun)") == 2 * len(METHODS)
    assert ": done in" not in rerun.stdout

    def table(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if line.startswith("| ")]

    assert table(rerun.stdout) == table(out)
