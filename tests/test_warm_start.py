"""Continued pretraining: a new run starts from the CNN and Transformer of a fairseq2
``wav2vec2`` model with a fresh quantizer (``init_from``)."""

from __future__ import annotations

import os

# Before fairseq2 starts: a failing extension must raise, and the stock Gumbel
# quantizer must not call `torch.compile`.
os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fairseq2.runtime.dependency import get_dependency_resolver

from recipes.wav2vec2_knnvq.ssl.warm_start import InitFromSection
from tests.cli import recipe_command, run_recipe_command
from tests.stock_wav2vec2 import STOCK_CARD, create_stock_model, tiny_stock_config, write_stock_card, write_stock_run
from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS, Wav2Vec2KnnVqModel, create_wav2vec2_knnvq_model
from w2v_knnvq.wav2vec2.warm_start import ENCODER_PREFIXES, WarmStartError, copy_pretrained_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

TINY_CPU_CONFIG = REPO_ROOT / "recipes" / "wav2vec2_knnvq" / "ssl" / "configs" / "tiny_cpu.yaml"


def _ours(arch: str = "tiny_2x320", seed: int = 0) -> Wav2Vec2KnnVqModel:
    get_dependency_resolver()

    torch.manual_seed(seed)

    return create_wav2vec2_knnvq_model(WAV2VEC2_KNNVQ_ARCHS[arch]())


def _state(model: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if key.startswith(prefixes)}


def test_copies_encoder_and_projections_but_not_the_quantizer() -> None:
    stock = create_stock_model(tiny_stock_config(), seed=3)

    model = _ours()

    quantizer_before = _state(model, ("quantizer.",))

    summary = copy_pretrained_encoder(model, stock.state_dict(), source="stock")

    copied = ENCODER_PREFIXES + ("final_proj.", "final_target_proj.")

    ours = _state(model, copied)

    assert ours and ours.keys() == _state(stock, copied).keys()
    assert all(torch.equal(ours[key], stock.state_dict()[key]) for key in ours)

    quantizer_after = _state(model, ("quantizer.",))
    assert all(torch.equal(quantizer_after[key], value) for key, value in quantizer_before.items())

    assert summary.fresh_parts == ["quantizer"]
    assert summary.copied_parts[:2] == [
        "encoder_frontend.feature_extractor",
        "encoder_frontend.post_extract_layer_norm",
    ]
    assert {"encoder", "masker.temporal_mask_embed", "final_proj", "final_target_proj"} <= set(summary.copied_parts)
    assert summary.num_copied_tensors == len(ours)


def test_a_projection_of_another_shape_stays_fresh() -> None:
    # A 1x1024 quantizer of 32 dimensions feeds `final_target_proj` 32 inputs, the stock 2x32 one 64.
    stock = create_stock_model(tiny_stock_config(), seed=3)

    model = _ours("tiny_1x1024")

    target_proj_before = model.final_target_proj.weight.clone()

    summary = copy_pretrained_encoder(model, stock.state_dict(), source="stock")

    assert torch.equal(model.final_target_proj.weight, target_proj_before)
    assert torch.equal(model.final_proj.weight, stock.final_proj.weight)
    key = "encoder.layers.1.ffn.inner_proj.weight"
    assert torch.equal(model.state_dict()[key], stock.state_dict()[key])

    assert summary.fresh_parts == [
        "quantizer",
        "final_target_proj (`final_target_proj.weight` has shape (32, 64) in the pretrained model but (32, 32) in this one)",
    ]


def test_another_encoder_is_refused_with_both_shapes_and_the_fix() -> None:
    wide = tiny_stock_config()
    wide.encoder_config = replace(wide.encoder_config, ffn_inner_dim=256)

    model = _ours()

    with pytest.raises(WarmStartError) as caught:
        copy_pretrained_encoder(model, create_stock_model(wide, seed=3).state_dict(), source="wide.pt")

    message = str(caught.value)

    assert "The encoder of the pretrained model wide.pt does not fit" in message
    assert "`encoder.layers.0.ffn.inner_proj.weight` has shape (256, 64) in the pretrained model but (128, 64) in this one" in message  # fmt: skip
    assert "(and 3 more)" in message
    assert "No architecture of this family matches it" in message
    assert caught.value.matching_archs == []

    # The other way round, the registered tiny architectures fit the pretrained model.
    wide_ours = WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]()
    wide_ours.encoder_config = replace(wide_ours.encoder_config, ffn_inner_dim=256)

    with pytest.raises(WarmStartError, match="matches it: tiny_1x1024 or tiny_2x320"):
        copy_pretrained_encoder(
            create_wav2vec2_knnvq_model(wide_ours), create_stock_model(tiny_stock_config(), 3).state_dict(), source="s"
        )


