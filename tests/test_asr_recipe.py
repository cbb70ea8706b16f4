"""CTC fine-tuning from a tiny pretrained checkpoint and evaluation, through their command lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from fairseq2.checkpoint import ModelMetadataDumper
from fairseq2.device import CPU
from fairseq2.gang import FakeGang, create_fake_gangs
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, create_wav2vec2_asr_model
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyResolver, get_dependency_resolver

from recipes.wav2vec2_knnvq.asr.eval import EvalError, read_finetune_run_settings, transcribe
from recipes.wav2vec2_knnvq.asr.pretrained import (
    PretrainedEncoderSection,
    check_audio_normalization,
    load_pretrained_encoder,
    resolve_pretrained_model,
    share_encoder_config,
)
from recipes.wav2vec2_knnvq.asr.recipe import _set_target_vocab_size
from recipes.wav2vec2_knnvq.asr.tokenizer import CtcTokenizerSection, prepare_ctc_tokenizer
from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.text import load_ctc_tokenizer, word_edits
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

TINY_CPU_CONFIG = REPO_ROOT / "recipes" / "wav2vec2_knnvq" / "asr" / "configs" / "tiny_cpu.yaml"

PRETRAINED_STEP = 2

NUM_STEPS = 40

FROZEN_NUM_STEPS = 2

NUM_TRAIN_UTTERANCES = 4

NUM_VALID_UTTERANCES = 16

CHECKPOINT_FILE = "model/pp_00/tp_00/sdp_00.pt"


def _env() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    return dict(os.environ, PYTHONPATH=python_path, FAIRSEQ2_EXTENSION_TRACE="1")


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=150)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    return result


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _validation_wers(finetune_dir: Path) -> dict[int, float]:
    valid = _read_jsonl(finetune_dir / "metrics/valid.jsonl")

    return {int(record["Step"]): float(record["Word Error Rate (WER)"]) for record in valid}  # type: ignore[arg-type, call-overload]


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
def pretrained_dir(resolver: DependencyResolver, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``wav2vec2_knnvq`` model saved in the pretraining recipe's output layout."""
    output_dir = tmp_path_factory.mktemp("pretrained")

    checkpoint_dir = output_dir / "checkpoints"

    config = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]()

    torch.manual_seed(0)

    model = create_wav2vec2_knnvq_model(config)

    resolver.resolve(ModelMetadataDumper).dump(checkpoint_dir, "wav2vec2_knnvq", config)

    model_file = checkpoint_dir / f"step_{PRETRAINED_STEP}" / CHECKPOINT_FILE

    model_file.parent.mkdir(parents=True)

    torch.save(model.state_dict(), model_file)

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

    _run(
        [
            sys.executable, "-m", "recipes.wav2vec2_knnvq.asr", "--no-rich",
            "--config-file", str(TINY_CPU_CONFIG), "--config", *overrides, "--", str(output_dir),
        ]  # fmt: skip
    )

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

    _run(
        [
            sys.executable, "-m", "recipes.wav2vec2_knnvq.asr", "--no-rich",
            "--config-file", str(TINY_CPU_CONFIG), "--config", *overrides, "--", str(output_dir),
        ]  # fmt: skip
    )

    return output_dir


def test_ctc_loss_falls(finetune_dir: Path) -> None:
    train = _read_jsonl(finetune_dir / "metrics/train.jsonl")

    assert [record["Step"] for record in train] == list(range(1, NUM_STEPS + 1))

    losses = [float(record["CTC Loss"]) for record in train]  # type: ignore[arg-type]

    assert losses[-1] < 0.7 * losses[0], losses


def test_validation_reports_error_rates_and_keeps_best_checkpoint(finetune_dir: Path) -> None:
    valid = _read_jsonl(finetune_dir / "metrics/valid.jsonl")

    assert [record["Step"] for record in valid] == [20, 40]

    for record in valid:
        assert record["Number of Examples"] == NUM_VALID_UTTERANCES

        assert 0.0 < float(record["Character Error Rate (CER)"]) <= float(record["Word Error Rate (WER)"])  # type: ignore[arg-type]

    wers = _validation_wers(finetune_dir)

    checkpoint_dir = finetune_dir / "checkpoints"

    # `keep_best_n_checkpoints: 1` with `keep_last_n_checkpoints: 1`: the last step and the best one.
    best_step = _best_step(finetune_dir)

    kept = sorted(int(p.name.removeprefix("step_")) for p in checkpoint_dir.glob("step_*"))

    assert kept == sorted({best_step, NUM_STEPS})

    score = float((checkpoint_dir / f"scores/step_{NUM_STEPS}.txt").read_text())

    assert score == pytest.approx(-wers[NUM_STEPS])


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


