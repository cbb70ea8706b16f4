"""The ``wav2vec2_knnvq`` fairseq2 model family: architectures, training step,
checkpoints, asset cards, and encoder sharing with ``wav2vec2_asr``."""

from __future__ import annotations

import os

# Before fairseq2 starts: a failing extension must raise, and the stock Gumbel
# quantizer (built here for comparisons) must not call `torch.compile`.
os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import math
import sys
from pathlib import Path

import pytest
import torch
from importlib_metadata import entry_points

from fairseq2.models import ModelGatedError
from fairseq2.models.wav2vec2 import Wav2Vec2Config, create_wav2vec2_model
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, get_wav2vec2_asr_model_hub
from fairseq2.nn import BatchLayout
from fairseq2.runtime.dependency import get_dependency_resolver
from fairseq2.utils.config import ConfigMerger
from fairseq2.utils.structured import ValueConverter
from fairseq2.utils.validation import StandardObjectValidator, ValidationError

from tests.cli import run_recipe_command
from w2v_knnvq.quantizer import CodebookUsage, QuantizerConfig
from w2v_knnvq.wav2vec2 import (
    WAV2VEC2_KNNVQ_ARCHS,
    Wav2Vec2KnnVqCheckpointError,
    Wav2Vec2KnnVqConfig,
    Wav2Vec2KnnVqModel,
    get_wav2vec2_knnvq_model_hub,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

TRAIN_METHODS = ("softmax-knn-ce", "softmax-ppl", "hg-ppl", "ste-euclid", "simvq")

SMOOTHED_PREFIXES = ("softmax-", "sg-", "hg-")


@pytest.fixture(scope="module")
def hub():
    names = [ep.name for ep in entry_points(group="fairseq2.extension")]
    if "w2v_knnvq" not in names:
        pytest.fail(
            "The `fairseq2.extension` entry point `w2v_knnvq` is not installed; run `pip install -e .` in the repository root."
        )

    get_dependency_resolver()  # starts fairseq2 with its extensions

    return get_wav2vec2_knnvq_model_hub()


def _tiny(arch: str, method: str = "softmax-knn-ce") -> Wav2Vec2KnnVqConfig:
    config = WAV2VEC2_KNNVQ_ARCHS[arch]()

    config.quantizer.method = method

    return config


def _batch() -> tuple[torch.Tensor, BatchLayout]:
    """Two utterances of 1 s and 0.8 s at 16 kHz, the second padded."""
    generator = torch.Generator().manual_seed(1234)

    seqs = torch.randn((2, 16000), generator=generator)

    seqs[1, 12800:] = 0.0

    return seqs, BatchLayout(seqs.shape, seq_lens=[16000, 12800])


def _build(hub, config: Wav2Vec2KnnVqConfig, seed: int = 0) -> Wav2Vec2KnnVqModel:
    torch.manual_seed(seed)

    return hub.create_new_model(config, device=torch.device("cpu"))


def _run(model: Wav2Vec2KnnVqModel, seed: int = 7):
    """Forward with fixed masking and distractor sampling."""
    seqs, layout = _batch()

    torch.manual_seed(seed)

    return model(seqs, layout)


# --- architectures -------------------------------------------------------------


def _gumbel_quantizer_parameters(config: Wav2Vec2Config) -> int:
    feature_dim = config.encoder_config.feature_dim

    num_entries = config.num_codebooks * config.num_codebook_entries

    entry_dim = config.quantized_dim // config.num_codebooks

    # entry_proj (weight and bias) and the codebook entries.
    return feature_dim * num_entries + num_entries + num_entries * entry_dim


def _our_quantizer_parameters(quantizer: QuantizerConfig, feature_dim: int) -> int:
    output_dim = quantizer.num_codebooks * quantizer.codebook_dim

    if feature_dim != output_dim:
        input_proj = feature_dim * output_dim + output_dim
    else:
        input_proj = 0

    if quantizer.method == "simvq":
        # Only W (D x D per codebook) learns; the random basis is a buffer.
        codebook = quantizer.num_codebooks * quantizer.codebook_dim**2
    else:
        codebook = quantizer.num_codebooks * quantizer.codebook_size * quantizer.codebook_dim

    temperature = 1 if quantizer.method.startswith(SMOOTHED_PREFIXES) else 0

    return input_proj + codebook + temperature


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(WAV2VEC2_KNNVQ_ARCHS))
def test_arch_builds_on_meta_with_expected_parameter_count(hub, arch: str) -> None:
    config = hub.get_arch_config(arch)

    model = hub.create_new_model(config, meta=True)

    assert isinstance(model, Wav2Vec2KnnVqModel)
    assert next(model.parameters()).device.type == "meta"

    stock_config = Wav2Vec2Config(
        encoder_config=config.encoder_config,
        final_dim=config.final_dim,
        quantized_dim=config.quantizer.output_dim,
        num_codebooks=config.quantizer.num_codebooks,
        num_codebook_entries=config.quantizer.codebook_size,
    )

    with torch.device("meta"):
        stock = create_wav2vec2_model(stock_config)

    assert _num_parameters(stock.quantizer) == _gumbel_quantizer_parameters(stock_config)

    expected = (
        _num_parameters(stock)
        - _gumbel_quantizer_parameters(stock_config)
        + _our_quantizer_parameters(config.quantizer, config.encoder_config.feature_dim)
    )

    assert _num_parameters(model) == expected


