"""Settings that cannot work are configuration errors named before a run starts, and audio
too short for the model is measured as fairseq2's CNN and masker measure it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairseq2.models.wav2vec2 import Wav2Vec2EncoderConfig
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, create_wav2vec2_asr_model
from fairseq2.nn.utils.mask import compute_row_mask
from fairseq2.recipe.error import RecipeError

from recipes.common import training_min_audio_len
from tests.cli import recipe_command, run_recipe_command
from tests.test_ssl_recipe import ARCH, TINY_CPU_CONFIG
from w2v_knnvq.quantizer import QuantizerConfig
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, create_wav2vec2_knnvq_model
from w2v_knnvq.wav2vec2.lengths import (
    RECEPTIVE_FIELD,
    config_conv_shapes,
    min_masked_frames,
    min_num_samples,
    model_conv_shapes,
    model_min_num_samples,
    num_frames,
)


@pytest.mark.parametrize(("span_len", "max_prob", "min_spans"), [(10, 0.65, 2), (10, 0.69, 2), (3, 0.5, 1), (1, 0.05, 0), (64, 0.3, 1)])  # fmt: skip
def test_min_masked_frames_is_where_fairseq2s_masker_starts_to_work(
    span_len: int, max_prob: float, min_spans: int
) -> None:
    frames = min_masked_frames(span_len, max_prob, min_spans)

    def mask(num_frames: int) -> None:
        compute_row_mask((1, num_frames), span_len, max_prob, row_lens=torch.tensor([num_frames]), min_num_spans=min_spans)  # fmt: skip

    mask(frames)

    with pytest.raises(ValueError, match="span"):
        mask(frames - 1)


def test_frames_and_samples_invert_each_other() -> None:
    shapes = config_conv_shapes(Wav2Vec2EncoderConfig())

    assert RECEPTIVE_FIELD == 400
    assert num_frames(399, shapes) == 0 and num_frames(400, shapes) == 1

    # 20 ms frames with a 25 ms window: 16,000 samples give 49 frames.
    assert num_frames(16_000, shapes) == 49

    for frames in (1, 2, 30, 49, 500):
        samples = min_num_samples(shapes, frames)

        assert num_frames(samples, shapes) == frames
        assert num_frames(samples - 1, shapes) == frames - 1


def test_the_model_says_what_it_needs() -> None:
    model = create_wav2vec2_knnvq_model(WAV2VEC2_KNNVQ_ARCHS[ARCH]())

    shapes = model_conv_shapes(model)

    assert shapes == config_conv_shapes(WAV2VEC2_KNNVQ_ARCHS[ARCH]().encoder_config)

    # Spans of 10 frames, masking probability 0.69, 2 spans at least: 30 frames.
    assert model_min_num_samples(model, masked=True) == min_num_samples(shapes, 30) == 9_680
    assert model_min_num_samples(model, masked=False) == 400


def test_asr_training_takes_its_least_audio_length_from_the_mask_settings() -> None:
    config = Wav2Vec2AsrConfig(
        encoder_config=WAV2VEC2_KNNVQ_ARCHS[ARCH]().encoder_config, target_vocab_size=8, max_temporal_mask_prob=0.65
    )

    model = create_wav2vec2_asr_model(config)

    # 0.65 / 10 * 31 = 2.015 spans: 32 frames.
    assert training_min_audio_len(None, model) == min_num_samples(model_conv_shapes(model), 32) == 10_320
    assert training_min_audio_len(20_000, model) == 20_000

    with pytest.raises(RecipeError, match=r"`dataset.min_audio_len` must be at least 10320, .* but is 5000 instead"):
        training_min_audio_len(5_000, model)

    config.use_masking = False

    assert training_min_audio_len(None, create_wav2vec2_asr_model(config)) == RECEPTIVE_FIELD


def test_quantizer_settings_are_reported_as_the_model_configs_errors() -> None:
    config = WAV2VEC2_KNNVQ_ARCHS[ARCH]()

    config.quantizer = QuantizerConfig(method="bogus", knn_k=0, num_codebooks=0)

    errors = str(config.validate())

    assert "`quantizer.method` must be one of ste-euclid, " in errors and "but is 'bogus' instead." in errors
    assert "`quantizer.knn_k` must be at least 1, but is 0 instead." in errors
    assert "`quantizer.num_codebooks` must be at least 1, but is 0 instead." in errors


def _run_ssl(tmp_path: Path, *overrides: str) -> str:
    command = recipe_command(
        "recipes.wav2vec2_knnvq.ssl",
        tmp_path / "run",
        [
            f"dataset.config_overrides.manifest_dir={tmp_path}",
            f"model.arch={ARCH}",
            "regime.num_steps=2",
            "lr_scheduler.config.num_warmup_steps=1",
            *overrides,
        ],
        config_file=TINY_CPU_CONFIG,
    )

    result = run_recipe_command(command, expected_returncode=2)

    output = result.stdout + result.stderr

    assert "unexpected error" not in output.lower(), output[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))

    return output


@pytest.mark.e2e
def test_unknown_method_and_zero_sizes_are_configuration_errors(tmp_path: Path) -> None:
    """Not "an unexpected error ... file a bug report": each setting named, in one line."""
    output = _run_ssl(
        tmp_path,
        "model.config_overrides.quantizer.method=softmax-knn",
        "model.config_overrides.quantizer.knn_k=0",
        "model.config_overrides.quantizer.num_codebooks=0",
    )

    assert "`model.config_overrides` is not valid: `quantizer.method` must be one of" in output
    assert "but is 'softmax-knn' instead. `quantizer.num_codebooks` must be at least 1, but is 0 instead. `quantizer.knn_k` must be at least 1, but is 0 instead." in output  # fmt: skip


@pytest.mark.e2e
def test_mask_spans_longer_than_the_crops_are_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\nutt.flac\t40000\n")

    output = _run_ssl(tmp_path, "dataset.min_audio_len=16000", "model.config_overrides.temporal_mask_span_len=40")

    assert "`dataset.min_audio_len` must be at least 37520, the fewest samples from which the model's CNN makes the frames its temporal masker needs" in output  # fmt: skip
    assert "but is 16000 instead" in output


def test_a_knn_k_no_batch_can_serve_is_refused_and_one_beyond_the_least_batch_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from recipes.wav2vec2_knnvq.ssl.dataset import SslDatasetSection
    from recipes.wav2vec2_knnvq.ssl.recipe import check_knn_k

    config = WAV2VEC2_KNNVQ_ARCHS[ARCH]()

    config.quantizer.knn_k = 200

    model = create_wav2vec2_knnvq_model(config)

    section = SslDatasetSection(min_audio_len=16_000, max_audio_len=32_000, max_num_elements=64_000)

    # 64,000 samples make 199 frames on one process, 398 on two with the global scope.
    with pytest.raises(RecipeError, match=r"`quantizer.knn_k` must be at most 199, the frames of the fullest batch .* but is 200 instead"):  # fmt: skip
        check_knn_k(model, section, dp_size=1)

    with caplog.at_level("WARNING"):
        check_knn_k(model, section, dp_size=2)

    assert "`quantizer.knn_k` (200) exceeds the 98 frames of the smallest batch" in caplog.text


def test_one_code_silence_and_rates_in_khz_are_refused() -> None:
    from w2v_knnvq.data.audio_reading import AudioCheckError, check_decoded_audio
    from w2v_knnvq.features.audio_input import AudioInputError, prepare_waveform

    config = WAV2VEC2_KNNVQ_ARCHS[ARCH]()

    config.quantizer.codebook_size = 1

    assert "`quantizer.codebook_size` must be at least 2 for the codes to tell frames apart, but is 1 instead." in str(config.validate())  # fmt: skip

    with pytest.raises(AudioCheckError, match="every sample is 0, digital silence"):
        check_decoded_audio({"waveform": torch.zeros(16_000, 1), "sample_rate": 16_000.0, "format": 0})

    check_decoded_audio({"waveform": torch.full((16_000, 1), 0.1), "sample_rate": 16_000.0, "format": 0})

    with pytest.raises(AudioInputError, match="the sample rate must be at least 1000 Hz, but is 16 instead; sample rates are in Hz"):  # fmt: skip
        prepare_waveform(torch.ones(100), 16, source="clip")
