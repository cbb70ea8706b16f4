"""CTC fine-tuning from a tiny pretrained checkpoint and evaluation, through their command lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import soundfile
import torch
import yaml

from fairseq2.assets import AssetCard
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import DataReader, Seq2SeqBatch, SyncMode
from fairseq2.device import CPU
from fairseq2.gang import FakeGang, Gangs, create_fake_gangs
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, create_wav2vec2_asr_model
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyResolver, get_dependency_resolver
from fairseq2.utils.validation import ObjectValidator, ValidationError

from recipes.common import EvaluatedRunSection
from recipes.wav2vec2_knnvq.asr.dataset import batch_utterance_ids
from recipes.wav2vec2_knnvq.asr.eval.config import AsrEvalDatasetSection
from recipes.wav2vec2_knnvq.asr.eval.finetune_run import (
    find_finetuned_checkpoint,
    run_normalize_audio,
    run_tokenizer_path,
)
from recipes.wav2vec2_knnvq.asr.eval.recipe import create_eval_reader
from recipes.wav2vec2_knnvq.asr.pretrained import (
    PretrainedEncoderSection,
    check_audio_normalization,
    load_pretrained_encoder,
    resolve_pretrained_encoder,
    share_encoder_config,
)
from recipes.wav2vec2_knnvq.asr.recipe import _set_target_vocab_size
from recipes.wav2vec2_knnvq.asr.tokenizer import CtcTokenizerSection, prepare_ctc_tokenizer
from tests.cli import recipe_command, run_recipe_command
from tests.runs import write_knnvq_run
from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.runs import RunCheckpoint, find_run_checkpoint
from w2v_knnvq.text import load_ctc_tokenizer, word_edits, write_arpa
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS
from w2v_knnvq.wav2vec2.lengths import RECEPTIVE_FIELD

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

TINY_CPU_CONFIG = REPO_ROOT / "recipes" / "wav2vec2_knnvq" / "asr" / "configs" / "tiny_cpu.yaml"

PRETRAINED_STEP = 2

NUM_STEPS = 40

FROZEN_NUM_STEPS = 2

NUM_TRAIN_UTTERANCES = 4

NUM_VALID_UTTERANCES = 16

CHECKPOINT_FILE = "model/pp_00/tp_00/sdp_00.pt"

CPU_ENV = {"FAIRSEQ2_DEVICE": "cpu"}
"""The evaluations run on the CPU, as the fine-tuning runs do, wherever CUDA is."""


def _finetune(output_dir: Path, overrides: list[str]) -> None:
    """Runs the fine-tuning recipe's tiny preset through its command line."""
    run_recipe_command(recipe_command("recipes.wav2vec2_knnvq.asr", output_dir, overrides, config_file=TINY_CPU_CONFIG))