@pytest.mark.parametrize("method", ["simvq", "ste-euclid", "hg-knn-l2"])
def test_parameter_count_follows_the_method(hub, method: str) -> None:
    config = _tiny("tiny_2x320", method)

    model = hub.create_new_model(config, meta=True)

    default = hub.create_new_model(_tiny("tiny_2x320"), meta=True)

    feature_dim = config.encoder_config.feature_dim

    difference = _our_quantizer_parameters(config.quantizer, feature_dim) - _our_quantizer_parameters(
        _tiny("tiny_2x320").quantizer, feature_dim
    )

    assert _num_parameters(model) - _num_parameters(default) == difference


def test_paper_archs_follow_table_5(hub) -> None:
    for arch, (num_codebooks, codebook_size, codebook_dim) in {
        "paper_1x1024": (1, 1024, 256),
        "paper_2x320": (2, 320, 128),
    }.items():
        config = hub.get_arch_config(arch)
        encoder = config.encoder_config

        assert encoder.feature_extractor_layer_descs == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2  # fmt: skip
        assert (encoder.num_encoder_layers, encoder.model_dim, encoder.num_encoder_attn_heads) == (12, 768, 8)  # fmt: skip
        assert (encoder.ffn_inner_dim, encoder.dropout_p, encoder.layer_drop_p) == (4096, 0.1, 0.05)  # fmt: skip
        # Table 5's dropout 0.1 as torchaudio's base applies it; none on the quantizer's targets.
        assert (encoder.attn_dropout_p, encoder.ffn_inner_dropout_p, encoder.first_pass_dropout_p) == (0.1, 0.1, 0.0)
        assert config.logit_temp == 0.1

        quantizer = config.quantizer
        assert (quantizer.num_codebooks, quantizer.codebook_size, quantizer.codebook_dim) == (num_codebooks, codebook_size, codebook_dim)  # fmt: skip
        assert (quantizer.method, quantizer.knn_k, quantizer.input_dim) == ("softmax-knn-ce", 2, None)  # fmt: skip
        assert config.quantizer_config().input_dim == 512


def test_config_rejects_a_quantizer_that_does_not_fit_the_features() -> None:
    config = _tiny("tiny_1x1024")

    config.quantizer.input_dim = 32
    config.num_distractors = 0

    with pytest.raises(ValidationError) as error:
        StandardObjectValidator().validate(config)

    message = str(error.value)
    assert (
        "`quantizer.input_dim` must be `None` or equal `encoder_config.feature_dim` (64), but is 32 instead." in message
    )
    assert "`num_distractors` must be at least 1" in message


