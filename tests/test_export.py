"""Exports of the encoder to Hugging Face ``transformers`` and torchaudio match the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")

import numpy as np
import pytest
import torch

from fairseq2.models.transformer import TransformerNormOrder

from tools import export_checkpoint
from w2v_knnvq import __version__
from w2v_knnvq.export import (
    ExportError,
    describe_encoder,
    load_torchaudio_export,
    to_huggingface,
    torchaudio_builder_args,
)
from w2v_knnvq.features import SpeechFeatureExtractor
from w2v_knnvq.wav2vec2 import get_wav2vec2_knnvq_model_hub

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO_ROOT = Path(__file__).resolve().parents[1]

TOLERANCE = 1e-4


@pytest.mark.parametrize("arch", ["tiny_1x1024", "tiny_2x320"])
@pytest.mark.e2e
def test_exports_match_our_features(arch: str, tmp_path: Path) -> None:
    # The helper that writes a pretraining run's layout lives beside this file.
    from tests.runs import write_knnvq_run

    run_dir = tmp_path / "run"
    models = write_knnvq_run(run_dir, arch, steps=(3,))

    (run_dir / "metrics").mkdir()
    (run_dir / "metrics/valid.jsonl").write_text(
        json.dumps({"Step": 3, "Codebook Usage": [0.5, 0.75], "Code Perplexity": 123.456, "Accuracy": 0.25}) + "\n"
    )

    export_dir = tmp_path / "exported"

    assert export_checkpoint.main([str(run_dir), str(export_dir)]) == 0

    assert sorted(path.name for path in (export_dir / "hf").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]

    card = (export_dir / "hf/README.md").read_text()

    num_codebooks, codebook_size = (1, 1024) if arch == "tiny_1x1024" else (2, 320)

    assert f"| quantizer | `softmax-knn-ce`, {num_codebooks} x {codebook_size} codes |" in card
    assert "| KNN regularizer | K = 2, global scope |" in card
    assert "## Validation at step 3" in card and "| Codebook Usage | 0.5 / 0.75 |" in card and "| Code Perplexity | 123.5 |" in card  # fmt: skip
    assert "| steps | 3 of None |" in card
    assert "`hidden_states[L + 1]`" in card and "not standardized" in card
    assert f"Exported by w2v-knnvq {__version__} (`w2v-knnvq-export`) from `{run_dir.resolve()}/checkpoints/step_3/model`." in card  # fmt: skip

    hf_model = transformers.Wav2Vec2Model.from_pretrained(export_dir / "hf").eval()

    feature_extractor = transformers.AutoFeatureExtractor.from_pretrained(export_dir / "hf")
    assert feature_extractor.sampling_rate == 16_000
    assert feature_extractor.do_normalize is False  # the run did not standardize its audio
    assert feature_extractor.return_attention_mask is False  # group-norm CNN
    ta_model = load_torchaudio_export(export_dir / "torchaudio")

    builder_args = json.loads((export_dir / "torchaudio" / "wav2vec2_model_args.json").read_text())
    assert builder_args["encoder_num_layers"] == 2 and builder_args["extractor_mode"] == "group_norm"

    extractor = SpeechFeatureExtractor(models[3])

    rng = np.random.default_rng(0)

    for num_samples in (5_000, 16_000, 27_777):
        waveform = torch.from_numpy(0.1 * rng.standard_normal(num_samples).astype(np.float32))

        ours = extractor.extract([waveform], layers=None)

        inputs = feature_extractor(waveform.numpy(), sampling_rate=16_000, return_tensors="pt")

        with torch.inference_mode():
            hf_output = hf_model(inputs.input_values, output_hidden_states=True)

            ta_layers, _ = ta_model.extract_features(waveform[None])
            ta_final, _ = ta_model(waveform[None])

        # Hugging Face: hidden_states[i + 1] is the output of layer i (post-norm encoder).
        assert hf_output.extract_features.shape == ours.cnn_features.shape
        assert (hf_output.extract_features - ours.cnn_features).abs().max() < TOLERANCE

        for layer in (0, 1):
            assert (hf_output.hidden_states[layer + 1] - ours.hidden_states[layer]).abs().max() < TOLERANCE
            assert (ta_layers[layer] - ours.hidden_states[layer]).abs().max() < TOLERANCE

        assert (hf_output.last_hidden_state - ours.hidden_states[1]).abs().max() < TOLERANCE
        assert (ta_final - ours.hidden_states[1]).abs().max() < TOLERANCE


def test_pre_norm_layer_norm_convs_with_bias_and_projection() -> None:
    """fairseq2's `large_lv60k` layout: pre-norm, layer-normed convs with bias."""
    hub = get_wav2vec2_knnvq_model_hub()

    config = hub.get_arch_config("tiny_2x320")

    encoder = config.encoder_config
    encoder.norm_order = TransformerNormOrder.PRE
    encoder.layer_norm_features = False
    encoder.feature_extractor_layer_norm_convs = True
    encoder.feature_extractor_bias = True
    encoder.model_dim = 48
    encoder.num_encoder_attn_heads = 4

    torch.manual_seed(1)
    model = hub.create_new_model(config).eval()

    layout = describe_encoder(config)
    assert layout.layer_norm_first and layout.conv_layer_norm and layout.conv_bias

    hf_model = to_huggingface(model, config)

    waveform = 0.1 * torch.randn(12_345)

    ours = SpeechFeatureExtractor(model).extract([waveform], layers=None)

    with torch.inference_mode():
        hf_output = hf_model(waveform[None], output_hidden_states=True)

        final = model.encoder.layer_norm(ours.hidden_states[1])

    assert (hf_output.extract_features - ours.cnn_features).abs().max() < TOLERANCE
    assert (hf_output.hidden_states[1] - ours.hidden_states[0]).abs().max() < TOLERANCE
    assert (hf_output.last_hidden_state - final).abs().max() < TOLERANCE

    assert torchaudio_builder_args(config)["encoder_layer_norm_first"] is True


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("use_conformer", True, "use_conformer=True"),
        ("pos_encoder_depth", 3, "pos_encoder_depth=3"),
        ("pos_encoder_type", "relative", "pos_encoder_type=relative"),
        ("layer_norm_features", False, "layer_norm_features=False` with `norm_order=POST"),
    ],
)
def test_refuses_unrepresentable_encoders(field: str, value: object, message: str) -> None:
    config = get_wav2vec2_knnvq_model_hub().get_arch_config("tiny_1x1024")

    setattr(config.encoder_config, field, value)

    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torchaudio_builder_args(config)


