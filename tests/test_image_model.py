"""The image autoencoder: architectures of Table 4, shapes, losses, fairseq2 family and cards."""

from __future__ import annotations

import pytest
import torch

from fairseq2.error import InvalidOperationError
from fairseq2.runtime.dependency import DependencyContainer, get_dependency_resolver
from fairseq2.utils.validation import ValidationError

from w2v_knnvq.image import (
    IMAGE_VQAE_ARCHS,
    ImageVqaeModel,
    create_image_vqae_model,
    get_image_vqae_config,
    get_image_vqae_model_hub,
    register_image_vqae,
)
from w2v_knnvq.quantizer import QuantizerConfig

# (latent size, latent channels, codebook size) documented in Table 4.
DOCUMENTED_LATENTS = {
    "f16_c32_m1024": (16, 32, 1024),
    "f64_c3_m8196": (64, 3, 8196),
    "f64_c32_m8196": (64, 32, 8196),
    "f64_c2048_m8196": (64, 2048, 8196),
    "tiny": (8, 8, 64),
}


def test_archs_match_table_4() -> None:
    assert set(IMAGE_VQAE_ARCHS) == set(DOCUMENTED_LATENTS)

    config = get_image_vqae_config("f16_c32_m1024")
    assert config.stage_channels == [128, 128, 64, 64, 32, 32]
    assert config.stage_sizes == [256, 128, 64, 32, 16, 16]

    config = get_image_vqae_config("f64_c2048_m8196")
    assert config.stage_channels == [128, 64, 32, 2048]
    assert config.stage_sizes == [256, 128, 64, 64]
    assert (config.image_size, config.stem_channels) == (256, 256)


@pytest.mark.parametrize("arch", list(DOCUMENTED_LATENTS))
def test_arch_maps_images_to_documented_latents_and_back(arch: str) -> None:
    size, channels, codebook_size = DOCUMENTED_LATENTS[arch]

    config = get_image_vqae_config(arch)
    assert config.quantizer.input_dim == config.quantizer.codebook_dim == channels
    assert config.quantizer.codebook_size == codebook_size
    assert config.quantizer.num_codebooks == 1

    # Encoder and decoder at full size on the meta device (no memory, no compute).
    with torch.device("meta"):
        model = create_image_vqae_model(config)

    images = torch.empty((2, 3, config.image_size, config.image_size), device="meta")

    latents = model.encode(images)
    assert latents.shape == (2, channels, size, size)

    reconstruction = model.decode(latents.permute(0, 2, 3, 1))
    assert reconstruction.shape == images.shape

    # The quantizer maps latent pixels to codes; a few real pixels suffice on CPU.
    quantizer = create_image_vqae_model(config).quantizer.eval()

    output = quantizer(torch.randn(1, 2, 3, channels))
    assert output.quantized.shape == (1, 2, 3, channels)
    assert output.codes.shape == (1, 2, 3, 1)
    assert int(output.codes.max()) < codebook_size


def test_every_conv_but_input_and_output_is_depthwise_separable() -> None:
    model = create_image_vqae_model(get_image_vqae_config("tiny"))

    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}

    full = {name for name, conv in convs.items() if conv.groups == 1 and conv.kernel_size == (3, 3)}
    assert full == {"encoder.stem", "decoder.output"}

    for name, conv in convs.items():
        assert conv.kernel_size in ((3, 3), (1, 1)), name
        if name.endswith("depthwise"):
            assert conv.groups == conv.in_channels == conv.out_channels