def test_config_rejects_mask_settings_that_the_masker_cannot_take() -> None:
    config = _tiny("tiny_1x1024")

    config.max_temporal_mask_prob = 1.5
    config.max_spatial_mask_prob = 0.1
    config.spatial_mask_span_len = config.encoder_config.model_dim
    config.temporal_mask_span_len = 0
    config.min_num_temporal_mask_spans = -1

    with pytest.raises(ValidationError) as error:
        StandardObjectValidator().validate(config)

    message = str(error.value)

    assert "`max_temporal_mask_prob` must be greater than 0 and at most 1, but is 1.5 instead." in message
    assert "`spatial_mask_span_len` must be less than `encoder_config.model_dim`" in message
    assert "`temporal_mask_span_len` must be at least 1, but is 0 instead." in message
    assert "`min_num_temporal_mask_spans` must be non-negative, but is -1 instead." in message

    config = _tiny("tiny_1x1024")

    StandardObjectValidator().validate(config)


def test_codebook_shape_has_one_source_of_truth(hub) -> None:
    # Overriding the codebook size alone is enough; nothing mirrors it.
    config = _tiny("tiny_2x320")
    config.quantizer.codebook_size = 100

    model = hub.create_new_model(config, meta=True)

    assert model.quantizer.codebook.weight.shape == (2, 100, 32)
    assert model.quantizer.input_dim == config.encoder_config.feature_dim
    assert not hasattr(config, "num_codebook_entries") and not hasattr(config, "codebook_sampling_temperature")


def test_one_override_switches_the_method(hub) -> None:
    resolver = get_dependency_resolver()

    converter = resolver.resolve(ValueConverter)

    unstructured = converter.unstructure(hub.get_arch_config("tiny_1x1024"))

    merged = resolver.resolve(ConfigMerger).merge(unstructured, {"quantizer": {"method": "softmax-ppl"}})

    config = converter.structure(merged, Wav2Vec2KnnVqConfig)

    StandardObjectValidator().validate(config)

    assert config.quantizer.method == "softmax-ppl"
    assert config.quantizer.codebook_size == 1024

    model = _build(hub, config)

    loss, _ = _run(model)

    assert torch.isfinite(loss.aggregate)


# --- training step -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny_1x1024", "tiny_2x320"])
@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_tiny_forward_backward(hub, arch: str, method: str) -> None:
    config = _tiny(arch, method)

    model = _build(hub, config)

    loss, output = _run(model)

    quantizer_config = config.quantizer
    num_codebooks = quantizer_config.num_codebooks

    # The quantizer saw exactly the masked frames: every row masks as many.
    num_masked = int(output.temporal_mask.sum())
    batch_size, seq_len = output.logits.shape[:2]
    assert num_masked == output.num_targets == batch_size * seq_len > 0

    quantizer_output = output.quantizer_output
    assert quantizer_output.codes.shape == (batch_size, seq_len, num_codebooks)
    assert quantizer_output.hard_perplexity.shape == (num_codebooks,)
    assert output.code_usage.shape == (num_codebooks,)

    # Batch usage counts distinct codes per codebook.
    for g in range(num_codebooks):
        num_used = quantizer_output.codes[..., g].unique().numel()
        assert output.code_usage[g].item() == pytest.approx(num_used / quantizer_config.codebook_size)  # fmt: skip

    if method.startswith(SMOOTHED_PREFIXES):
        assert quantizer_output.soft_perplexity is not None
        assert quantizer_output.temperature is not None
    else:
        assert quantizer_output.temperature is None

    # The regularizer is scaled by the number of masked frames, like fairseq2's
    # diversity loss, and the aggregate adds the default feature penalty weight.
    assert loss.regularizer.item() == pytest.approx(quantizer_output.loss.item() * num_masked, rel=1e-5)  # fmt: skip
    expected_aggregate = loss.contrastive + config.regularizer_weight * loss.regularizer + 10.0 * loss.features_penalty  # fmt: skip
    assert loss.aggregate.item() == pytest.approx(expected_aggregate.item(), rel=1e-5)

    for value in (loss.aggregate, loss.contrastive, loss.regularizer, loss.features_penalty):
        assert torch.isfinite(value)

    loss.aggregate.backward()

    codebook = model.quantizer.codebook
    codebook_parameter = codebook.projection if method == "simvq" else codebook.weight

    assert isinstance(codebook_parameter, torch.nn.Parameter) and codebook_parameter.grad is not None
    assert torch.isfinite(codebook_parameter.grad).all()
    assert codebook_parameter.grad.abs().sum() > 0

    # tiny_1x1024 projects the 64-dim features to its 32-dim codebook; tiny_2x320
    # splits them into two 32-dim halves without a projection.
    if arch == "tiny_1x1024":
        assert model.quantizer.input_proj is not None
        assert model.quantizer.input_proj.weight.grad.abs().sum() > 0
    else:
        assert model.quantizer.input_proj is None

    # The regularizer and contrastive loss reach the CNN through the targets.
    feature_layer = model.encoder_frontend.feature_extractor.layers[0].conv
    assert feature_layer.weight.grad.abs().sum() > 0

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(hub, dtype: torch.dtype) -> None:
    model = _build(hub, _tiny("tiny_2x320"))

    seqs, layout = _batch()

    with torch.autocast(device_type="cpu", dtype=dtype):
        loss, output = model(seqs, layout)

    assert output.quantized_targets.dtype == dtype
    assert output.quantizer_output.quantized.dtype == torch.float32
    assert output.logits.dtype == torch.float32
    assert torch.isfinite(loss.aggregate)

    loss.aggregate.backward()

    grad = model.quantizer.codebook.weight.grad
    assert isinstance(grad, torch.Tensor)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_eval_codes_feed_codebook_usage(hub) -> None:
    model = _build(hub, _tiny("tiny_2x320"))

    model.eval()

    with torch.no_grad():
        _, output = _run(model)

    usage = CodebookUsage(num_codebooks=2, codebook_size=320)

    usage.update(output.quantizer_output.codes)

    report = usage.compute()

    assert torch.allclose(report.usage.float(), output.code_usage)
    assert report.per_sample_usage.shape == (2, 2)