@pytest.mark.e2e
def test_s3prl_upstream_gives_a_padded_utterance_other_features(tmp_path: Path) -> None:
    """s3prl's ``hf_wav2vec2_custom`` upstream (its own code) pads a batch and passes an
    attention mask; with wav2vec 2.0 base's group-norm CNN the longest utterance of the batch
    gets our features, a shorter one does not (the group norm sees its padding)."""
    expert = pytest.importorskip("s3prl.upstream.hf_wav2vec2.expert")

    import soundfile

    from tests.runs import write_knnvq_run
    from w2v_knnvq.features import load_pretrained_model

    run_dir = tmp_path / "run"

    write_knnvq_run(run_dir, "tiny_2x320", steps=(3,))

    assert export_checkpoint.main([str(run_dir), str(tmp_path / "exported"), "--format", "hf"]) == 0

    upstream = expert.UpstreamExpert(str(tmp_path / "exported/hf")).eval()

    files = sorted((Path(__file__).parent / "data/minispeech/dev").rglob("*.flac"))[:2]

    waveforms = sorted((torch.from_numpy(soundfile.read(file, dtype="float32")[0]) for file in files), key=len, reverse=True)  # fmt: skip

    with torch.inference_mode():
        theirs = upstream(waveforms)["hidden_states"][-1]

    ours = SpeechFeatureExtractor(load_pretrained_model(run_dir)).extract(waveforms, layers=[-1])

    def relative_difference(row: int) -> float:
        num_frames = int(ours.frame_lengths[row])

        (last_layer,) = ours.hidden_states.values()

        reference = last_layer[row, :num_frames]

        return float((theirs[row, :num_frames] - reference).norm() / reference.norm())

    assert ours.frame_lengths[0] > ours.frame_lengths[1]
    print(
        f"relative difference of the last layer: {relative_difference(0):.2g} (longest), {relative_difference(1):.2g} (padded)"
    )

    assert relative_difference(0) < 1e-5
    assert relative_difference(1) > 1e-2
