"""End-to-end tests of the wav2vec 2.0 pretraining recipe through its command line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch

from fairseq2.datasets import DatasetError
from fairseq2.device import CPU
from fairseq2.gang import FakeGang, Gangs, create_fake_gangs
from fairseq2.nn import BatchLayout

from tests.cli import recipe_command, run_recipe_command
from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.data.manifest_dataset import read_examples
from w2v_knnvq.data.speech_dataset import SpeechManifestDataset, SpeechReadOptions
from w2v_knnvq.quantizer import CodebookUsage
from w2v_knnvq.runs import check_checkpoint_files
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

TINY_CPU_CONFIG = REPO_ROOT / "recipes" / "wav2vec2_knnvq" / "ssl" / "configs" / "tiny_cpu.yaml"

MAX_AUDIO_LEN = 32_000

ARCH = "tiny_2x320"

METHOD = "softmax-knn-ce"


def _write_synthetic_split(audio_dir: Path, manifest_file: Path, lengths: list[int], seed: int) -> None:
    """Writes tone-plus-noise utterances of the given lengths and their manifest."""
    rng = np.random.default_rng(seed)

    lines = [str(audio_dir)]

    for idx, length in enumerate(lengths):
        t = np.arange(length) / 16_000
        pitch = rng.uniform(100, 300)
        wave = 0.3 * np.sin(2 * np.pi * pitch * t * (1 + 0.2 * np.sin(2 * np.pi * t)))
        wave += 0.05 * rng.standard_normal(length)

        relative = f"{manifest_file.stem}/utt{idx}.flac"

        (audio_dir / relative).parent.mkdir(parents=True, exist_ok=True)

        soundfile.write(audio_dir / relative, wave.astype(np.float32), 16_000, subtype="PCM_16")

        lines.append(f"{relative}\t{length}")

    manifest_file.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.tsv`` and ``valid.tsv`` of the bundled mini corpus (synthetic audio if absent)."""
    output_dir = tmp_path_factory.mktemp("manifests")

    if MINISPEECH.is_dir():
        for split, name in (("train", "train"), ("dev", "valid")):
            make_manifest(
                ManifestConfig(
                    corpus_dir=MINISPEECH,
                    splits=[split],
                    output_dir=output_dir,
                    name=name,
                    show_progress=False,
                )
            )
    else:
        audio_dir = tmp_path_factory.mktemp("audio")

        # One training utterance is longer than `max_audio_len`: it must be cropped, not dropped.
        _write_synthetic_split(audio_dir, output_dir / "train.tsv", [40_000, 36_000, 20_000, 70_000], seed=0)
        _write_synthetic_split(audio_dir, output_dir / "valid.tsv", [30_000, 45_000, 24_000], seed=1)

    return output_dir