# --- checkpoints -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny_1x1024", "tiny_2x320"])
def test_state_dict_round_trips_strictly(hub, arch: str) -> None:
    source = _build(hub, _tiny(arch), seed=0)
    target = _build(hub, _tiny(arch), seed=1)

    target.load_state_dict(source.state_dict(), strict=True)

    for mode in ("train", "eval"):
        source.train(mode == "train")
        target.train(mode == "train")

        with torch.no_grad():
            source_loss, source_output = _run(source)
            target_loss, target_output = _run(target)

        assert torch.equal(source_loss.aggregate, target_loss.aggregate)
        assert torch.equal(source_output.logits, target_output.logits)
        assert torch.equal(source_output.quantizer_output.codes, target_output.quantizer_output.codes)  # fmt: skip


_SUBPROCESS_ENV = {"TORCHDYNAMO_DISABLE": "1", "FAIRSEQ2_NO_PROGRESS": "1"}
"""Beside :func:`tests.cli.recipe_env`: no compilation, no progress bars."""


_LOAD_BY_NAME = """
import sys
import torch
from fairseq2.models import load_model
from fairseq2.nn import BatchLayout

# The test process's thread count, so that the sums are taken in the same order.
torch.set_num_threads(int(sys.argv[4]))

model = load_model(sys.argv[1], device=torch.device("cpu"))
model.eval()

seqs = torch.load(sys.argv[2])
torch.manual_seed(7)
with torch.no_grad():
    loss, output = model(seqs, BatchLayout(seqs.shape, seq_lens=[16000, 12800]))

torch.save({"type": type(model).__name__, "logits": output.logits, "codes": output.quantizer_output.codes}, sys.argv[3])
"""


