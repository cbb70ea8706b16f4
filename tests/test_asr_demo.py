"""The ASR evidence job, shortened to a few steps on the bundled corpus: pretraining, both
fine-tunings (pretrained and random initialization) and their evaluation on the held-out
voices land in one table that agrees with each run's own evaluation files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.cli import REPO_ROOT, run_recipe_command

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

CHECKPOINT_FILE = "model/pp_00/tp_00/sdp_00.pt"


@pytest.mark.e2e
def test_asr_demo_reports_both_initializations_on_held_out_voices(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "recipes.studies.asr_demo", "--output-dir", str(tmp_path),
        "--corpus-dir", str(MINISPEECH), "--pretrain-steps", "4", "--finetune-steps", "4",
    ]  # fmt: skip

    completed = run_recipe_command(command)

    report = (tmp_path / "report.md").read_text()

    assert report.strip() in completed.stdout

    rows = dict(
        (match[0], [float(value) for value in match[1].split(" | ")])
        for match in re.findall(r"^\| ([\w (),-]+?) \| ([\d. |]+) \|$", report, re.M)
    )

    assert set(rows) == {"pretrained (softmax-knn-ce)", "random initialization"}

    # The bundled corpus has no language-model text: the trigram is of its training transcripts.
    lm_text = (MINISPEECH / "train").rglob("*.trans.txt")

    train_words = {word for file in lm_text for line in file.read_text().splitlines() for word in line.split()[1:]}

    for name, run in (("pretrained (softmax-knn-ce)", "finetune_pretrained"), ("random initialization", "finetune_random_init")):  # fmt: skip
        records = json.loads((tmp_path / run / "eval/evaluation.json").read_text())["splits"]

        splits = [next(record for record in records if record["split"] == split) for split in ("test", "dev")]

        expected = [
            round(value, 1)
            for record in splits
            for value in (record["cer"], record["wer"], record["beam_search"]["cer"], record["beam_search"]["wer"])
        ]

        assert rows[name] == expected

        assert splits[0]["beam_search"]["lm"] == str(tmp_path / "lm/lm.arpa")

        lexicon = (tmp_path / run / "lexicon.txt").read_text().splitlines()

        assert {line.split("\t")[0] for line in lexicon} == train_words

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


def test_language_model_comes_from_the_corpus_text_when_there_is_one(tmp_path: Path) -> None:
    from recipes.studies.asr_demo import write_language_model

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/lm_text.txt").write_text("IN THE BEGINNING\n\nTHE WORD WAS\n")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests/train.wrd").write_text("OTHER WORDS\n")

    lm_file, lines = write_language_model(tmp_path / "corpus", tmp_path / "manifests", tmp_path / "lm")

    assert lines == ["IN THE BEGINNING", "THE WORD WAS"]

    # IN THE BEGINNING WORD WAS, </s>, <s> and <unk>.
    assert "ngram 1=8\n" in lm_file.read_text()

    # Without one, the training transcripts.
    _, lines = write_language_model(tmp_path / "manifests", tmp_path / "manifests", tmp_path / "lm2")

    assert lines == ["OTHER WORDS"]