def _run_eval(
    finetune_dir: Path,
    manifest_dir: Path,
    output_dir: Path,
    *overrides: str,
    expected_returncode: int = 0,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Evaluates on the `valid` split through the evaluation's command line, on the CPU.

    :param extra_args: Options before ``--config``, e.g. the beam search's.
    """
    return run_recipe_command(
        [
            sys.executable,
            "-m",
            "recipes.wav2vec2_knnvq.asr.eval",
            "--no-rich",
            *extra_args,
            "--config",
            f"run.run_dir={finetune_dir}",
            f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.splits=[valid]",
            *overrides,
            "--",
            str(output_dir),
        ],
        env=CPU_ENV,
        expected_returncode=expected_returncode,
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _validation_wers(finetune_dir: Path) -> dict[int, float]:
    valid = _read_jsonl(finetune_dir / "metrics/valid.jsonl")

    return {int(record["Step"]): float(record["Word Error Rate (WER)"]) for record in valid}


def _best_step(finetune_dir: Path) -> int:
    """The step of the lowest validation WER; the later one of a tie, as fairseq2 keeps it."""
    wers = _validation_wers(finetune_dir)

    return min(wers, key=lambda step: (wers[step], -step))


@pytest.fixture(scope="module")
def resolver() -> DependencyResolver:
    os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")

    return get_dependency_resolver()


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train4`` (the first utterances of the training split) and ``valid`` (the dev split)."""
    output_dir = tmp_path_factory.mktemp("manifests")

    for split, name in (("train", "train"), ("dev", "valid")):
        make_manifest(
            ManifestConfig(corpus_dir=MINISPEECH, splits=[split], output_dir=output_dir, name=name, show_progress=False)
        )

    tsv_lines = (output_dir / "train.tsv").read_text().splitlines()
    wrd_lines = (output_dir / "train.wrd").read_text().splitlines()

    (output_dir / "train4.tsv").write_text("\n".join(tsv_lines[: NUM_TRAIN_UTTERANCES + 1]) + "\n")
    (output_dir / "train4.wrd").write_text("\n".join(wrd_lines[:NUM_TRAIN_UTTERANCES]) + "\n")

    return output_dir


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``wav2vec2_knnvq`` model saved in the pretraining recipe's output layout."""
    output_dir = tmp_path_factory.mktemp("pretrained")

    write_knnvq_run(output_dir, "tiny_2x320", steps=(PRETRAINED_STEP,))

    return output_dir


@pytest.fixture(scope="module")
def finetune_dir(manifest_dir: Path, pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 steps on 4 utterances; the encoder is frozen for the first 10, validation every 20."""
    output_dir = tmp_path_factory.mktemp("finetune")

    overrides = [
        f"pretrained_encoder.path={pretrained_dir}",
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        "dataset.train_split=train4",
        "dataset.valid_split=valid",
        f"regime.num_steps={NUM_STEPS}",
        "regime.validate_every_n_steps=20",
        "regime.checkpoint_every_n_steps=20",
        "regime.publish_metrics_every_n_steps=1",
        "finetune.freeze_encoder_steps=10",
        "optimizer.config.lr=0.002",
    ]

    _finetune(output_dir, overrides)

    return output_dir


@pytest.fixture(scope="module")
def frozen_dir(
    finetune_dir: Path, manifest_dir: Path, pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """2 steps inside the frozen phase, with the first run's tokenizer given by a path
    relative to the directory the recipe starts in."""
    output_dir = tmp_path_factory.mktemp("frozen")

    tokenizer_path = os.path.relpath(finetune_dir / "tokenizer/minispeech_char.yaml", REPO_ROOT)

    overrides = [
        f"pretrained_encoder.path={pretrained_dir}",
        f"tokenizer.path={tokenizer_path}",
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        "dataset.train_split=train4",
        "dataset.valid_split=null",
        f"regime.num_steps={FROZEN_NUM_STEPS}",
        f"regime.validate_every_n_steps={FROZEN_NUM_STEPS}",
        f"regime.checkpoint_every_n_steps={FROZEN_NUM_STEPS}",
        "regime.publish_metrics_every_n_steps=1",
        f"finetune.freeze_encoder_steps={FROZEN_NUM_STEPS}",
        "optimizer.config.lr=0.002",
    ]

    _finetune(output_dir, overrides)

    return output_dir


@pytest.mark.e2e
def test_ctc_loss_falls(finetune_dir: Path) -> None:
    train = _read_jsonl(finetune_dir / "metrics/train.jsonl")

    assert [record["Step"] for record in train] == list(range(1, NUM_STEPS + 1))

    losses = [float(record["CTC Loss"]) for record in train]

    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.e2e
def test_validation_reports_error_rates_and_keeps_best_checkpoint(finetune_dir: Path) -> None:
    valid = _read_jsonl(finetune_dir / "metrics/valid.jsonl")

    assert [record["Step"] for record in valid] == [20, 40]

    for record in valid:
        assert record["Number of Examples"] == NUM_VALID_UTTERANCES

        assert 0.0 < float(record["Character Error Rate (CER)"]) <= float(record["Word Error Rate (WER)"])

    wers = _validation_wers(finetune_dir)

    checkpoint_dir = finetune_dir / "checkpoints"

    # `keep_best_n_checkpoints: 1` with `keep_last_n_checkpoints: 1`: the last step and the best one.
    best_step = _best_step(finetune_dir)

    kept = sorted(int(p.name.removeprefix("step_")) for p in checkpoint_dir.glob("step_*"))

    assert kept == sorted({best_step, NUM_STEPS})

    score = float((checkpoint_dir / f"scores/step_{NUM_STEPS}.txt").read_text())

    assert score == pytest.approx(-wers[NUM_STEPS])


@pytest.mark.e2e
def test_encoder_comes_from_pretrained_model_and_cnn_stays_frozen(finetune_dir: Path, pretrained_dir: Path) -> None:
    pretrained = torch.load(
        pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    finetuned = torch.load(
        finetune_dir / f"checkpoints/step_{NUM_STEPS}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    cnn_keys = [key for key in pretrained if key.startswith("encoder_frontend.feature_extractor.")]

    assert cnn_keys

    for key in cnn_keys:
        assert torch.equal(finetuned[key], pretrained[key]), key

    # The Transformer trained after its 10 frozen steps.
    key = "encoder.layers.0.ffn.inner_proj.weight"

    assert finetuned[key].shape == pretrained[key].shape

    assert not torch.equal(finetuned[key], pretrained[key])

    tokenizer = load_ctc_tokenizer(finetune_dir / "tokenizer/minispeech_char.yaml")

    assert finetuned["final_proj.weight"].shape == (tokenizer.vocab_info.size, 64)


@pytest.mark.e2e
def test_eval_writes_transcripts_and_figures(finetune_dir: Path, manifest_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "eval"

    # Two splits in one evaluation, each with its record, transcripts and table.
    result = _run_eval(finetune_dir, manifest_dir, output_dir, "dataset.splits=[valid,train4]")

    printed = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]

    # The evaluations' common layout: the run, the step and a record per split; the tables.
    document = json.loads((output_dir / "evaluation.json").read_text())

    assert [record["split"] for record in document["splits"]] == ["valid", "train4"]
    assert document["splits"] == printed and Path(document["run_dir"]) == finetune_dir.resolve()

    record, train_record = document["splits"]

    assert document["checkpoint"] == record["checkpoint"] and document["step"] == _best_step(finetune_dir)
    assert train_record["num_utterances"] == NUM_TRAIN_UTTERANCES
    assert len((output_dir / "train4.tsv").read_text().splitlines()) == NUM_TRAIN_UTTERANCES + 1

    summary = (output_dir / "summary.md").read_text()

    for split_record in document["splits"]:
        assert f"## {split_record['split']}" in summary
        assert f"| greedy | {split_record['wer']:.2f} | {split_record['cer']:.2f} |" in summary

    refs = (output_dir / "valid.ref.txt").read_text().splitlines()
    hyps = (output_dir / "valid.hyp.txt").read_text().splitlines()

    assert refs == (manifest_dir / "valid.wrd").read_text().splitlines()

    assert len(hyps) == NUM_VALID_UTTERANCES

    rows = [line.split("\t") for line in (output_dir / "valid.tsv").read_text().splitlines()]

    assert rows[0] == ["id", "ref", "hyp"]

    assert [row[1:] for row in rows[1:]] == [[ref, hyp] for ref, hyp in zip(refs, hyps, strict=True)]

    assert rows[1][0] == "1013-10130-0000"

    errors = sum(word_edits(ref, hyp).errors for ref, hyp in zip(refs, hyps, strict=True))
    num_words = sum(len(ref.split()) for ref in refs)

    assert record["wer"] == pytest.approx(100.0 * errors / num_words)
    assert record["word_edits"]["reference_length"] == num_words

    assert record["num_utterances"] == NUM_VALID_UTTERANCES

    assert record["normalize_audio"] is False

    # The best checkpoint by validation WER is evaluated by default.
    best_step = _best_step(finetune_dir)

    assert Path(record["checkpoint"]).parent.name == f"step_{best_step}"

    # The recipe's validation unit scored the split: fairseq2 recorded the same figures,
    # which agree with the validation of that step during fine-tuning.
    [metrics] = _read_jsonl(output_dir / "metrics/eval/valid.jsonl")

    assert float(metrics["Word Error Rate (WER)"]) == pytest.approx(record["wer"])
    assert float(metrics["Character Error Rate (CER)"]) == pytest.approx(record["cer"])

    assert record["wer"] == pytest.approx(_validation_wers(finetune_dir)[best_step])


@pytest.mark.e2e
def test_eval_decodes_with_a_lexicon_of_the_training_words(
    finetune_dir: Path, manifest_dir: Path, tmp_path: Path
) -> None:
    """``--beam-search`` without a lexicon builds one from the run's training transcripts;
    greedy decoding is scored as without beam search, the beam search next to it."""
    output_dir = tmp_path / "eval"

    result = _run_eval(finetune_dir, manifest_dir, output_dir, extra_args=("--beam-search", "--beam-size", "8"))

    (record,) = json.loads((output_dir / "evaluation.json").read_text())["splits"]

    lexicon_words = [line.split("\t")[0] for line in (output_dir / "lexicon.txt").read_text().splitlines()]

    train_words = list(dict.fromkeys((manifest_dir / "train4.wrd").read_text().split()))

    assert lexicon_words == train_words

    beam = record["beam_search"]

    assert beam["lexicon"] == str(output_dir / "lexicon.txt")
    assert beam["lm"] is None
    assert beam["beam_size"] == 8

    rows = [line.split("\t") for line in (output_dir / "valid.tsv").read_text().splitlines()]

    assert rows[0] == ["id", "ref", "hyp", "beam_hyp"]

    refs = [row[1] for row in rows[1:]]
    beam_hyps = [row[3] for row in rows[1:]]

    assert beam_hyps == (output_dir / "valid.beam.hyp.txt").read_text().splitlines()

    assert all(word in lexicon_words for hyp in beam_hyps for word in hyp.split())

    errors = sum(word_edits(ref, hyp).errors for ref, hyp in zip(refs, beam_hyps, strict=True))

    assert beam["wer"] == pytest.approx(100.0 * errors / sum(len(ref.split()) for ref in refs))

    # Greedy decoding is scored as the run's validation scored it.
    assert record["wer"] == pytest.approx(_validation_wers(finetune_dir)[_best_step(finetune_dir)])

    assert "| beam search |" in result.stderr + result.stdout


@pytest.mark.e2e
def test_eval_names_the_saved_steps_of_a_missing_checkpoint(
    finetune_dir: Path, manifest_dir: Path, tmp_path: Path
) -> None:
    result = _run_eval(finetune_dir, manifest_dir, tmp_path / "eval", "run.checkpoint=7", expected_returncode=2)

    steps = sorted({_best_step(finetune_dir), NUM_STEPS})

    saved = f"{finetune_dir / 'checkpoints'} ({steps})"

    assert f"`run.checkpoint` must be one of the steps saved in {saved}" in result.stderr
    assert "but is 7 instead" in result.stderr

    assert not (tmp_path / "eval/evaluation.json").exists()


@pytest.mark.e2e
def test_eval_never_writes_over_its_manifest_or_outside_its_output_dir(
    finetune_dir: Path, manifest_dir: Path, tmp_path: Path
) -> None:
    """With the manifest directory as output directory, the transcription table would
    replace ``valid.tsv``; a split name with ``..`` would write outside the output directory."""
    inputs = tmp_path / "manifests"

    shutil.copytree(manifest_dir, inputs)

    manifest = (inputs / "valid.tsv").read_bytes()

    result = _run_eval(finetune_dir, inputs, inputs, expected_returncode=2)

    assert "must not be the manifest directory" in result.stderr
    assert (inputs / "valid.tsv").read_bytes() == manifest
    assert not (inputs / "evaluation.json").exists()

    (inputs / "sub").mkdir()

    result = _run_eval(
        finetune_dir, inputs / "sub", tmp_path / "eval", "dataset.splits=[../valid]", expected_returncode=2
    )

    assert "`splits` must be the name of a manifest in the manifest directory (no `/`, no `..`), but is '../valid' instead." in result.stderr  # fmt: skip
    assert not (tmp_path / "evaluation.json").exists()


@pytest.mark.e2e
def test_finetuned_checkpoint_is_chosen_by_name_or_step(finetune_dir: Path, pretrained_dir: Path) -> None:
    best_step = _best_step(finetune_dir)

    for checkpoint, step in (("best", best_step), ("last", NUM_STEPS), (NUM_STEPS, NUM_STEPS)):
        run = find_finetuned_checkpoint(EvaluatedRunSection(run_dir=finetune_dir, checkpoint=checkpoint))

        assert run.step == step, checkpoint

    with pytest.raises(RecipeError, match=r"must hold a `wav2vec2_asr` model, but .* describes a `wav2vec2_knnvq`"):
        find_finetuned_checkpoint(EvaluatedRunSection(run_dir=pretrained_dir, checkpoint="last"))


def test_the_evaluated_run_is_validated(resolver: DependencyResolver) -> None:
    """The ``run`` section of every evaluation recipe: a run directory and a checkpoint."""
    validator = resolver.resolve(ObjectValidator)

    validator.validate(EvaluatedRunSection(run_dir=Path("run"), checkpoint=20))

    with pytest.raises(ValidationError, match="`checkpoint` must be 'best', 'last' or a step number, but is 'first'"):
        validator.validate(EvaluatedRunSection(run_dir=Path("run"), checkpoint="first"))

    with pytest.raises(ValidationError, match="`checkpoint` must be a step number of at least 1, but is 0"):
        validator.validate(EvaluatedRunSection(run_dir=Path("run"), checkpoint=0))

    with pytest.raises(
        ValidationError, match="`run_dir` must be the output directory of a training run, but is not set"
    ):
        validator.validate(EvaluatedRunSection())


def test_pretrained_model_is_found_from_any_path_form(resolver: DependencyResolver, pretrained_dir: Path) -> None:
    step_dir = pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}"

    expected = str(step_dir / "model")

    for path in (pretrained_dir, pretrained_dir / "checkpoints", step_dir, step_dir / CHECKPOINT_FILE):
        pretrained = resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=path))

        assert pretrained.card.field("checkpoint").as_(str) == f"file://{expected}", path

        assert pretrained.source == expected

        assert pretrained.encoder_config.model_dim == 64

    with pytest.raises(
        RecipeError, match=r"`pretrained_encoder.step` must be one of the steps saved in .*\(\[2\]\), but is 7"
    ):
        resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=pretrained_dir, step=7))

    with pytest.raises(RecipeError, match="is no training output"):
        resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=pretrained_dir.parent))

    with pytest.raises(RecipeError, match="does not exist"):
        resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=pretrained_dir / "missing"))


def test_pretrained_model_needs_the_model_yaml_of_its_run(
    resolver: DependencyResolver, pretrained_dir: Path, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(pretrained_dir, tmp_path / "pretrained")

    (run_dir / "checkpoints/model.yaml").unlink()

    # The model section of config.yaml does not stand in for it.
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "wav2vec2_knnvq", "arch": "tiny_2x320"}}))

    with pytest.raises(RecipeError, match=r"model.yaml: does not exist.*keep the run's `checkpoints` directory"):
        resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=run_dir))


def test_encoder_structure_is_shared_and_conflicts_are_refused(
    resolver: DependencyResolver, pretrained_dir: Path
) -> None:
    pretrained = resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=pretrained_dir))

    overrides: dict[str, object] = {"encoder_config": {"layer_drop_p": 0.3}}

    share_encoder_config(resolver, pretrained, overrides)

    encoder_overrides = overrides["encoder_config"]

    assert isinstance(encoder_overrides, dict)

    # Structure from the pretrained model, fine-tuning regularization kept.
    assert encoder_overrides["model_dim"] == 64
    assert encoder_overrides["num_encoder_layers"] == 2
    assert encoder_overrides["layer_drop_p"] == 0.3
    assert "dropout_p" not in encoder_overrides

    with pytest.raises(RecipeError, match="model_dim: 768 here, 64 pretrained"):
        share_encoder_config(resolver, pretrained, {"encoder_config": {"model_dim": 768}})


def test_mismatched_encoder_is_refused(pretrained_dir: Path) -> None:
    state_dict = torch.load(
        pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    config = Wav2Vec2AsrConfig()

    config.encoder_config = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]().encoder_config
    config.encoder_config.ffn_inner_dim = 96

    model = create_wav2vec2_asr_model(config)

    with pytest.raises(RecipeError, match=r"ffn.inner_proj.weight \(128, 64\) vs. \(96, 64\)"):
        load_pretrained_encoder(model, state_dict, "tiny")


@pytest.mark.e2e
def test_explicit_vocab_size_must_match_tokenizer(finetune_dir: Path) -> None:
    tokenizer_path = finetune_dir / "tokenizer/minispeech_char.yaml"

    tokenizer = load_ctc_tokenizer(tokenizer_path)

    size = tokenizer.vocab_info.size

    overrides: dict[str, object] = {}

    _set_target_vocab_size(overrides, tokenizer, tokenizer_path)

    assert overrides == {"target_vocab_size": size}

    _set_target_vocab_size({"target_vocab_size": size}, tokenizer, tokenizer_path)

    with pytest.raises(RecipeError, match=f"predicts {size + 3} classes.*vocabulary of {size}"):
        _set_target_vocab_size({"target_vocab_size": size + 3}, tokenizer, tokenizer_path)


@pytest.mark.e2e
def test_encoder_stays_frozen_for_the_first_steps(frozen_dir: Path, pretrained_dir: Path) -> None:
    pretrained = torch.load(
        pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    finetuned = torch.load(
        frozen_dir / f"checkpoints/step_{FROZEN_NUM_STEPS}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    transformer_keys = [key for key in pretrained if key.startswith("encoder.")]

    assert len(transformer_keys) > 10

    for key in transformer_keys:
        assert torch.equal(finetuned[key], pretrained[key]), key

    # The frozen steps did train: the CTC loss was logged for each of them.
    train = _read_jsonl(frozen_dir / "metrics/train.jsonl")

    assert [record["Step"] for record in train] == list(range(1, FROZEN_NUM_STEPS + 1))


@pytest.mark.e2e
def test_relative_tokenizer_path_is_recorded_absolute(frozen_dir: Path, finetune_dir: Path) -> None:
    config = yaml.safe_load((frozen_dir / "config.yaml").read_text())

    expected = finetune_dir / "tokenizer/minispeech_char.yaml"

    assert config["tokenizer"]["path"] == str(expected)

    assert run_tokenizer_path(find_run_checkpoint(frozen_dir)) == expected


def _write_run_config(run_dir: Path, config: dict[str, object]) -> RunCheckpoint:
    """A checkpoint of ``run_dir`` whose ``config.yaml`` holds ``config``."""
    run_dir.mkdir(parents=True, exist_ok=True)

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    return _run_checkpoint(run_dir)


def _run_checkpoint(run_dir: Path) -> RunCheckpoint:
    return RunCheckpoint(card=AssetCard("checkpoint_step_1", {}), checkpoints_dir=run_dir / "checkpoints", step=1)


def test_eval_settings_come_from_the_run_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    run = _write_run_config(run_dir, {"tokenizer": {"path": None, "name": "abc"}, "dataset": {"normalize_audio": True}})

    assert run_normalize_audio(run) is True
    assert run_tokenizer_path(run) == run_dir / "tokenizer/abc.yaml"

    run = _write_run_config(run_dir, {"tokenizer": {"path": "tok/abc.yaml"}, "dataset": {"normalize_audio": False}})

    assert run_normalize_audio(run) is False

    with pytest.raises(RecipeError, match=r"relative path tok/abc.yaml.*set `tokenizer.path` of the evaluation"):
        run_tokenizer_path(run)

    run = _write_run_config(run_dir, {"tokenizer": {"name": "abc"}, "dataset": {}})

    with pytest.raises(RecipeError, match=r"`dataset.normalize_audio` in .*config.yaml must be a boolean, but is None"):
        run_normalize_audio(run)

    for read_setting in (run_normalize_audio, run_tokenizer_path):
        with pytest.raises(RecipeError, match=r"does not exist.*audio normalization"):
            read_setting(_run_checkpoint(tmp_path / "missing"))


@pytest.mark.parametrize("normalize_audio", [True, False])
@pytest.mark.e2e
def test_eval_reads_audio_as_the_run_did(finetune_dir: Path, manifest_dir: Path, normalize_audio: bool) -> None:
    dataset = AsrManifestDataset(manifest_dir)

    read_options: list[AsrReadOptions] = []

    class RecordingDataset:
        def read_split(self, split: str) -> object:
            return dataset.read_split(split)

        def create_reader(
            self, split: str, tokenizer: Tokenizer, gangs: Gangs, options: AsrReadOptions
        ) -> DataReader[Seq2SeqBatch]:
            read_options.append(options)

            return dataset.create_reader(split, tokenizer, gangs, options)

    tokenizer = load_ctc_tokenizer(finetune_dir / "tokenizer/minispeech_char.yaml")

    section = AsrEvalDatasetSection(splits=["train4"], max_num_elements=400_000)

    gangs = create_fake_gangs(CPU)

    # Duck-typed: records the options the evaluation reads with.
    recording = cast(AsrManifestDataset, RecordingDataset())

    reader = create_eval_reader(recording, section, "train4", tokenizer, gangs, normalize_audio=normalize_audio, seed=2)

    ids = [utterance_id for batches in reader for batch in batches for utterance_id in batch_utterance_ids(batch)]

    assert len(ids) == NUM_TRAIN_UTTERANCES

    assert [options.normalize_audio for options in read_options] == [normalize_audio]

    # The options of the recipe's validation reader, so that the figures agree.
    [options] = read_options

    assert options.min_audio_len == RECEPTIVE_FIELD
    assert options.shuffle_window == options.batch_shuffle_window == 1
    assert options.sync_mode == SyncMode.UNTIL_LAST
    assert options.max_num_batches is None


def _pretrained_copy_with_config(pretrained_dir: Path, destination: Path, normalize_audio: bool) -> Path:
    shutil.copytree(pretrained_dir, destination)

    (destination / "config.yaml").write_text(yaml.safe_dump({"dataset": {"normalize_audio": normalize_audio}}))

    return destination


def test_audio_normalization_must_match_pretraining(
    resolver: DependencyResolver, pretrained_dir: Path, tmp_path: Path
) -> None:
    finetune_config = tmp_path / "out/config.yaml"

    normalized_dir = _pretrained_copy_with_config(pretrained_dir, tmp_path / "normalized", True)

    pretrained = resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=normalized_dir))

    assert pretrained.run is not None
    assert pretrained.run.normalize_audio is True

    check_audio_normalization(pretrained, True, finetune_config)

    with pytest.raises(
        RecipeError,
        match=(
            f"must be true as in the pretraining of .* \\({normalized_dir / 'config.yaml'}\\), "
            f"but is false instead in the fine-tuning config \\({finetune_config}\\).*"
            "Set `dataset.normalize_audio=true`"
        ),
    ):
        check_audio_normalization(pretrained, False, finetune_config)

    raw_dir = _pretrained_copy_with_config(pretrained_dir, tmp_path / "raw", False)

    pretrained = resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=raw_dir))

    with pytest.raises(RecipeError, match=r"Set `dataset.normalize_audio=false`"):
        check_audio_normalization(pretrained, True, finetune_config)

    # Without the pretraining run's config.yaml there is nothing to compare with.
    pretrained = resolve_pretrained_encoder(resolver, PretrainedEncoderSection(path=pretrained_dir))

    assert pretrained.run is not None
    assert pretrained.run.normalize_audio is None

    check_audio_normalization(pretrained, True, finetune_config)


class _RankGang(FakeGang):  # type: ignore[misc]  # a test double of one rank
    """A rank of a larger gang whose broadcasts deliver ``rank_0_objects``."""

    def __init__(self, rank: int, rank_0_objects: list[object] | None = None) -> None:
        super().__init__(CPU, rank=rank, size=2)

        self.rank_0_objects = rank_0_objects

        self.broadcasts: list[list[object]] = []

    def broadcast_objects(self, objects: list[object], source_rank: int = 0) -> None:
        assert source_rank == 0

        if self.rank_0_objects is not None:
            objects[:] = self.rank_0_objects

        self.broadcasts.append(list(objects))


def test_tokenizer_training_failure_reaches_every_rank(tmp_path: Path) -> None:
    empty_transcripts = tmp_path / "train.wrd"

    empty_transcripts.write_text("\n")

    section = CtcTokenizerSection(name="chars")

    rank_0 = _RankGang(0)

    with pytest.raises(RecipeError, match=f"cannot be trained from {empty_transcripts}: No transcript text"):
        prepare_ctc_tokenizer(section, empty_transcripts, tmp_path, replace(create_fake_gangs(CPU), root=rank_0))

    # Rank 0 told the others before raising.
    [[message]] = rank_0.broadcasts

    assert isinstance(message, str) and "No transcript text" in message

    rank_1 = _RankGang(1, rank_0_objects=[message])

    with pytest.raises(RecipeError, match=r"No transcript text.*reported by rank 0 to rank 1"):
        prepare_ctc_tokenizer(section, empty_transcripts, tmp_path, replace(create_fake_gangs(CPU), root=rank_1))


def _write_equal_length_split(manifest_dir: Path, output_dir: Path, name: str, num_samples: int) -> int:
    """Writes split ``name``: the ``valid`` utterances of at least ``num_samples`` samples,
    cut to that length, with their transcripts. Equal lengths leave no padding in any
    batch, so that the group-norm CNN gives every utterance the same output however the
    utterances are batched or spread over processes.

    :returns: The number of utterances.
    """
    audio_root, *rows = (manifest_dir / "valid.tsv").read_text().splitlines()
    transcripts = (manifest_dir / "valid.wrd").read_text().splitlines()

    audio_dir = output_dir / "audio"

    lines, kept = [str(audio_dir)], []

    for row, transcript in zip(rows, transcripts, strict=True):
        relative, length = row.split("\t")

        if int(length) < num_samples:
            continue

        waveform, sample_rate = soundfile.read(Path(audio_root) / relative, dtype="float32")

        (audio_dir / relative).parent.mkdir(parents=True, exist_ok=True)

        soundfile.write(audio_dir / relative, waveform[:num_samples], sample_rate, subtype="PCM_16")

        lines.append(f"{relative}\t{num_samples}")

        kept.append(transcript)

    output_dir.mkdir(parents=True, exist_ok=True)

    (output_dir / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    (output_dir / f"{name}.wrd").write_text("\n".join(kept) + "\n")

    for suffix in ("tsv", "wrd"):
        shutil.copy(manifest_dir / f"train4.{suffix}", output_dir / f"train4.{suffix}")

    return len(kept)


@pytest.mark.e2e
def test_two_processes_fine_tune_and_evaluate_as_one(manifest_dir: Path, pretrained_dir: Path, tmp_path: Path) -> None:
    """``torchrun`` with two processes (gloo): the run's validation figures are those of a
    one-process evaluation of its checkpoint, and a two-process evaluation gives the same
    transcripts in the same order."""
    ddp_manifest_dir = tmp_path / "manifests"

    num_valid = _write_equal_length_split(manifest_dir, ddp_manifest_dir, "valid_equal", 24_000)

    assert num_valid >= 8

    run_dir = tmp_path / "ddp"

    overrides = [
        f"pretrained_encoder.path={pretrained_dir}",
        f"dataset.config_overrides.manifest_dir={ddp_manifest_dir}",
        "dataset.train_split=train4",
        "dataset.valid_split=valid_equal",
        "regime.num_steps=4",
        "regime.validate_every_n_steps=4",
        "regime.checkpoint_every_n_steps=4",
        "regime.publish_metrics_every_n_steps=2",
        "finetune.freeze_encoder_steps=2",
        "optimizer.config.lr=0.002",
    ]

    command = recipe_command(
        "recipes.wav2vec2_knnvq.asr", run_dir, overrides, config_file=TINY_CPU_CONFIG, num_processes=2
    )

    run_recipe_command(command)

    (validation,) = _read_jsonl(run_dir / "metrics/valid.jsonl")

    assert validation["Number of Examples"] == num_valid

    records = {}

    for num_processes in (1, 2):
        eval_overrides = [
            f"run.run_dir={run_dir}",
            f"dataset.config_overrides.manifest_dir={ddp_manifest_dir}",
            "dataset.splits=[valid_equal]",
        ]

        eval_dir = tmp_path / f"eval{num_processes}"

        eval_command = recipe_command("recipes.wav2vec2_knnvq.asr.eval", eval_dir, eval_overrides, num_processes=num_processes)  # fmt: skip

        run_recipe_command(eval_command)

        (records[num_processes],) = json.loads((eval_dir / "evaluation.json").read_text())["splits"]

        (metrics,) = _read_jsonl(eval_dir / "metrics/eval/valid_equal.jsonl")

        assert metrics["CTC Loss"] == pytest.approx(validation["CTC Loss"], rel=1e-5)

    one, two = records[1], records[2]

    assert one["num_utterances"] == two["num_utterances"] == num_valid

    assert one["wer"] == pytest.approx(validation["Word Error Rate (WER)"])
    assert one["cer"] == pytest.approx(validation["Character Error Rate (CER)"])

    assert (two["wer"], two["cer"]) == (one["wer"], one["cer"])

    assert (tmp_path / "eval2/valid_equal.tsv").read_text() == (tmp_path / "eval1/valid_equal.tsv").read_text()


@pytest.mark.e2e
def test_finetuning_transcribes_its_own_training_utterances(
    manifest_dir: Path, pretrained_dir: Path, tmp_path: Path
) -> None:
    """An overfitting check on real decoding: fine-tuned on four utterances, the model must
    transcribe them almost exactly. A broken encoder transfer, label mapping or decoder
    fails it, where a falling loss alone would not."""
    run_dir = tmp_path / "overfit"

    _finetune(
        run_dir,
        [
            f"pretrained_encoder.path={pretrained_dir}",
            f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.train_split=train4",
            "dataset.valid_split=train4",
            "regime.num_steps=200",
            "regime.validate_every_n_steps=200",
            "regime.checkpoint_every_n_steps=200",
            "finetune.freeze_encoder_steps=0",
            "finetune.freeze_feature_extractor=false",
            "optimizer.config.lr=0.003",
        ],
    )

    refs = (manifest_dir / "train4.wrd").read_text().splitlines()

    # Also decoded with a bigram of the four transcripts and the lexicon of their words,
    # which the evaluation builds from the run's training split.
    lm = write_arpa(refs, tmp_path / "train4.arpa", order=2)

    run_recipe_command(
        [
            sys.executable, "-m", "recipes.wav2vec2_knnvq.asr.eval", "--no-rich", "--lm", str(lm), "--config",
            f"run.run_dir={run_dir}", f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.splits=[train4]", "--", str(tmp_path / "eval"),
        ],
        env=CPU_ENV,
    )  # fmt: skip

    (record,) = json.loads((tmp_path / "eval/evaluation.json").read_text())["splits"]

    assert record["num_utterances"] == NUM_TRAIN_UTTERANCES
    assert record["cer"] < 10.0, record
    assert record["wer"] < 30.0, record

    hyps = (tmp_path / "eval/train4.hyp.txt").read_text().splitlines()

    assert sum(hyp == ref for hyp, ref in zip(hyps, refs, strict=True)) >= 2, hyps

    # The language model repairs what greedy decoding misspells.
    beam = record["beam_search"]

    assert beam["lm"] == str(lm)
    assert beam["wer"] <= record["wer"], record
    assert beam["wer"] < 10.0, record

    beam_hyps = (tmp_path / "eval/train4.beam.hyp.txt").read_text().splitlines()

    assert sum(hyp == ref for hyp, ref in zip(beam_hyps, refs, strict=True)) >= 3, beam_hyps


@pytest.mark.e2e
def test_random_initialization_baseline_takes_only_the_encoder_structure(
    manifest_dir: Path, pretrained_dir: Path, tmp_path: Path
) -> None:
    """``pretrained_encoder.load_weights=false``: the same architecture, none of its weights
    (the CNN stays frozen, so its weights after two steps are the initial ones)."""
    run_dir = tmp_path / "random"

    _finetune(
        run_dir,
        [
            f"pretrained_encoder.path={pretrained_dir}",
            "pretrained_encoder.load_weights=false",
            f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.train_split=train4",
            "dataset.valid_split=null",
            "regime.num_steps=2",
            "regime.validate_every_n_steps=2",
            "regime.checkpoint_every_n_steps=2",
            "regime.publish_metrics_every_n_steps=2",
            "finetune.freeze_encoder_steps=2",
        ],
    )

    pretrained = torch.load(
        pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )

    finetuned = torch.load(run_dir / "checkpoints/step_2" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)

    for key in ("encoder_frontend.feature_extractor.layers.0.conv.weight", "encoder.layers.0.ffn.inner_proj.weight"):
        assert finetuned[key].shape == pretrained[key].shape
        assert not torch.equal(finetuned[key], pretrained[key]), key