def test_eval_writes_transcripts_and_figures(finetune_dir: Path, manifest_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "eval"

    result = _run(
        [
            sys.executable, "-m", "recipes.wav2vec2_knnvq.asr.eval", str(finetune_dir),
            "--manifest-dir", str(manifest_dir), "--split", "valid", "--output-dir", str(output_dir), "--device", "cpu",
        ]  # fmt: skip
    )

    printed = json.loads(result.stdout.strip().splitlines()[-1])

    record = json.loads((output_dir / "valid.json").read_text())

    assert printed == record

    refs = (output_dir / "valid.ref.txt").read_text().splitlines()
    hyps = (output_dir / "valid.hyp.txt").read_text().splitlines()

    assert refs == (manifest_dir / "valid.wrd").read_text().splitlines()

    assert len(hyps) == NUM_VALID_UTTERANCES

    rows = [line.split("\t") for line in (output_dir / "valid.tsv").read_text().splitlines()]

    assert rows[0] == ["id", "ref", "hyp"]

    assert [row[1:] for row in rows[1:]] == [[ref, hyp] for ref, hyp in zip(refs, hyps)]

    assert rows[1][0] == "1013-10130-0000"

    errors = sum(word_edits(ref, hyp).errors for ref, hyp in zip(refs, hyps))
    num_words = sum(len(ref.split()) for ref in refs)

    assert record["wer"] == pytest.approx(100.0 * errors / num_words)
    assert record["word_edits"]["reference_length"] == num_words

    assert record["num_utterances"] == NUM_VALID_UTTERANCES

    assert record["normalize_audio"] is False

    # The best checkpoint by validation WER is evaluated by default.
    assert Path(record["checkpoint"]).parent.name == f"step_{_best_step(finetune_dir)}"


def test_pretrained_model_is_found_from_any_path_form(resolver: DependencyResolver, pretrained_dir: Path) -> None:
    step_dir = pretrained_dir / f"checkpoints/step_{PRETRAINED_STEP}"

    expected = str(step_dir / "model")

    for path in (pretrained_dir, pretrained_dir / "checkpoints", step_dir, step_dir / CHECKPOINT_FILE):
        pretrained = resolve_pretrained_model(resolver, PretrainedEncoderSection(path=path))

        assert pretrained.card.field("checkpoint").as_(str) == expected, path

        assert pretrained.encoder_config.model_dim == 64

    with pytest.raises(RecipeError, match="has no checkpoint of step 7.*steps \\[2\\]"):
        resolve_pretrained_model(resolver, PretrainedEncoderSection(path=pretrained_dir, step=7))

    with pytest.raises(RecipeError, match="is no pretraining output"):
        resolve_pretrained_model(resolver, PretrainedEncoderSection(path=pretrained_dir.parent))

    with pytest.raises(RecipeError, match="does not exist"):
        resolve_pretrained_model(resolver, PretrainedEncoderSection(path=pretrained_dir / "missing"))


def test_encoder_structure_is_shared_and_conflicts_are_refused(resolver: DependencyResolver, pretrained_dir: Path) -> None:
    pretrained = resolve_pretrained_model(resolver, PretrainedEncoderSection(path=pretrained_dir))

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

    with pytest.raises(RecipeError, match="ffn.inner_proj.weight \\(128, 64\\) vs. \\(96, 64\\)"):
        load_pretrained_encoder(model, state_dict, "tiny")


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


def test_relative_tokenizer_path_is_recorded_absolute(frozen_dir: Path, finetune_dir: Path) -> None:
    config = yaml.safe_load((frozen_dir / "config.yaml").read_text())

    expected = finetune_dir / "tokenizer/minispeech_char.yaml"

    assert config["tokenizer"]["path"] == str(expected)

    assert read_finetune_run_settings(frozen_dir / "checkpoints").tokenizer_path == expected


def _write_run_config(run_dir: Path, config: dict[str, object]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)

    (run_dir / "checkpoints").mkdir(exist_ok=True)

    config_file = run_dir / "config.yaml"

    config_file.write_text(yaml.safe_dump(config))

    return config_file


def test_eval_settings_come_from_the_run_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    _write_run_config(run_dir, {"tokenizer": {"path": None, "name": "abc"}, "dataset": {"normalize_audio": True}})

    settings = read_finetune_run_settings(run_dir / "checkpoints")

    assert settings.normalize_audio is True
    assert settings.tokenizer_path == run_dir / "tokenizer/abc.yaml"

    _write_run_config(run_dir, {"tokenizer": {"path": "tok/abc.yaml"}, "dataset": {"normalize_audio": False}})

    with pytest.raises(EvalError, match="relative path tok/abc.yaml.*--tokenizer"):
        read_finetune_run_settings(run_dir / "checkpoints")

    _write_run_config(run_dir, {"tokenizer": {"name": "abc"}, "dataset": {}})

    with pytest.raises(EvalError, match="no boolean `dataset.normalize_audio`"):
        read_finetune_run_settings(run_dir / "checkpoints")

    with pytest.raises(EvalError, match="does not exist.*audio normalization"):
        read_finetune_run_settings(tmp_path / "missing" / "checkpoints")


@pytest.mark.parametrize("normalize_audio", [True, False])
def test_eval_reads_audio_as_the_run_did(finetune_dir: Path, manifest_dir: Path, normalize_audio: bool) -> None:
    dataset = AsrManifestDataset(manifest_dir)

    read_options: list[AsrReadOptions] = []

    class RecordingDataset:
        def read_split(self, split: str) -> object:
            return dataset.read_split(split)

        def create_reader(self, split: str, tokenizer: object, gangs: object, options: AsrReadOptions) -> object:
            read_options.append(options)

            return dataset.create_reader(split, tokenizer, gangs, options)  # type: ignore[arg-type]

    tokenizer = load_ctc_tokenizer(finetune_dir / "tokenizer/minispeech_char.yaml")

    model = create_wav2vec2_asr_model(_tiny_asr_config(tokenizer.vocab_info.size))

    transcriptions = transcribe(
        model, tokenizer, RecordingDataset(), "train4", CPU, 400_000, normalize_audio=normalize_audio  # type: ignore[arg-type]
    )

    assert len(transcriptions) == NUM_TRAIN_UTTERANCES

    assert [options.normalize_audio for options in read_options] == [normalize_audio]

    # The options of the recipe's validation reader, so that the figures agree.
    assert read_options[0].min_audio_len == 1
    assert read_options[0].shuffle_window == 1


def _tiny_asr_config(vocab_size: int) -> Wav2Vec2AsrConfig:
    config = Wav2Vec2AsrConfig()

    config.encoder_config = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]().encoder_config
    config.target_vocab_size = vocab_size
    config.spatial_mask_span_len = 16

    return config