def _run_recipe(
    output_dir: Path, manifest_dir: Path, num_steps: int, *extra_overrides: str
) -> subprocess.CompletedProcess[str]:
    overrides = [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"model.arch={ARCH}",
        f"model.config_overrides.quantizer.method={METHOD}",
        "dataset.min_audio_len=16000",
        f"dataset.max_audio_len={MAX_AUDIO_LEN}",
        f"dataset.max_num_elements={2 * MAX_AUDIO_LEN}",
        f"regime.num_steps={num_steps}",
        "regime.validate_every_n_steps=2",
        "regime.checkpoint_every_n_steps=2",
        "regime.publish_metrics_every_n_steps=2",
        "regime.keep_last_n_checkpoints=null",
        "lr_scheduler.config.num_warmup_steps=1",
        *extra_overrides,
    ]

    return run_recipe_command(
        recipe_command("recipes.wav2vec2_knnvq.ssl", output_dir, overrides, config_file=TINY_CPU_CONFIG)
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(manifest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run of 4 steps with a checkpoint and a validation every 2 steps."""
    output_dir = tmp_path_factory.mktemp("run")

    result = _run_recipe(output_dir, manifest_dir, num_steps=4)

    return output_dir, result.stdout + result.stderr


@pytest.mark.e2e
def test_run_writes_checkpoints_and_usage_metrics(trained_run: tuple[Path, str]) -> None:
    output_dir, _ = trained_run

    for step in (2, 4):
        assert (output_dir / f"checkpoints/step_{step}/model/pp_00/tp_00/sdp_00.pt").is_file()

    valid = _read_jsonl(output_dir / "metrics/valid.jsonl")

    assert [record["Step"] for record in valid] == [2, 4]

    num_codebooks = 2

    for record in valid:
        usage = record["Codebook Usage"]
        utterance_usage = record["Mean Utterance Codebook Usage"]

        assert isinstance(usage, list) and len(usage) == num_codebooks
        assert isinstance(utterance_usage, list) and len(utterance_usage) == num_codebooks

        for split_value, utterance_value in zip(usage, utterance_usage, strict=True):
            # A split uses at least as many entries as its average utterance.
            assert 0.0 < utterance_value <= split_value <= 1.0

        for name in ("Loss", "Contrastive Loss", "Quantizer Loss", "Accuracy", "Temperature"):
            assert math.isfinite(float(record[name])), name

        assert len(record["Hard Perplexity"]) == num_codebooks
        assert len(record["Soft Perplexity"]) == num_codebooks

        # fairseq's names: the per-codebook figures summed over codebooks.
        assert record["Code Perplexity"] == pytest.approx(sum(record["Hard Perplexity"]), rel=1e-5)
        assert record["Prob Perplexity"] == pytest.approx(sum(record["Soft Perplexity"]), rel=1e-5)

        # Between a onehot (1) and a uniform (320 entries) quantizer.
        assert all(1.0 <= value <= 320.0 for value in record["Mean Individual Perplexity"])

    train = _read_jsonl(output_dir / "metrics/train.jsonl")

    assert [record["Step"] for record in train] == [2, 4]

    for record in train:
        batch_usage = record["Batch Codebook Usage"]

        # A batch of a few utterances cannot use more entries than it has masked frames.
        assert len(batch_usage) == num_codebooks
        assert all(0.0 < value <= 1.0 for value in batch_usage)
        assert len(record["Hard Perplexity"]) == num_codebooks

    assert list((output_dir / "tb").glob("valid/events.out.tfevents.*"))


@pytest.mark.e2e
def test_interrupted_run_resumes_from_its_last_checkpoint(
    trained_run: tuple[Path, str], manifest_dir: Path, tmp_path: Path
) -> None:
    first_output_dir, _ = trained_run

    # A copy, so that the other tests keep reading a 4-step run.
    output_dir = tmp_path / "run"

    shutil.copytree(first_output_dir, output_dir)

    # A run killed between its step-2 and step-4 checkpoints leaves only step 2 behind.
    shutil.rmtree(output_dir / "checkpoints/step_4")

    result = _run_recipe(output_dir, manifest_dir, num_steps=6)

    log = result.stdout + result.stderr

    assert "Restoring training from the last checkpoint at step 2." in log

    train_steps = [record["Step"] for record in _read_jsonl(output_dir / "metrics/train.jsonl")]

    # Steps 1-2 are not trained again: the rerun goes on from step 3 to the end.
    assert train_steps == [2, 4, 4, 6]

    for step in (2, 4, 6):
        assert (output_dir / f"checkpoints/step_{step}").is_dir()


@pytest.mark.e2e
def test_validation_usage_matches_independent_count(trained_run: tuple[Path, str], manifest_dir: Path) -> None:
    output_dir, _ = trained_run

    config = WAV2VEC2_KNNVQ_ARCHS[ARCH]()
    config.quantizer.method = METHOD

    model = create_wav2vec2_knnvq_model(config)

    state_dict = torch.load(
        output_dir / "checkpoints/step_4/model/pp_00/tp_00/sdp_00.pt", map_location="cpu", weights_only=True
    )

    model.load_state_dict(state_dict)

    model.eval()

    quantizer_config = model.quantizer.config

    usage = CodebookUsage(quantizer_config.num_codebooks, quantizer_config.codebook_size)

    perplexity_sum = torch.zeros(quantizer_config.num_codebooks, dtype=torch.float64)
    num_frames = 0

    lines = (manifest_dir / "valid.tsv").read_text().splitlines()

    audio_dir = Path(lines[0])

    with torch.inference_mode():
        for line in lines[1:]:
            relative_path, _ = line.split("\t")

            waveform, _ = soundfile.read(audio_dir / relative_path, dtype="float32")

            # Every utterance of the split, whole: no length filter, no crop.
            seqs = torch.from_numpy(waveform).unsqueeze(0)

            features, _, _ = model.encoder_frontend.extract_features(seqs, BatchLayout.of(seqs))

            output = model.quantizer(features, return_probs=True)

            usage.update(output.codes)

            # exp(-sum_m p_m log p_m) per frame, written out from the probabilities.
            probs = output.log_probs.exp().double()
            perplexity_sum += torch.exp(-(probs * probs.clamp_min(1e-300).log()).sum(-1)).sum(dim=(0, 1))
            num_frames += probs.size(1)

    report = usage.compute()

    step_4 = _read_jsonl(output_dir / "metrics/valid.jsonl")[-1]

    assert step_4["Step"] == 4

    assert step_4["Codebook Usage"] == pytest.approx(report.usage.tolist(), abs=1e-9)

    assert step_4["Mean Utterance Codebook Usage"] == pytest.approx(
        report.per_sample_usage.double().mean(dim=0).tolist(), abs=1e-6
    )

    assert step_4["Mean Individual Perplexity"] == pytest.approx((perplexity_sum / num_frames).tolist(), rel=1e-4)


def test_reader_crops_long_utterances_instead_of_dropping(manifest_dir: Path) -> None:
    dataset = SpeechManifestDataset(manifest_dir)

    split = dataset.read_split("train")

    max_audio_len = min(entry.num_samples for entry in split.entries) + 1_000

    assert any(entry.num_samples > max_audio_len for entry in split.entries)

    options = SpeechReadOptions(
        min_audio_len=1,
        max_audio_len=max_audio_len,
        max_num_elements=4 * max_audio_len,
        shuffle_window=1,
        crop="start",
        crop_to_batch_shortest=False,
    )

    reader = dataset.create_reader("train", create_fake_gangs(CPU), options)

    seen_paths = []

    for batches in reader:
        for batch in batches:
            assert batch.seqs.dtype == torch.float32
            assert batch.seqs.size(1) <= max_audio_len
            assert batch.num_elements <= 4 * max_audio_len

            seen_paths.extend(batch.example["paths"])

    assert sorted(seen_paths) == sorted(entry.path for entry in split.entries)


def test_readers_shard_utterances_across_data_parallel_ranks(manifest_dir: Path) -> None:
    split = SpeechManifestDataset(manifest_dir).read_split("train")

    examples = [{"path": entry.path} for entry in split.entries]

    options = SpeechReadOptions(min_audio_len=1, max_audio_len=48_000, max_num_elements=192_000, seed=3)

    paths_per_rank = []

    for rank in range(2):
        data_parallel = FakeGang(CPU, rank=rank, size=2)
        single = FakeGang(CPU)

        gangs = Gangs(root=data_parallel, dp=data_parallel, rdp=data_parallel, sdp=single, tp=single, pp=single)

        pipeline = read_examples(examples, gangs, options).and_return()

        paths_per_rank.append([example["path"] for example in pipeline])

    # Each rank reads its own half of the (shuffled) split; together they read all of it once.
    assert abs(len(paths_per_rank[0]) - len(paths_per_rank[1])) <= 1
    assert not set(paths_per_rank[0]) & set(paths_per_rank[1])
    assert sorted(paths_per_rank[0] + paths_per_rank[1]) == sorted(entry.path for entry in split.entries)


def test_missing_manifest_and_empty_split_name_the_file(manifest_dir: Path, tmp_path: Path) -> None:
    dataset = SpeechManifestDataset(manifest_dir)

    with pytest.raises(DatasetError, match=r"nosuchsplit.tsv"):
        dataset.read_split("nosuchsplit")

    empty = tmp_path / "empty.tsv"
    empty.write_text(f"{tmp_path}\n")

    with pytest.raises(DatasetError, match=r"empty.tsv.*no utterances"):
        SpeechManifestDataset(tmp_path).read_split("empty")


@pytest.mark.e2e
def test_invalid_mask_settings_stop_the_run_before_it_starts(manifest_dir: Path, tmp_path: Path) -> None:
    """Mask settings that fairseq2's masker would reject mid-run are a configuration error
    naming the setting."""
    overrides = [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"model.arch={ARCH}",
        "model.config_overrides.max_temporal_mask_prob=0.0",
        "regime.num_steps=2",
        "lr_scheduler.config.num_warmup_steps=1",
    ]

    command = recipe_command("recipes.wav2vec2_knnvq.ssl", tmp_path / "run", overrides, config_file=TINY_CPU_CONFIG)

    result = run_recipe_command(command, expected_returncode=2)

    output = result.stdout + result.stderr

    expected = "`max_temporal_mask_prob` must be greater than 0 and at most 1, but is 0.0 instead."

    assert expected in output, output[-3000:]
    assert "unexpected error" not in output.lower(), output[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stock_wav2vec2_adapter_reports_per_codebook_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """fairseq2's Gumbel wav2vec 2.0 runs through the same criterion as a baseline."""
    # The Gumbel quantizer compiles a matmul on first use, which takes long on a CPU.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)

    from fairseq2.datasets import SequenceBatch
    from fairseq2.metrics import MetricBag
    from fairseq2.models.wav2vec2 import Wav2Vec2Config, create_wav2vec2_model

    from recipes.wav2vec2_knnvq.ssl.criterion import (
        GumbelWav2Vec2Adapter,
        SslCriterion,
        SslLossSection,
        adapt_pretraining_model,
    )
    from recipes.wav2vec2_knnvq.ssl.metrics import (
        BATCH_CODEBOOK_USAGE,
        HARD_PERPLEXITY,
        PROB_PERPLEXITY,
        ElementwiseMean,
        add_ssl_metrics,
    )
    from w2v_knnvq.quantizer import code_counts, code_perplexity
    from w2v_knnvq.wav2vec2.frames import quantize_frames, run_cnn

    encoder_config = WAV2VEC2_KNNVQ_ARCHS[ARCH]().encoder_config

    torch.manual_seed(0)
    model = create_wav2vec2_model(
        Wav2Vec2Config(encoder_config=encoder_config, quantized_dim=32, num_codebooks=2, num_codebook_entries=16)
    )

    adapter = adapt_pretraining_model(model)
    assert isinstance(adapter, GumbelWav2Vec2Adapter)
    assert (adapter.codebook_shape.num_codebooks, adapter.codebook_shape.codebook_size) == (2, 16)

    batch = SequenceBatch(torch.randn(2, 24_000), None)

    metric_bag = MetricBag(device=CPU)
    add_ssl_metrics(metric_bag, 2)

    torch.manual_seed(1)
    loss, num_targets = SslCriterion(model, adapter, SslLossSection())(batch, metric_bag)

    assert torch.isfinite(loss) and num_targets > 0

    # The Gumbel quantizer's one-hot samples, recomputed with the same seed, give the figures per codebook.
    torch.manual_seed(1)
    _, output = model(*batch.as_input())
    codes = output.quantizer_output.cb.view(-1, 2, 16).argmax(dim=-1)
    counts = code_counts(codes.unsqueeze(0), 16)[0]

    assert torch.allclose(metric_bag.get(HARD_PERPLEXITY, ElementwiseMean).compute().float(), code_perplexity(counts))
    assert torch.allclose(
        metric_bag.get(BATCH_CODEBOOK_USAGE, ElementwiseMean).compute(), (counts > 0).double().mean(dim=-1)
    )

    # fairseq2's own summed prob perplexity is logged as such.
    logged = metric_bag.get(PROB_PERPLEXITY, ElementwiseMean).compute()
    assert logged.item() == pytest.approx(output.quantizer_output.prob_perplexity.item(), rel=1e-5)

    # Validation codes of whole utterances: the argmax of the quantizer's logits at every real frame.
    model.eval()
    frames = quantize_frames(model, run_cnn(model, batch.seqs, [24_000, 16_000]))
    assert frames.individual_perplexity is None
    assert frames.codes.shape[-1] == 2 and (frames.codes[1, frames.padding_mask[1]] >= 0).all()
    assert (frames.codes[1, ~frames.padding_mask[1]] == -1).all()


@pytest.mark.e2e
def test_chunked_quantizer_trains_and_validates_as_the_dense_one(
    trained_run: tuple[Path, str], manifest_dir: Path, tmp_path: Path
) -> None:
    """The same run with `quantizer.chunk_size`: no (N, G, M) tensor, the same figures."""
    dense_dir, _ = trained_run

    _run_recipe(tmp_path, manifest_dir, 2, "model.config_overrides.quantizer.chunk_size=40")

    dense = _read_jsonl(dense_dir / "metrics/valid.jsonl")[0]
    chunked = _read_jsonl(tmp_path / "metrics/valid.jsonl")[0]

    assert dense["Step"] == chunked["Step"] == 2

    for name in ("Loss", "Quantizer Loss", "Accuracy"):
        assert chunked[name] == pytest.approx(dense[name], rel=1e-3), name

    for name in ("Codebook Usage", "Mean Individual Perplexity"):
        assert chunked[name] == pytest.approx(dense[name], rel=1e-3), name


def _evaluation_command(
    run_dir: Path, manifest_dir: Path, eval_dir: Path, splits: str, num_processes: int = 1
) -> list[str]:
    overrides = [f"run.run_dir={run_dir}", f"dataset.config_overrides.manifest_dir={manifest_dir}", f"dataset.splits={splits}"]  # fmt: skip

    return recipe_command("recipes.wav2vec2_knnvq.ssl.eval", eval_dir, overrides, num_processes=num_processes)


def _split_records(eval_dir: Path) -> dict[str, dict[str, Any]]:
    document = json.loads((eval_dir / "evaluation.json").read_text())

    return {record["split"]: record for record in document["splits"]}


@pytest.mark.e2e
def test_evaluation_of_a_checkpoint_on_any_split(
    trained_run: tuple[Path, str], manifest_dir: Path, tmp_path: Path
) -> None:
    """The evaluation recipe reproduces the run's own validation usage at the same checkpoint, and
    adds Table 2's percentiles and Figure 2's histograms, on any split; on two processes every
    figure counted over the split is the one of one process."""
    output_dir, _ = trained_run

    run_recipe_command(_evaluation_command(output_dir, manifest_dir, tmp_path / "one", "[valid,train]"), timeout=300)

    validation = _read_jsonl(output_dir / "metrics/valid.jsonl")[-1]

    document = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    assert document["checkpoint"].endswith("step_4/model") and document["step"] == 4
    assert Path(document["run_dir"]) == output_dir.resolve()

    records = _split_records(tmp_path / "one")
    assert list(records) == ["valid", "train"]

    record = records["valid"]
    assert record["method"] == METHOD
    assert record["codebook_usage"] == pytest.approx(validation["Codebook Usage"])
    assert record["mean_utterance_codebook_usage"] == pytest.approx(validation["Mean Utterance Codebook Usage"])
    # The loss draws masks and distractors at random: a figure of its own, not the run's.
    assert math.isfinite(record["loss"]) and 0.0 <= record["accuracy"] <= 1.0

    # (G, 4): 75th, 90th, 99th percentile and maximum, in [1, M].
    percentiles = record["perplexity_percentiles"]
    assert len(percentiles) == 2 and all(1.0 <= p[0] <= p[1] <= p[2] <= p[3] <= 320.0 for p in percentiles)

    for split in ("valid", "train"):
        assert (tmp_path / "one" / split / "per_utterance_usage.png").stat().st_size > 0
        assert (tmp_path / "one" / split / "code_popularity.png").stat().st_size > 0

    summary = (tmp_path / "one" / "summary.md").read_text()
    assert f"| {METHOD} | 2 |" in summary and "Codebook 2 (train)" in summary

    # Two processes: each reads half of every split; the counts are gathered before they are reported.
    run_recipe_command(_evaluation_command(output_dir, manifest_dir, tmp_path / "two", "[valid,train]", 2), timeout=300)

    two = _split_records(tmp_path / "two")

    for split in ("valid", "train"):
        for name in ("num_utterances", "codebook_usage", "mean_utterance_codebook_usage", "perplexity_percentiles"):
            np.testing.assert_allclose(two[split][name], records[split][name], rtol=1e-5, err_msg=f"{split}: {name}")

    assert (tmp_path / "two" / "summary.md").read_text() == summary

    missing = run_recipe_command(
        _evaluation_command(tmp_path / "nothing", manifest_dir, tmp_path / "missing", "[valid]"), expected_returncode=2
    )
    assert "does not exist" in missing.stdout + missing.stderr


@pytest.mark.e2e
def test_evaluation_of_a_single_split_writes_its_figures_beside_its_record(
    trained_run: tuple[Path, str], manifest_dir: Path, tmp_path: Path
) -> None:
    """One split: the histograms lie in the output directory itself; a bad checkpoint name is
    a configuration error naming the option."""
    output_dir, _ = trained_run

    command = _evaluation_command(output_dir, manifest_dir, tmp_path, "[valid]")

    run_recipe_command([*command[:-2], "run.checkpoint=2", *command[-2:]], timeout=300)

    assert json.loads((tmp_path / "evaluation.json").read_text())["step"] == 2
    assert (tmp_path / "per_utterance_usage.png").stat().st_size > 0

    refused = run_recipe_command([*command[:-2], "run.checkpoint=first", *command[-2:]], expected_returncode=2)
    assert "`checkpoint` must be 'best', 'last' or a step number" in refused.stdout + refused.stderr


def _assert_evaluation_matches_validation(
    output_dir: Path, manifest_dir: Path, eval_dir: Path, validation: dict[str, Any]
) -> None:
    """A one-process evaluation of the run's last checkpoint gives the usage its validation logged."""
    run_recipe_command(_evaluation_command(output_dir, manifest_dir, eval_dir, "[valid]"), timeout=300)

    record = _split_records(eval_dir)["valid"]

    assert record["codebook_usage"] == pytest.approx(validation["Codebook Usage"])
    assert record["mean_utterance_codebook_usage"] == pytest.approx(validation["Mean Utterance Codebook Usage"])


@pytest.mark.e2e
def test_two_processes_validate_as_one_and_resume_only_with_two(manifest_dir: Path, tmp_path: Path) -> None:
    """``torchrun`` with two processes (gloo): validation covers every utterance once, and its
    usage (a union over the ranks) equals a one-process evaluation of the same checkpoint. A
    restart with another process count stops with what to do instead."""
    output_dir = tmp_path / "ddp"

    overrides = [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"model.arch={ARCH}",
        "dataset.min_audio_len=16000",
        f"dataset.max_audio_len={MAX_AUDIO_LEN}",
        f"dataset.max_num_elements={2 * MAX_AUDIO_LEN}",
        "regime.num_steps=4",
        "regime.validate_every_n_steps=4",
        "regime.checkpoint_every_n_steps=4",
        "regime.publish_metrics_every_n_steps=2",
        "lr_scheduler.config.num_warmup_steps=1",
    ]

    def command(num_processes: int) -> list[str]:
        return recipe_command(
            "recipes.wav2vec2_knnvq.ssl",
            output_dir,
            overrides,
            config_file=TINY_CPU_CONFIG,
            num_processes=num_processes,
        )

    run_recipe_command(command(2))

    assert sorted(path.name for path in (output_dir / "checkpoints/step_4/trainer").iterdir()) == ["rank_00.pt", "rank_01.pt"]  # fmt: skip

    (validation,) = _read_jsonl(output_dir / "metrics/valid.jsonl")

    assert validation["Number of Examples"] == len(SpeechManifestDataset(manifest_dir).read_split("valid").entries)

    _assert_evaluation_matches_validation(output_dir, manifest_dir, tmp_path / "eval", validation)

    overrides[overrides.index("regime.num_steps=4")] = "regime.num_steps=6"

    restart = run_recipe_command(command(1), expected_returncode=2)

    assert "was written by 2 processes, but this run has 1" in restart.stdout + restart.stderr
    assert "model.path=" in restart.stdout + restart.stderr


@pytest.mark.e2e
def test_fsdp_with_activation_checkpointing_saves_a_checkpoint_the_tools_load(
    manifest_dir: Path, tmp_path: Path
) -> None:
    """FSDP (version 2, each Transformer layer sharded over two gloo processes) with
    layerwise activation checkpointing: the sharded checkpoint loads whole outside the
    recipe, and evaluating it reproduces the run's own validation usage."""
    output_dir = tmp_path / "fsdp"

    overrides = [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"model.arch={ARCH}",
        "dataset.min_audio_len=16000",
        f"dataset.max_audio_len={MAX_AUDIO_LEN}",
        f"dataset.max_num_elements={2 * MAX_AUDIO_LEN}",
        "regime.num_steps=4",
        "regime.validate_every_n_steps=4",
        "regime.checkpoint_every_n_steps=4",
        "regime.publish_metrics_every_n_steps=2",
        "lr_scheduler.config.num_warmup_steps=1",
        "trainer.data_parallelism=fsdp",
        "trainer.activation_checkpointing.mode=layerwise",
    ]

    command = recipe_command("recipes.wav2vec2_knnvq.ssl", output_dir, overrides, config_file=TINY_CPU_CONFIG, num_processes=2)  # fmt: skip

    run_recipe_command(command)

    shards = sorted(path.name for path in (output_dir / "checkpoints/step_4/model/pp_00/tp_00").iterdir())

    assert shards == ["sdp_00.pt", "sdp_01.pt"]

    # Every state that FSDP saves passes the check before a resume.
    check_checkpoint_files(output_dir / "checkpoints/step_4")

    (validation,) = _read_jsonl(output_dir / "metrics/valid.jsonl")

    _assert_evaluation_matches_validation(output_dir, manifest_dir, tmp_path / "eval", validation)


@pytest.mark.e2e
def test_compiled_model_trains_as_the_eager_one(
    trained_run: tuple[Path, str], manifest_dir: Path, tmp_path: Path
) -> None:
    """``model.compile=true`` compiles the Transformer layers; ``aot_eager`` traces them as
    inductor does without generating code, so that the check stays quick on the CPU."""
    eager_dir, _ = trained_run

    _run_recipe(tmp_path, manifest_dir, 4, "model.compile=true", "model.compile_options.backend=aot_eager")

    eager = {record["Step"]: record for record in _read_jsonl(eager_dir / "metrics/train.jsonl")}
    compiled = {record["Step"]: record for record in _read_jsonl(tmp_path / "metrics/train.jsonl")}

    assert sorted(compiled) == sorted(eager) == [2, 4]

    for step in (2, 4):
        assert compiled[step]["Loss"] == pytest.approx(eager[step]["Loss"], rel=1e-4)
