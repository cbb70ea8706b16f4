"""Feature extraction from fairseq2's own ``wav2vec2`` models, and the layout of one file
per utterance (``--layout per-utterance``)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")

import numpy as np
import pytest
import soundfile
import torch

from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq2.nn import BatchLayout

from tests.cli import run_recipe_command
from tests.stock_wav2vec2 import STOCK_CARD, create_stock_model, tiny_stock_config, write_stock_card, write_stock_run
from tools import extract_features
from w2v_knnvq.features import SpeechFeatureExtractor, load_pretrained_model
from w2v_knnvq.features.shards import ShardExtractionError, ShardSettings, Utterance, list_utterances
from w2v_knnvq.features.utterance_files import extract_per_utterance, load_utterance, utterance_ids

REPO_ROOT = Path(__file__).resolve().parents[1]

# One name with a space, which utterance ids replace.
AUDIO_FILES = {"spk0/utt0.flac": 16_000, "spk0/a b.flac": 9_000, "spk1/utt2.flac": 20_000}


def _tone(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)

    t = np.arange(num_samples) / 16_000

    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(num_samples)

    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Wav2Vec2Model]:
    """A tiny ``wav2vec2`` model as a training run and as an asset card."""
    root = tmp_path_factory.mktemp("stock")

    config = tiny_stock_config()

    model = create_stock_model(config, seed=5)

    write_stock_card(root / "cards", model, config)

    return write_stock_run(root / "run", model, config), root / "cards", model


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audio")

    for seed, (name, length) in enumerate(AUDIO_FILES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)

        soundfile.write(root / name, _tone(length, seed), 16_000, subtype="PCM_16")

    return root


@pytest.fixture(scope="module")
def extractor(stock: tuple[Path, Path, Wav2Vec2Model]) -> SpeechFeatureExtractor:
    return SpeechFeatureExtractor(load_pretrained_model(stock[0]))


def test_a_stock_run_gives_its_encoder_outputs_and_gumbel_codes(stock, extractor: SpeechFeatureExtractor) -> None:
    run_dir, _, model = stock

    pretrained = load_pretrained_model(run_dir / "checkpoints" / "step_2")

    assert isinstance(pretrained.model, Wav2Vec2Model) and isinstance(pretrained.config, Wav2Vec2Config)
    assert not pretrained.model.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(pretrained.model.state_dict().values(), model.state_dict().values(), strict=True)
    )

    waveform = torch.from_numpy(_tone(16_000, seed=9))

    features = extractor.extract([waveform], layers=[0, -1])

    # The stock model's own modules on the same second of audio.
    model.eval()

    with torch.inference_mode():
        seqs, layout = waveform[None], BatchLayout.of(waveform[None])

        cnn, cnn_layout, _ = model.encoder_frontend.extract_features(seqs, layout)

        encoder_input, _ = model.encoder_frontend.process_features(cnn, cnn_layout)

        states: dict[int, torch.Tensor] = {}

        def keep(layer_idx: int, output: torch.Tensor, output_layout: BatchLayout, num_layers: int) -> bool:
            states[layer_idx] = output

            return True

        with model.encoder.register_layer_hook(keep):
            model.encoder(encoder_input, cnn_layout)

        # The eval-mode Gumbel quantizer picks the largest of its logits.
        logits = model.quantizer.entry_proj(cnn).view(1, cnn.size(1), 2, 320)

    torch.testing.assert_close(features.cnn_features, cnn, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.hidden_states[0], states[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(features.hidden_states[1], states[1], atol=1e-5, rtol=0)

    assert features.codes.shape == (1, 49, 2)
    assert torch.equal(features.codes, logits.argmax(dim=-1))
    assert features.codes[0, :, 0].unique().numel() > 1


def test_utterance_ids_are_file_names_and_unique() -> None:
    names = ["dev/1272-128104-0000.flac", "dev/a b+c.wav", "x/.hidden.flac", "noext"]

    utterances = [Utterance(name=name, path=Path(name)) for name in names]

    assert utterance_ids(utterances, "stem") == ["1272-128104-0000", "a_b_c", "_hidden", "noext"]
    assert utterance_ids(utterances, "path") == ["dev__1272-128104-0000", "dev__a_b_c", "x__.hidden", "noext"]

    twins = [Utterance(name=name, path=Path(name)) for name in ("spk0/x.flac", "spk1/x.flac")]

    with pytest.raises(
        ShardExtractionError, match=r"spk1/x\.flac: gets the utterance id `x` of spk0/x\.flac.*\(`path`\)"
    ):
        utterance_ids(twins, "stem")

    assert utterance_ids(twins, "path") == ["spk0__x", "spk1__x"]


def _settings(**overrides: object) -> ShardSettings:
    return replace(ShardSettings(model="stock", layers=[1], layout="per-utterance"), **overrides)  # type: ignore[arg-type]


def test_writes_one_file_per_utterance_and_kind_and_resumes(
    extractor: SpeechFeatureExtractor, audio_dir: Path, tmp_path: Path
) -> None:
    utterances = list_utterances(audio_dir)

    output_dir = tmp_path / "features"

    summary = extract_per_utterance(extractor, utterances, output_dir, _settings(), batch_size=2, show_progress=False)

    assert summary.num_written == 3

    records = [json.loads(line) for line in summary.index_file.read_text().splitlines()]

    assert records == [
        {"utterance": "spk0/a b.flac", "id": "a_b", "frames": (9_000 - 400) // 320 + 1},
        {"utterance": "spk0/utt0.flac", "id": "utt0", "frames": 49},
        {"utterance": "spk1/utt2.flac", "id": "utt2", "frames": (20_000 - 400) // 320 + 1},
    ]

    assert sorted(path.name for path in output_dir.iterdir()) == [
        "cnn",
        "codes",
        "extraction.json",
        "index.jsonl",
        "layer1",
    ]

    # The files hold the frames of the Python API, frames first.
    reference = extractor.extract_files([audio_dir / "spk1" / "utt2.flac"], layers=[1])

    arrays = load_utterance(output_dir, "utt2", "npy")

    assert sorted(arrays) == ["cnn", "codes", "layer1"]
    assert arrays["layer1"].shape == (62, 64) and arrays["layer1"].dtype == np.float32
    np.testing.assert_allclose(arrays["layer1"], reference.hidden_states[1][0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(arrays["codes"], reference.codes[0].numpy())
    assert arrays["codes"].dtype == np.int64 and arrays["codes"].shape == (62, 2)

    # An interruption before the codes of `utt0` were written: only `utt0` is extracted again.
    (output_dir / "codes" / "utt0.npy").unlink()
    kept_mtime = (output_dir / "layer1" / "a_b.npy").stat().st_mtime_ns

    again = extract_per_utterance(extractor, utterances, output_dir, _settings(), show_progress=False)

    assert again.num_written == 1
    assert (output_dir / "layer1" / "a_b.npy").stat().st_mtime_ns == kept_mtime
    assert [json.loads(line) for line in again.index_file.read_text().splitlines()] == records
    assert not list(output_dir.rglob("*.tmp"))

    with pytest.raises(ShardExtractionError, match="utterance_ids differ"):
        extract_per_utterance(extractor, utterances, output_dir, _settings(utterance_ids="path"), show_progress=False)


def test_pt_files_hold_the_unpadded_frames(extractor: SpeechFeatureExtractor, audio_dir: Path, tmp_path: Path) -> None:
    utterances = list_utterances(audio_dir)

    settings = _settings(layers=[], codes=False, shard_format="pt")

    extract_per_utterance(extractor, utterances, tmp_path, settings, batch_size=3, show_progress=False)

    tensor = torch.load(tmp_path / "cnn" / "a_b.pt", weights_only=True)

    assert tensor.shape == (27, 64)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cnn", "extraction.json", "index.jsonl"]

    alone = extractor.extract_files([audio_dir / "spk0" / "a b.flac"], layers=[]).cnn_features[0]

    torch.testing.assert_close(tensor, alone, atol=1e-5, rtol=0)


def test_cli_refuses_options_of_the_other_layout(
    audio_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = extract_features

    assert tool.main(["stock", str(audio_dir), str(tmp_path), "--layout", "per-utterance", "--shard-size", "4"]) == 1
    assert "--shard-size applies to --layout shards only" in capsys.readouterr().err

    assert tool.main(["stock", str(audio_dir), str(tmp_path), "--utterance-ids", "path"]) == 1
    assert "--utterance-ids applies to --layout per-utterance only" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_extracts_a_stock_asset_card_per_utterance(
    stock, extractor: SpeechFeatureExtractor, audio_dir: Path, tmp_path: Path
) -> None:
    _, card_dir, _ = stock

    output_dir = tmp_path / "features"

    command = [
        sys.executable, str(REPO_ROOT / "tools" / "extract_features.py"), STOCK_CARD, str(audio_dir), str(output_dir),
        "--layout", "per-utterance", "--utterance-ids", "path", "--layers", "0",
    ]  # fmt: skip

    result = run_recipe_command(command, env={"FAIRSEQ2_USER_ASSET_DIR": str(card_dir)})

    assert "3 utterances (3 written now)" in result.stderr

    assert sorted(path.name for path in (output_dir / "layer0").iterdir()) == [
        "spk0__a_b.npy",
        "spk0__utt0.npy",
        "spk1__utt2.npy",
    ]

    # The card holds the weights of the run the in-process extractor loaded.
    reference = extractor.extract_files([audio_dir / "spk0" / "utt0.flac"], layers=[0])

    np.testing.assert_allclose(
        np.load(output_dir / "layer0" / "spk0__utt0.npy"), reference.hidden_states[0][0].numpy(), atol=1e-5
    )
    np.testing.assert_array_equal(np.load(output_dir / "codes" / "spk0__utt0.npy"), reference.codes[0].numpy())
