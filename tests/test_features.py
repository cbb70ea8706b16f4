"""Feature extraction from pretrained ``wav2vec2_knnvq`` checkpoints and the shard CLI."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")

import numpy as np
import pytest
import soundfile
import torch
import yaml

from tests.runs import KNNVQ_METHOD, write_knnvq_run
from tools import extract_features
from w2v_knnvq.features import (
    MODEL_SAMPLE_RATE,
    PADDING_CODE,
    AudioInputError,
    PretrainedModelError,
    SpeechFeatureExtractor,
    audio_input,
    load_pretrained_model,
)
from w2v_knnvq.features.shards import ShardExtractionError, load_shard, read_index
from w2v_knnvq.wav2vec2 import Wav2Vec2KnnVqModel

REPO_ROOT = Path(__file__).resolve().parents[1]

METHOD = KNNVQ_METHOD


def _tone(num_samples: int, sample_rate: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)

    t = np.arange(num_samples) / sample_rate

    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(num_samples)

    return torch.from_numpy(wave.astype(np.float32))


@pytest.fixture(scope="module")
def run_2x320(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Wav2Vec2KnnVqModel]]:
    run_dir = tmp_path_factory.mktemp("run_2x320")

    return run_dir, write_knnvq_run(run_dir, "tiny_2x320")


@pytest.fixture(scope="module")
def extractor(run_2x320: tuple[Path, dict[int, Wav2Vec2KnnVqModel]]) -> SpeechFeatureExtractor:
    return SpeechFeatureExtractor(load_pretrained_model(run_2x320[0]))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_loads_last_step_given_step_and_step_file(run_2x320, tmp_path: Path) -> None:
    run_dir, models = run_2x320

    last = load_pretrained_model(run_dir)

    assert not last.model.training
    assert last.config.quantizer.num_codebooks == 2 and last.config.quantizer.method == METHOD
    assert _same_weights(last.model, models[4])

    assert _same_weights(load_pretrained_model(run_dir, step=2).model, models[2])
    assert _same_weights(load_pretrained_model(run_dir / "checkpoints" / "step_2").model, models[2])

    shard_file = run_dir / "checkpoints" / "step_2" / "model" / "pp_00" / "tp_00" / "sdp_00.pt"
    assert _same_weights(load_pretrained_model(shard_file).model, models[2])

    with pytest.raises(PretrainedModelError, match="available steps: 2, 4"):
        load_pretrained_model(run_dir, step=3)

    # fairseq2's trainer always writes checkpoints/model.yaml; without it the model is unknown.
    bare_run = tmp_path / "bare"
    write_knnvq_run(bare_run, "tiny_1x1024", steps=(1,), model_yaml=False)

    with pytest.raises(
        PretrainedModelError, match=r"model\.yaml: does not exist, so the model's family and configuration are unknown"
    ):
        load_pretrained_model(bare_run)


def test_refuses_other_family_and_mismatched_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00").mkdir(parents=True)
    (other / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00" / "sdp_00.pt").write_bytes(b"")
    (other / "checkpoints" / "model.yaml").write_text(
        yaml.safe_dump({"name": "checkpoint", "model_family": "wav2vec2_asr", "model_config": {}})
    )

    with pytest.raises(PretrainedModelError, match=r"model\.yaml: holds a `wav2vec2_asr` model"):
        load_pretrained_model(other)

    # The weights of a 1x1024 model under a run that says 2x320.
    mismatched = tmp_path / "mismatched"
    write_knnvq_run(mismatched, "tiny_2x320", steps=(1,))
    shard_file = mismatched / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00" / "sdp_00.pt"
    write_knnvq_run(tmp_path / "donor", "tiny_1x1024", steps=(1,))
    (tmp_path / "donor" / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00" / "sdp_00.pt").replace(shard_file)

    with pytest.raises(PretrainedModelError, match=r"step_1/model: the weights do not fit .*model\.yaml"):
        load_pretrained_model(mismatched)

    with pytest.raises(PretrainedModelError, match="no-such-model: neither an existing path nor a known asset card"):
        load_pretrained_model("no-such-model")

    with pytest.raises(PretrainedModelError, match="has no `checkpoint`"):
        load_pretrained_model("wav2vec2_knnvq_tiny_2x320")


@pytest.mark.parametrize("sample_rate", [8_000, 16_000, 22_050, 44_100])
def test_shapes_and_frame_counts(extractor: SpeechFeatureExtractor, sample_rate: int) -> None:
    durations = [0.05, 0.5, 1.0, 1.37]

    waveforms = [_tone(round(seconds * sample_rate), sample_rate, seed) for seed, seconds in enumerate(durations)]

    features = extractor.extract(waveforms, sample_rate, layers=[0, -1])

    resampled_lengths = [math.ceil(w.numel() * MODEL_SAMPLE_RATE / sample_rate) for w in waveforms]

    # 20 ms frames with a 400-sample receptive field: floor((S - 400) / 320) + 1.
    expected_frames = [(length - 400) // 320 + 1 for length in resampled_lengths]

    assert features.frame_lengths.tolist() == expected_frames

    num_frames = max(expected_frames)

    assert features.cnn_features.shape == (4, num_frames, 64)
    assert sorted(features.hidden_states) == [0, 1]
    assert all(states.shape == (4, num_frames, 64) for states in features.hidden_states.values())
    assert features.codes.shape == (4, num_frames, 2) and features.codes.dtype == torch.int64

    mask = features.padding_mask

    assert mask.sum(dim=1).tolist() == expected_frames

    real_codes = features.codes[mask]

    assert real_codes.min() >= 0 and real_codes.max() < 320
    assert (features.codes[~mask] == PADDING_CODE).all()
    assert (features.cnn_features[~mask] == 0).all()


def test_codes_are_the_quantizers_argmax_on_layer_normed_cnn_features(extractor: SpeechFeatureExtractor) -> None:
    model = extractor.model

    waveform = _tone(16_000, 16_000, seed=7)

    features = extractor.extract([waveform], layers=[])

    from fairseq2.nn import BatchLayout

    with torch.inference_mode():
        reference, _, _ = model.encoder_frontend.extract_features(waveform[None], BatchLayout.of(waveform[None]))
        reference_codes = model.quantizer(reference).codes

    assert features.hidden_states == {}
    torch.testing.assert_close(features.cnn_features, reference, atol=1e-5, rtol=0)
    assert torch.equal(features.codes, reference_codes)

    # The codebooks are used: a second of audio does not collapse onto one code.
    assert features.codes[0, :, 0].unique().numel() > 1


def test_padded_batch_matches_one_by_one(extractor: SpeechFeatureExtractor) -> None:
    waveforms = [_tone(n, 16_000, seed) for seed, n in enumerate([4_000, 16_000, 9_999, 27_321])]

    batch = extractor.extract(waveforms, layers=None)

    for idx, waveform in enumerate(waveforms):
        alone = extractor.extract([waveform], layers=None)

        trimmed = batch.utterance(idx)

        assert trimmed.frame_lengths.tolist() == alone.frame_lengths.tolist()

        torch.testing.assert_close(trimmed.cnn_features, alone.cnn_features, atol=1e-5, rtol=0)

        for layer in (0, 1):
            torch.testing.assert_close(trimmed.hidden_states[layer], alone.hidden_states[layer], atol=1e-5, rtol=0)

        assert torch.equal(trimmed.codes, alone.codes)


def test_files_resampling_stereo_and_bad_audio(
    extractor: SpeechFeatureExtractor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mono = _tone(32_000, 32_000, seed=3)

    mono_file = tmp_path / "mono32k.wav"
    soundfile.write(mono_file, mono.numpy(), 32_000, subtype="FLOAT")

    stereo = torch.stack([mono, 0.5 * mono])

    stereo_file = tmp_path / "stereo32k.wav"
    soundfile.write(stereo_file, stereo.T.numpy(), 32_000, subtype="FLOAT")

    audio_input._warned_multichannel = False

    with caplog.at_level(logging.WARNING):
        from_files = extractor.extract_files([mono_file, stereo_file, stereo_file], layers=[-1])

    warnings = [record for record in caplog.records if "mixing multichannel audio down" in record.getMessage()]
    assert len(warnings) == 1 and str(stereo_file) in warnings[0].getMessage()

    # One second at 32 kHz gives the 49 frames of one second at 16 kHz.
    assert from_files.frame_lengths.tolist() == [49, 49, 49]

    from_tensors = extractor.extract([mono, stereo.mean(dim=0)], 32_000, layers=[-1])

    torch.testing.assert_close(from_files.hidden_states[1][:2], from_tensors.hidden_states[1], atol=1e-5, rtol=0)

    empty_file = tmp_path / "empty.wav"
    soundfile.write(empty_file, np.zeros(0, dtype=np.float32), 16_000)

    with pytest.raises(AudioInputError, match=r"empty\.wav: contains no audio samples"):
        extractor.extract_files([mono_file, empty_file])

    corrupt_file = tmp_path / "corrupt.flac"
    corrupt_file.write_bytes(b"fLaC" + bytes(100))

    with pytest.raises(AudioInputError, match=r"corrupt\.flac: unreadable by soundfile"):
        extractor.extract_files([corrupt_file])

    with pytest.raises(AudioInputError, match=r"missing\.flac: no such audio file"):
        extractor.extract_files([tmp_path / "missing.flac"])

    with pytest.raises(AudioInputError, match="too short for one frame"):
        extractor.extract([torch.zeros(100)])

    with pytest.raises(AudioInputError, match="NaN"):
        extractor.extract([torch.full((16_000,), float("nan"))])


def test_cli_writes_shards_and_resumes_without_duplicates(
    run_2x320, extractor: SpeechFeatureExtractor, tmp_path: Path
) -> None:
    run_dir, _ = run_2x320

    audio_dir = tmp_path / "audio"

    lengths = [8_000, 12_000, 16_000, 20_000, 6_000]

    manifest_lines = [str(audio_dir)]

    for idx, length in enumerate(lengths):
        path = audio_dir / f"spk{idx % 2}" / f"utt{idx}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, _tone(length, 16_000, idx).numpy(), 16_000, subtype="PCM_16")
        manifest_lines.append(f"spk{idx % 2}/utt{idx}.flac\t{length}")

    manifest = tmp_path / "dev.tsv"
    manifest.write_text("\n".join(manifest_lines) + "\n")

    tool = extract_features

    output_dir = tmp_path / "features"

    args = [
        str(run_dir),
        str(manifest),
        str(output_dir),
        "--layers",
        "0",
        "-1",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
    ]

    assert tool.main(args) == 0

    records = read_index(output_dir)

    assert [record["utterance"] for record in records] == [line.split("\t")[0] for line in manifest_lines[1:]]
    assert [record["shard"] for record in records] == ["shard_00000"] * 2 + ["shard_00001"] * 2 + ["shard_00002"]
    assert [record["frames"] for record in records] == [(n - 400) // 320 + 1 for n in lengths]

    # The stored frames are those of the Python API, at the recorded offsets.
    shard = load_shard(output_dir, 1, "npy")
    assert sorted(shard) == ["cnn", "codes", "layer0", "layer1"]

    reference = extractor.extract_files([audio_dir / "spk1" / "utt3.flac"], layers=[1])
    record = records[3]
    rows = slice(record["offset"], record["offset"] + record["frames"])
    np.testing.assert_allclose(shard["layer1"][rows], reference.hidden_states[1][0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(shard["codes"][rows], reference.codes[0].numpy())

    # An interruption during the last shard: its index (written last) never appeared.
    (output_dir / "shard_00002.jsonl").unlink()
    (output_dir / "index.jsonl").unlink()
    first_shard_mtime = (output_dir / "shard_00000.cnn.npy").stat().st_mtime_ns

    assert tool.main(args) == 0

    assert (output_dir / "shard_00000.cnn.npy").stat().st_mtime_ns == first_shard_mtime
    assert read_index(output_dir) == records

    # A finished run rerun writes nothing new and keeps one line per utterance.
    assert tool.main(args) == 0
    assert read_index(output_dir) == records
    assert not list(output_dir.glob("*.tmp"))

    # Other settings cannot resume into the same directory.
    assert tool.main(args[:-4] + ["--shard-size", "3"]) == 1

    from w2v_knnvq.features.shards import ShardSettings, extract_to_shards, list_utterances

    with pytest.raises(ShardExtractionError, match="shard_size differ"):
        extract_to_shards(
            extractor,
            list_utterances(manifest),
            output_dir,
            ShardSettings(model=str(run_dir), layers=[0, 1], shard_size=3),
            show_progress=False,
        )


def test_cli_directory_input_and_pt_shards(run_2x320, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run_2x320

    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()

    for idx, sample_rate in enumerate([16_000, 22_050, 8_000]):
        soundfile.write(audio_dir / f"u{idx}.wav", _tone(sample_rate, sample_rate, idx).numpy(), sample_rate)

    (audio_dir / "notes.txt").write_text("not audio")

    tool = extract_features

    output_dir = tmp_path / "features"

    assert tool.main([str(run_dir), str(audio_dir), str(output_dir), "--format", "pt", "--layers", "--no-codes"]) == 0

    records = read_index(output_dir)

    assert [record["utterance"] for record in records] == ["u0.wav", "u1.wav", "u2.wav"]
    assert [record["frames"] for record in records] == [49, 49, 49]

    shard = load_shard(output_dir, 0, "pt")
    assert sorted(shard) == ["cnn"] and shard["cnn"].shape == (147, 64)

    (audio_dir / "u1.wav").write_bytes(b"RIFF" + bytes(40))

    assert tool.main([str(run_dir), str(audio_dir), str(tmp_path / "again")]) == 1
    assert "u1.wav" in capsys.readouterr().err


def test_a_sweep_directory_is_found_from_the_output_directory(tmp_path: Path) -> None:
    """Without `common.no_sweep_dir` fairseq2 writes a run to OUT/ws_{world size}.{hash}/."""
    models = write_knnvq_run(tmp_path / "out" / "ws_1.f8b8f9db", "tiny_2x320", steps=(3,))

    loaded = load_pretrained_model(tmp_path / "out")

    assert _same_weights(loaded.model, models[3])
    assert "ws_1.f8b8f9db" in loaded.source

    write_knnvq_run(tmp_path / "out" / "ws_2.0a1b2c3d", "tiny_2x320", steps=(1,))

    with pytest.raises(
        PretrainedModelError, match=r"holds the runs of 2 configurations \(ws_1.f8b8f9db, ws_2.0a1b2c3d\)"
    ):
        load_pretrained_model(tmp_path / "out")

    assert _same_weights(load_pretrained_model(tmp_path / "out" / "ws_1.f8b8f9db").model, models[3])


def test_extract_accepts_numpy_arrays(extractor: SpeechFeatureExtractor) -> None:
    waveform = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)

    from_numpy = extractor.extract([waveform, np.stack([waveform, waveform])], layers=[0])
    from_tensor = extractor.extract([torch.from_numpy(waveform), torch.from_numpy(waveform)], layers=[0])

    assert torch.equal(from_numpy.codes, from_tensor.codes)
    assert torch.allclose(from_numpy.hidden_states[0], from_tensor.hidden_states[0])

    # float64 arrays too; text arrays are refused with the source named.
    assert torch.equal(extractor.extract([waveform.astype(np.float64)]).codes, from_tensor.codes[:1])

    with pytest.raises(AudioInputError, match=r"waveform 0: a waveform must hold numbers, but has dtype <U1 instead"):
        extractor.extract([np.array(["a", "b"])])
