"""The study runner through its command line (a grid of methods and K values, one run each,
every run evaluated, one report in the paper's table layouts), and the report that gathers
evaluations of speech and image runs alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.cli import run_recipe_command
from w2v_knnvq.report import main as report_main


@pytest.mark.e2e
def test_study_runs_the_grid_and_reports_it(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "recipes.studies.study", "--output-dir", str(tmp_path),
        "--methods", "ste-euclid", "softmax-knn-ce", "--k", "1", "3", "--num-steps", "2",
    ]  # fmt: skip

    run_recipe_command(command)

    # One run per non-KNN method, one per (KNN method, K).
    for name in ("ste-euclid", "softmax-knn-ce-k1", "softmax-knn-ce-k3"):
        (record,) = json.loads((tmp_path / name / "eval" / "evaluation.json").read_text())["splits"]

        assert record["method"] == ("ste-euclid" if name == "ste-euclid" else "softmax-knn-ce")
        assert record["knn_k"] == (None if name == "ste-euclid" else int(name[-1]))

    report = (tmp_path / "report.md").read_text()

    assert "| softmax-knn-ce | 1 |" in report and "| softmax-knn-ce | 3 |" in report and "| ste-euclid | — |" in report
    assert "Codebook 2 (valid)" in report and "code_popularity.png" in report


@pytest.mark.e2e
def test_study_refuses_an_unknown_method(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "recipes.studies.study", "--output-dir", str(tmp_path)]

    completed = run_recipe_command([*command, "--methods", "no-such-method"], expected_returncode=2)

    assert "must be one of" in completed.stderr


SPEECH_RECORD = {
    "checkpoint": "run/checkpoints/step_2",
    "method": "softmax-knn-ce",
    "knn_k": 2,
    "split": "valid",
    "num_utterances": 3,
    "codebook_usage": [0.25, 0.5],
    "perplexity_percentiles": [[1.5, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]],
}

IMAGE_RECORD = {
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


def test_report_gathers_speech_and_image_evaluations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    speech_dir = tmp_path / "run" / "eval" / "valid"
    speech_dir.mkdir(parents=True)
    (speech_dir / "evaluation.json").write_text(json.dumps(SPEECH_RECORD))
    (speech_dir / "code_popularity.png").write_bytes(b"png")

    (tmp_path / "image.json").write_text(json.dumps(IMAGE_RECORD))

    # A folder is searched for evaluation.json, a file is taken as it is.
    assert report_main([str(tmp_path / "run"), str(tmp_path / "image.json")]) == 0

    out = capsys.readouterr().out

    assert "## Speech" in out and "## Images" in out
    assert "| softmax-knn-ce | 2 | 25.0% | 50.0% |" in out
    assert "| softmax-knn-ce | 2 | 1.50 | 2.00 | 3.00 | 4.00 |" in out
    assert "| hg-ppl | — | 50.0% | 0.200 | 0.440 | — | — |" in out
    assert f"- {speech_dir / 'code_popularity.png'}" in out

    assert report_main([str(tmp_path / "run"), "-o", str(tmp_path / "report.md")]) == 0
    assert "| softmax-knn-ce | 2 | 25.0% | 50.0% |" in (tmp_path / "report.md").read_text()


def test_report_reads_one_file_with_a_record_per_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An evaluation of several splits in one ``evaluation.json``: a column group per split,
    the run's fields shared, the figures in a folder per split."""
    record = {key: value for key, value in SPEECH_RECORD.items() if key not in ("method", "knn_k", "split")}

    document = {
        "run_dir": "run",
        "method": "softmax-knn-ce",
        "knn_k": 2,
        "splits": [{**record, "split": "dev-clean"}, {**record, "split": "test-clean", "codebook_usage": [1.0, 0.75]}],
    }

    (tmp_path / "eval" / "test-clean").mkdir(parents=True)
    (tmp_path / "eval" / "evaluation.json").write_text(json.dumps(document))
    (tmp_path / "eval" / "test-clean" / "per_utterance_usage.png").write_bytes(b"png")

    assert report_main([str(tmp_path / "eval")]) == 0

    out = capsys.readouterr().out

    assert "| Codebook 1 (dev-clean) | Codebook 2 (dev-clean) | Codebook 1 (test-clean) |" in out
    assert "| softmax-knn-ce | 2 | 25.0% | 50.0% | 100.0% | 75.0% |" in out
    assert f"- {tmp_path / 'eval' / 'test-clean' / 'per_utterance_usage.png'}" in out


def test_report_tabulates_asr_evaluations_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ``evaluation.json`` of an ASR evaluation in a searched folder holds error rates, not
    codebook usage: they go to a table of their own."""
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "evaluation.json").write_text(json.dumps(SPEECH_RECORD))
    (tmp_path / "asr" / "eval").mkdir(parents=True)
    asr = {"run_dir": "asr", "step": 4, "splits": [{"split": "valid", "wer": 12.5, "cer": 4.0, "num_utterances": 3}]}
    (tmp_path / "asr" / "eval" / "evaluation.json").write_text(json.dumps(asr))

    assert report_main([str(tmp_path)]) == 0

    out = capsys.readouterr().out

    assert f"| {SPEECH_RECORD['method']} |" in out and "valid" in out
    assert "## Speech recognition" in out
    assert "| asr | valid | 12.50 | 4.00 | — | — |" in out

    beam = {**asr["splits"][0], "beam_search": {"wer": 10.0, "cer": 3.25, "lm": "lm.arpa"}}
    (tmp_path / "asr" / "eval" / "evaluation.json").write_text(json.dumps({**asr, "splits": [beam]}))

    assert report_main([str(tmp_path / "asr")]) == 0
    assert "| asr | valid | 12.50 | 4.00 | 10.00 | 3.25 |" in capsys.readouterr().out


def test_report_names_what_is_not_an_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.json").write_text("[]")

    assert report_main([str(tmp_path / "bad.json")]) == 1
    assert "bad.json is no evaluation record" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()

    assert report_main([str(tmp_path / "empty")]) == 1
    assert "empty holds no evaluation.json" in capsys.readouterr().err