@pytest.mark.e2e
def test_save_and_load_by_name_reproduces_outputs(hub, tmp_path: Path) -> None:
    model = _build(hub, _tiny("tiny_1x1024"), seed=3)

    # One training step, so that the loaded weights differ from any new model.
    loss, _ = _run(model)
    loss.aggregate.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.sub_(0.01 * parameter.grad)

    model.eval()

    with torch.no_grad():
        _, expected = _run(model)

    torch.save(model.state_dict(), tmp_path / "tiny.pt")

    card_dir = tmp_path / "cards"
    card_dir.mkdir()

    (card_dir / "trained.yaml").write_text(
        f"name: trained_tiny_1x1024\nbase: wav2vec2_knnvq_tiny_1x1024\ncheckpoint: file://{tmp_path / 'tiny.pt'}\n"
    )

    seqs, _ = _batch()
    torch.save(seqs, tmp_path / "seqs.pt")

    run_recipe_command(
        [
            sys.executable,
            "-c",
            _LOAD_BY_NAME,
            "trained_tiny_1x1024",
            str(tmp_path / "seqs.pt"),
            str(tmp_path / "out.pt"),
            str(torch.get_num_threads()),
        ],
        env=_SUBPROCESS_ENV | {"FAIRSEQ2_USER_ASSET_DIR": str(card_dir)},
    )

    loaded = torch.load(tmp_path / "out.pt")

    assert loaded["type"] == "Wav2Vec2KnnVqModel"
    assert torch.equal(loaded["logits"], expected.logits)
    assert torch.equal(loaded["codes"], expected.quantizer_output.codes)


def test_arch_card_without_checkpoint_creates_a_new_model(hub) -> None:
    config = hub.get_model_config("wav2vec2_knnvq_tiny_2x320")

    assert config.quantizer.num_codebooks == 2 and config.quantizer.codebook_size == 320

    model = hub.create_new_model(config, device=torch.device("cpu"))

    assert isinstance(model, Wav2Vec2KnnVqModel)

    # fairseq2 treats a card without weights as gated.
    with pytest.raises(ModelGatedError):
        hub.load_model("wav2vec2_knnvq_tiny_2x320", device=torch.device("cpu"))


def test_checkpoint_of_another_arch_is_refused(hub, tmp_path: Path) -> None:
    path = tmp_path / "tiny_2x320.pt"

    torch.save(_build(hub, _tiny("tiny_2x320")).state_dict(), path)

    with pytest.raises(Wav2Vec2KnnVqCheckpointError) as error:
        hub.load_custom_model(path, _tiny("tiny_1x1024"), device=torch.device("cpu"))

    message = str(error.value)
    assert "architecture tiny_2x320" in message
    assert "architecture tiny_1x1024" in message
    assert "quantizer.codebook.weight" in message


def test_checkpoint_of_another_method_is_refused(hub, tmp_path: Path) -> None:
    path = tmp_path / "simvq.pt"

    torch.save(_build(hub, _tiny("tiny_1x1024", "simvq")).state_dict(), path)

    with pytest.raises(Wav2Vec2KnnVqCheckpointError) as error:
        hub.load_custom_model(path, _tiny("tiny_1x1024"), device=torch.device("cpu"))

    message = str(error.value)
    assert "tiny_1x1024 with a SimVQ quantizer" in message
    assert "quantizer.method softmax-knn-ce" in message


def test_stock_wav2vec2_checkpoint_is_refused(hub, tmp_path: Path) -> None:
    config = _tiny("tiny_2x320")

    stock_config = Wav2Vec2Config(
        encoder_config=config.encoder_config,
        final_dim=config.final_dim,
        quantized_dim=config.quantizer.output_dim,
        num_codebooks=2,
        num_codebook_entries=320,
    )

    path = tmp_path / "wav2vec2.pt"

    torch.save({"model": create_wav2vec2_model(stock_config).state_dict()}, path)

    with pytest.raises(Wav2Vec2KnnVqCheckpointError) as error:
        hub.load_custom_model(path, config, device=torch.device("cpu"))

    message = str(error.value)
    assert "wav2vec2 model with a Gumbel quantizer" in message
    assert "wav2vec2_knnvq model (architecture tiny_2x320" in message


def test_wav2vec2_asr_checkpoint_is_refused(hub, tmp_path: Path) -> None:
    config = _tiny("tiny_2x320")

    asr_config = Wav2Vec2AsrConfig(encoder_config=config.encoder_config, target_vocab_size=12)

    path = tmp_path / "asr.pt"

    torch.save(get_wav2vec2_asr_model_hub().create_new_model(asr_config, device=torch.device("cpu")).state_dict(), path)  # fmt: skip

    with pytest.raises(Wav2Vec2KnnVqCheckpointError) as error:
        hub.load_custom_model(path, config, device=torch.device("cpu"))

    message = str(error.value)
    assert "without a quantizer, such as a wav2vec2_asr model" in message
    assert "wav2vec2_knnvq model (architecture tiny_2x320" in message