@pytest.mark.parametrize("method", ["softmax-knn-ce", "ste-euclid", "hg-ppl"])
def test_tiny_model_trains_on_cpu(method: str) -> None:
    torch.manual_seed(0)

    config = get_image_vqae_config("tiny")
    config.quantizer.method = method

    model = create_image_vqae_model(config).train()

    images = torch.rand(4, 3, 32, 32) * 2 - 1

    output = model(images)

    assert output.reconstruction.shape == images.shape
    assert output.quantizer_output.codes.shape == (4, 8, 8, 1)

    expected_mse = torch.mean((output.reconstruction - images) ** 2)
    torch.testing.assert_close(output.reconstruction_loss, expected_mse)
    torch.testing.assert_close(output.loss, output.reconstruction_loss + output.quantizer_output.loss)

    output.loss.backward()

    assert model.encoder.stem.weight.grad is not None
    assert model.encoder.stem.weight.grad.abs().sum() > 0
    assert model.decoder.output.weight.grad.abs().sum() > 0


def test_eval_mode_quantizes_hard() -> None:
    model = create_image_vqae_model(get_image_vqae_config("tiny")).eval()

    with torch.no_grad():
        output = model(torch.rand(2, 3, 32, 32) * 2 - 1)

    codebook_rows = {tuple(v.tolist()) for v in output.quantizer_output.quantized.reshape(-1, 8)}
    assert len(codebook_rows) <= 64


def test_config_errors_are_clear() -> None:
    config = get_image_vqae_config("tiny")
    config.quantizer = QuantizerConfig(input_dim=16, codebook_dim=16, codebook_size=64)

    with pytest.raises(ValidationError, match=r"input_dim.*latent channels 8"):
        create_image_vqae_model(config)

    config = get_image_vqae_config("tiny")
    config.stage_sizes = [32, 8, 8]

    with pytest.raises(ValidationError, match="halve"):
        create_image_vqae_model(config)

    config = get_image_vqae_config("tiny")
    config.quantizer.method = "bogus"

    assert "`quantizer.method` must be one of ste-euclid, " in str(config.validate())

    with pytest.raises(ValueError, match=r"`arch` must be an image autoencoder architecture .*, but is 'f8' instead"):
        get_image_vqae_config("f8")

    model = create_image_vqae_model(get_image_vqae_config("tiny"))
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64))


def test_extension_registers_the_family_and_its_archs() -> None:
    # fairseq2's start-up runs the w2v-knnvq extension, which registers the family.
    container = get_dependency_resolver()

    assert isinstance(container, DependencyContainer)

    # So a recipe that registered it again would fail at start-up (and register nothing); once
    # another test has resolved from the container, it refuses any registration first.
    with pytest.raises(InvalidOperationError, match=r"already a registered provider|No new objects can be registered"):
        register_image_vqae(container)

    hub = get_image_vqae_model_hub()

    assert set(IMAGE_VQAE_ARCHS) <= set(hub.get_archs())

    config = hub.get_arch_config("f64_c32_m8196")
    assert (config.latent_size, config.latent_channels) == (64, 32)

    model = hub.create_new_model(hub.get_arch_config("tiny"), device=torch.device("cpu"))

    assert isinstance(model, ImageVqaeModel)
    assert model.config.quantizer.codebook_size == 64


def test_architecture_cards_name_every_arch() -> None:
    get_dependency_resolver()  # starts fairseq2 with its extensions

    hub = get_image_vqae_model_hub()

    for arch in IMAGE_VQAE_ARCHS:
        assert hub.get_model_config(f"image_vqae_{arch}") == get_image_vqae_config(arch)


def test_rmse_in_imagenet_standardized_pixels() -> None:
    from w2v_knnvq.image.metrics import IMAGENET_STD, RootMeanSquaredError

    target = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.full_like(target, 0.5)

    plain, standardized = RootMeanSquaredError(), RootMeanSquaredError(imagenet_standardized=True)

    plain.update(reconstruction, target)
    standardized.update(reconstruction, target)

    assert plain.compute() == pytest.approx(0.5)

    # An error of 0.5 on [-1, 1] is 0.25 on [0, 1], then divided by each channel's std.
    expected = (sum((0.25 / std) ** 2 for std in IMAGENET_STD) / 3) ** 0.5
    assert standardized.compute() == pytest.approx(expected)