def _pretrained_copy_with_config(pretrained_dir: Path, destination: Path, normalize_audio: bool) -> Path:
    shutil.copytree(pretrained_dir, destination)

    (destination / "config.yaml").write_text(yaml.safe_dump({"dataset": {"normalize_audio": normalize_audio}}))

    return destination


def test_audio_normalization_must_match_pretraining(
    resolver: DependencyResolver, pretrained_dir: Path, tmp_path: Path
) -> None:
    finetune_config = tmp_path / "out/config.yaml"

    normalized_dir = _pretrained_copy_with_config(pretrained_dir, tmp_path / "normalized", True)

    pretrained = resolve_pretrained_model(resolver, PretrainedEncoderSection(path=normalized_dir))

    assert pretrained.pretraining_normalize_audio() is True

    check_audio_normalization(pretrained, True, finetune_config)

    with pytest.raises(
        RecipeError,
        match=(
            f"is false in the fine-tuning config \\({finetune_config}\\).*"
            f"`dataset.normalize_audio: true` \\({normalized_dir / 'config.yaml'}\\).*"
            "Set `dataset.normalize_audio=true`"
        ),
    ):
        check_audio_normalization(pretrained, False, finetune_config)

    raw_dir = _pretrained_copy_with_config(pretrained_dir, tmp_path / "raw", False)

    pretrained = resolve_pretrained_model(resolver, PretrainedEncoderSection(path=raw_dir))

    with pytest.raises(RecipeError, match="Set `dataset.normalize_audio=false`"):
        check_audio_normalization(pretrained, True, finetune_config)

    # Without the pretraining run's config.yaml there is nothing to compare with.
    pretrained = resolve_pretrained_model(resolver, PretrainedEncoderSection(path=pretrained_dir))

    assert pretrained.pretraining_normalize_audio() is None

    check_audio_normalization(pretrained, True, finetune_config)


class _RankGang(FakeGang):
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

    with pytest.raises(RecipeError, match="No transcript text.*reported by rank 0 to rank 1"):
        prepare_ctc_tokenizer(section, empty_transcripts, tmp_path, replace(create_fake_gangs(CPU), root=rank_1))