# --- fairseq2 integration ----------------------------------------------------------


@pytest.mark.e2e
def test_extension_registers_cards_through_the_entry_point(hub) -> None:
    result = run_recipe_command(
        [sys.executable, "-m", "fairseq2.assets", "list", "--kind", "model"], env=_SUBPROCESS_ENV | {"COLUMNS": "200"}
    )

    output = result.stdout + result.stderr

    assert "w2v_knnvq.extension:setup_w2v_knnvq extension registered successfully" in " ".join(output.split())  # fmt: skip

    for arch in WAV2VEC2_KNNVQ_ARCHS:
        assert f"model:wav2vec2_knnvq_{arch}@" in output


def test_encoder_loads_into_wav2vec2_asr(hub) -> None:
    pretrained = _build(hub, _tiny("tiny_1x1024"), seed=5)

    asr_config = Wav2Vec2AsrConfig(encoder_config=_tiny("tiny_1x1024").encoder_config, target_vocab_size=12)  # fmt: skip

    asr = get_wav2vec2_asr_model_hub().create_new_model(asr_config, device=torch.device("cpu"))

    asr.encoder_frontend.load_state_dict(pretrained.encoder_frontend.state_dict(), strict=True)
    asr.encoder.load_state_dict(pretrained.encoder.state_dict(), strict=True)

    pretrained.eval()
    asr.eval()

    seqs, layout = _batch()

    def encode(model: torch.nn.Module) -> torch.Tensor:
        features, features_layout, _ = model.encoder_frontend.extract_features(seqs, layout)

        features, _ = model.encoder_frontend.process_features(features, features_layout)

        return model.encoder(features, features_layout)

    with torch.no_grad():
        assert torch.equal(encode(pretrained), encode(asr))


def test_regularizer_weight_scales_only_the_regularizer(hub) -> None:
    config = _tiny("tiny_1x1024")

    config.regularizer_weight = 0.0

    unweighted = _build(hub, config)

    config.regularizer_weight = 2.5

    weighted = _build(hub, config)

    loss0, _ = _run(unweighted)
    loss1, _ = _run(weighted)

    assert torch.equal(loss0.contrastive, loss1.contrastive)
    assert loss1.aggregate.item() - loss0.aggregate.item() == pytest.approx(2.5 * loss1.regularizer.item(), rel=1e-4)  # fmt: skip
    assert math.isfinite(loss1.regularizer.item()) and loss1.regularizer.item() > 0


def test_distractors_come_from_other_frames_of_the_same_utterance(hub) -> None:
    model = hub.create_new_model(_tiny("tiny_2x320"), meta=False)
    model.num_distractors = 50

    # Frame i of row n holds the value 10 n + i in every dimension, so a distractor names its source.
    targets = (10.0 * torch.arange(3).view(3, 1, 1) + torch.arange(6).view(1, 6, 1)).expand(3, 6, 4)

    torch.manual_seed(0)
    distractors = model._sample_distractors(targets)

    assert distractors.shape == (3, 6, 50, 4)

    source = distractors[..., 0]
    row = (source // 10).long()
    frame = (source % 10).long()

    assert torch.equal(row, torch.arange(3).view(3, 1, 1).expand_as(row))
    assert not (frame == torch.arange(6).view(1, 6, 1)).any()
    assert set(frame.unique().tolist()) == set(range(6))


def test_a_distractor_equal_to_its_target_is_masked(hub) -> None:
    model = hub.create_new_model(_tiny("tiny_2x320"), meta=False)
    model.num_distractors = 4

    # All targets equal: every distractor equals its target and scores -inf; the target scores 1/t.
    seqs = torch.ones(2, 5, 8)
    targets = torch.ones(2, 5, 8)

    logits = model.contrastive_logits(seqs, targets)

    assert logits.shape == (2, 5, 5)
    assert torch.allclose(logits[:, :, 0], torch.full((2, 5), 1.0 / model.logit_temp))
    assert torch.isinf(logits[:, :, 1:]).all() and (logits[:, :, 1:] < 0).all()