def test_section_names_one_model() -> None:
    assert not InitFromSection().validate().has_error()
    assert not InitFromSection(path=Path("run"), step=4).validate().has_error()

    both = InitFromSection(name="wav2vec2_base", path=Path("run")).validate()
    assert both.has_error() and "At most one of `name` and `path`" in str(both)

    assert InitFromSection(name="wav2vec2_base", step=4).validate().has_error()


@pytest.fixture(scope="module")
def stock_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """The manifests of the mini corpus, and one stock model as an asset card and as a run."""
    root = tmp_path_factory.mktemp("warm_start")

    for split, name in (("train", "train"), ("dev", "valid")):
        make_manifest(
            ManifestConfig(
                corpus_dir=MINISPEECH, splits=[split], output_dir=root / "manifests", name=name, show_progress=False
            )
        )

    config = tiny_stock_config()

    stock = create_stock_model(config, seed=3)

    card_file = write_stock_card(root / "cards", stock, config)

    run_dir = write_stock_run(root / "stock_run", stock, config)

    return root / "manifests", card_file.parent, run_dir, stock.state_dict()


def _launch(
    output_dir: Path, manifest_dir: Path, num_steps: int, *overrides: str, expected_returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    # A learning rate of 0 keeps the weights of step 0 until the checkpoint of step 2.
    command = recipe_command(
        "recipes.wav2vec2_knnvq.ssl",
        output_dir,
        [
            f"dataset.config_overrides.manifest_dir={manifest_dir}",
            "dataset.valid_split=null",
            f"regime.num_steps={num_steps}",
            "regime.checkpoint_every_n_steps=2",
            "regime.publish_metrics_every_n_steps=2",
            "lr_scheduler.name=passthrough",
            "lr_scheduler.config=null",
            "optimizer.config.lr=0.0",
            *overrides,
        ],
        config_file=TINY_CPU_CONFIG,
    )

    return run_recipe_command(command, expected_returncode=expected_returncode)


@pytest.mark.e2e
def test_recipe_starts_from_a_stock_card_and_resumes_from_its_own_checkpoint(stock_sources, tmp_path: Path) -> None:
    manifest_dir, card_dir, _, stock_state = stock_sources

    output_dir = tmp_path / "run"

    init = [f"init_from.name={STOCK_CARD}", f"common.assets.extra_paths=[{card_dir}]"]

    first = _launch(output_dir, manifest_dir, 2, *init)

    log = first.stdout + first.stderr
    assert f"Initialized the model from {STOCK_CARD}: copied encoder_frontend.feature_extractor" in log
    assert "final_target_proj (53 tensors); freshly initialized: quantizer." in log

    checkpoint = torch.load(
        output_dir / "checkpoints" / "step_2" / "model" / "pp_00" / "tp_00" / "sdp_00.pt", weights_only=True
    )

    shared = [key for key in checkpoint if not key.startswith("quantizer.")]

    assert len(shared) == 53
    assert all(torch.equal(checkpoint[key], stock_state[key]) for key in shared)
    assert not any(key in stock_state for key in checkpoint if key.startswith("quantizer."))

    resumed = _launch(output_dir, manifest_dir, 4, *init)

    log = resumed.stdout + resumed.stderr
    assert "The run resumes from its own checkpoint; `init_from` applies to its first start only." in log
    assert "Initialized the model from" not in log


@pytest.mark.e2e
def test_recipe_refuses_a_run_of_another_encoder(stock_sources, tmp_path: Path) -> None:
    manifest_dir, _, run_dir, _ = stock_sources

    result = _launch(
        tmp_path / "run",
        manifest_dir,
        2,
        f"init_from.path={run_dir}",
        "model.config_overrides.encoder_config.ffn_inner_dim=256",
        expected_returncode=2,
    )

    log = result.stdout + result.stderr
    assert f"`init_from`: the encoder of the pretrained model {run_dir / 'checkpoints' / 'step_2' / 'model'}" in log
    assert "`encoder.layers.0.ffn.inner_proj.weight` has shape (128, 64) in the pretrained model but (256, 64) in this one" in log  # fmt: skip
    assert "Set `model.arch` to an architecture that matches it: tiny_1x1024 or tiny_2x320." in log


def test_model_sections_check_their_step() -> None:
    from recipes.wav2vec2_knnvq.asr.pretrained import PretrainedEncoderSection
    from recipes.wav2vec2_knnvq.ssl.warm_start import InitFromSection

    for section_kls in (InitFromSection, PretrainedEncoderSection):
        assert not section_kls(path=Path("run"), step=3).validate().has_error()

        assert "`step` can only be specified with `path`" in str(section_kls(name="model", step=3).validate())

        assert "`step` must be at least 1, but is 0 instead" in str(section_kls(path=Path("run"), step=0).validate())
