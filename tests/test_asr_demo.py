"""The ASR evidence job, shortened to a few steps on the bundled corpus: pretraining, both
fine-tunings (pretrained and random initialization) and their evaluation on the held-out
voices land in one table that agrees with each run's own evaluation files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.cli import REPO_ROOT

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

CHECKPOINT_FILE = "model/pp_00/tp_00/sdp_00.pt"


def test_asr_demo_reports_both_initializations_on_held_out_voices(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "recipes.wav2vec2_knnvq.asr_demo", "--output-dir", str(tmp_path),
        "--corpus-dir", str(MINISPEECH), "--pretrain-steps", "4", "--finetune-steps", "4",
    ]  # fmt: skip

    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    report = (tmp_path / "report.md").read_text()

    assert report.strip() in completed.stdout

    rows = dict(
        (match[0], [float(value) for value in match[1:]])
        for match in re.findall(r"^\| ([\w (),-]+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M)
    )

    assert set(rows) == {"pretrained (softmax-knn-ce)", "random initialization"}

    for name, run in (("pretrained (softmax-knn-ce)", "finetune_pretrained"), ("random initialization", "finetune_random_init")):  # fmt: skip
        test = json.loads((tmp_path / run / "eval/test.json").read_text())
        dev = json.loads((tmp_path / run / "eval/dev.json").read_text())

        assert rows[name] == [round(test["cer"], 1), round(test["wer"], 1), round(dev["cer"], 1), round(dev["wer"], 1)]

    # Four steps lie within the encoder's 100 frozen ones: the pretrained run still holds the
    # pretraining's encoder, the baseline its own random one of the same shapes.
    pretrained = torch.load(tmp_path / "pretrain/checkpoints/step_4" / CHECKPOINT_FILE, weights_only=True)

    runs = {
        run: torch.load(tmp_path / run / "checkpoints/step_4" / CHECKPOINT_FILE, weights_only=True)
        for run in ("finetune_pretrained", "finetune_random_init")
    }

    for key in ("encoder_frontend.feature_extractor.layers.1.conv.weight", "encoder.layers.0.ffn.inner_proj.weight"):
        assert torch.equal(runs["finetune_pretrained"][key], pretrained[key]), key

        assert runs["finetune_random_init"][key].shape == pretrained[key].shape
        assert not torch.equal(runs["finetune_random_init"][key], pretrained[key]), key
