"""The VectorQuantizer module: every method, shapes, modes, masks and numerics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from w2v_knnvq.quantizer import (
    METHOD_NAMES,
    METHODS,
    CodebookUsage,
    QuantizerConfig,
    VectorQuantizer,
    individual_perplexity,
    knn_loss,
    perplexity_loss,
)

SMOOTHED = [name for name in METHOD_NAMES if METHODS[name].smoothed]
HARD = [name for name in METHOD_NAMES if not METHODS[name].smoothed]


def make_quantizer(method: str, *, groups: int = 1, size: int = 16, **overrides: object) -> VectorQuantizer:
    config = QuantizerConfig.from_method(
        method, input_dim=12, num_codebooks=groups, codebook_size=size, codebook_dim=6, **overrides
    )
    return VectorQuantizer(config)


def test_fourteen_method_names() -> None:
    assert len(METHOD_NAMES) == 14
    assert METHOD_NAMES[0] == "ste-euclid" and METHOD_NAMES[-1] == "softmax-knn-ce"


def test_from_method_builds_combination_and_rejects_unknown() -> None:
    config = QuantizerConfig.from_method(
        "hg-knn-l2", input_dim=512, num_codebooks=2, codebook_size=320, codebook_dim=128, knn_k=4
    )
    assert config.spec.assignment == "gumbel-hard"
    assert config.spec.knn_metric == "l2"
    assert config.knn_k == 4
    assert config.output_dim == 256

    with pytest.raises(ValueError, match=r"`method` must be one of ste-euclid, .*, but is 'softmax-knn' instead\."):
        QuantizerConfig.from_method("softmax-knn", input_dim=4, num_codebooks=1, codebook_size=4, codebook_dim=4)

    with pytest.raises(TypeError, match="knn_kk"):
        QuantizerConfig.from_method("simvq", input_dim=4, num_codebooks=1, codebook_size=4, codebook_dim=4, knn_kk=3)


def test_input_projection_only_when_dimensions_differ() -> None:
    assert make_quantizer("softmax-knn-ce").input_proj is not None

    config = QuantizerConfig(input_dim=12, num_codebooks=2, codebook_size=8, codebook_dim=6)
    assert VectorQuantizer(config).input_proj is None


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("groups", [1, 2])
def test_output_shapes(method: str, groups: int) -> None:
    quantizer = make_quantizer(method, groups=groups)

    output = quantizer(torch.randn(3, 7, 12), return_probs=True)

    assert output.quantized.shape == (3, 7, groups * 6)
    assert output.quantized.dtype == torch.float32
    assert output.codes.shape == (3, 7, groups)
    assert output.codes.dtype == torch.int64
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert output.hard_perplexity.shape == (groups,)

    if METHODS[method].smoothed:
        assert output.probs is not None and output.log_probs is not None
        assert output.probs.shape == (3, 7, groups, 16)
        torch.testing.assert_close(output.probs.sum(-1), torch.ones(3, 7, groups))
        assert output.soft_perplexity is not None and output.soft_perplexity.shape == (groups,)
        assert output.temperature is not None
        assert output.temperature.item() == pytest.approx(0.1)
    else:
        assert output.probs is None and output.soft_perplexity is None


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_eval_mode_quantizes_hard_to_codebook_entries(method: str) -> None:
    quantizer = make_quantizer(method, groups=2).eval()

    x = torch.randn(10, 12)
    output = quantizer(x)

    codebook = quantizer.codebook().detach()
    if METHODS[method].distance == "cosine" and not METHODS[method].smoothed:
        codebook = normalize(codebook, dim=-1)

    expected = torch.cat([codebook[g, output.codes[:, g]] for g in range(2)], dim=-1)
    torch.testing.assert_close(output.quantized, expected)

    # Deterministic: no Gumbel noise in eval mode.
    torch.testing.assert_close(quantizer(x).quantized, output.quantized)


def test_smoothed_codes_are_argmax_of_cosine_logits() -> None:
    quantizer = make_quantizer("softmax-knn-ce", groups=1)

    x = torch.randn(20, 12)
    output = quantizer(x, return_probs=True)

    assert quantizer.input_proj is not None
    z = quantizer.input_proj(x)
    similarity = normalize(z, dim=-1) @ normalize(quantizer.codebook()[0], dim=-1).t()

    assert output.log_probs is not None
    torch.testing.assert_close(output.log_probs[:, 0], torch.log_softmax(similarity / 0.1, dim=-1))
    assert (output.codes[:, 0] == similarity.argmax(-1)).all()

    # Training quantized vector is the soft mixture Q^T p.
    assert output.probs is not None
    torch.testing.assert_close(output.quantized, output.probs[:, 0] @ quantizer.codebook()[0])


def test_softmax_knn_loss_is_eq13_averaged_over_codebooks() -> None:
    quantizer = make_quantizer("softmax-knn-l2", groups=2, knn_k=3)

    output = quantizer(torch.randn(40, 12), return_probs=True)

    assert output.log_probs is not None
    expected = (knn_loss(output.log_probs[:, 0], 3, "l2").loss + knn_loss(output.log_probs[:, 1], 3, "l2").loss) / 2
    torch.testing.assert_close(output.loss, expected)


def test_gumbel_regularizers_see_pi_not_noisy_samples() -> None:
    torch.manual_seed(0)
    softmax = make_quantizer("softmax-knn-ce")
    gumbel = make_quantizer("sg-knn-ce")
    gumbel.load_state_dict(softmax.state_dict())

    x = torch.randn(30, 12)

    # Same logits, different noise in the quantized vectors, identical regularizer.
    torch.testing.assert_close(gumbel(x).loss, softmax(x).loss)
    assert not torch.allclose(gumbel(x).quantized, softmax(x).quantized)


def test_hard_gumbel_forward_is_a_codebook_entry() -> None:
    quantizer = make_quantizer("hg-ppl")

    output = quantizer(torch.randn(25, 12))

    expected = quantizer.codebook()[0, output.codes[:, 0]]
    torch.testing.assert_close(output.quantized, expected)


def test_gumbel_tau_annealing() -> None:
    quantizer = make_quantizer("sg-ppl", gumbel_tau_anneal=(2.0, 0.5, 0.5))

    assert quantizer.gumbel_tau() == 2.0
    quantizer(torch.randn(4, 12))
    assert quantizer.gumbel_tau() == 1.0
    quantizer(torch.randn(4, 12))
    quantizer(torch.randn(4, 12))
    assert quantizer.gumbel_tau() == 0.5  # floored at min

    # Eval does not advance the schedule; the step is saved with the module.
    quantizer.eval()(torch.randn(4, 12))
    assert int(quantizer.state_dict()["gumbel_step"]) == 3

    assert make_quantizer("sg-ppl").gumbel_tau() == 1.0


@pytest.mark.parametrize("method", ["softmax-knn-ce", "softmax-ppl", "ste-euclid", "re-cosine"])
def test_padding_mask_equals_dropping_padded_vectors(method: str) -> None:
    quantizer = make_quantizer(method, groups=2)

    x = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False

    masked = quantizer(x, mask)
    dropped = quantizer(x[mask])

    torch.testing.assert_close(masked.loss, dropped.loss)
    torch.testing.assert_close(masked.hard_perplexity, dropped.hard_perplexity)
    torch.testing.assert_close(masked.quantized[mask], dropped.quantized)


def test_bad_input_is_reported() -> None:
    quantizer = make_quantizer("softmax-knn-ce")

    with pytest.raises(ValueError, match="dimension 12"):
        quantizer(torch.randn(3, 11))

    with pytest.raises(ValueError, match="padding_mask"):
        quantizer(torch.randn(3, 12), torch.ones(4, dtype=torch.bool))


def test_hard_perplexity_counts_codes() -> None:
    quantizer = make_quantizer("ste-euclid")

    codes = torch.tensor([[0], [0], [1], [2]])

    # Histogram (0.5, 0.25, 0.25): exp(H) = exp(1.5 ln 2) = 2^1.5.
    assert quantizer._hard_perplexity(codes, None).item() == pytest.approx(2**1.5)


def test_knn_reaches_every_codebook_entry_unlike_commitment_loss() -> None:
    """The paper's point (section 3): codebook entries that no sample picks still learn under KNN."""
    torch.manual_seed(0)

    # All inputs lie along one direction: a single code wins every argmax.
    x = torch.randn(1, 12).repeat(64, 1) + 0.01 * torch.randn(64, 12)

    knn = make_quantizer("softmax-knn-ce", size=32)
    knn_output = knn(x)
    knn_output.loss.backward()

    ste = make_quantizer("ste-euclid", size=32)
    ste_output = ste(x)
    ste_output.loss.backward()

    for output in (knn_output, ste_output):
        assert output.codes.unique().numel() < 32

    knn_grad = knn.codebook.weight.grad
    ste_grad = ste.codebook.weight.grad
    assert knn_grad is not None and ste_grad is not None

    unused_knn = torch.ones(32, dtype=torch.bool)
    unused_knn[knn_output.codes.unique()] = False
    unused_ste = torch.ones(32, dtype=torch.bool)
    unused_ste[ste_output.codes.unique()] = False

    assert (knn_grad[0, unused_knn].norm(dim=-1) > 0).all()
    assert (ste_grad[0, unused_ste].norm(dim=-1) == 0).all()


def _dirichlet(alpha: list[float], n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gammas = torch._standard_gamma(torch.tensor(alpha, dtype=torch.float64).expand(n, -1), generator)
    return (gammas / gammas.sum(-1, keepdim=True)).clamp_min(1e-12)


def test_figure_1_on_the_2_simplex() -> None:
    """Batch-mean perplexity cannot separate vertex-concentrated, uniform and centred samples;
    the KNN loss (K = 8) ranks the vertex-concentrated set lowest and penalizes collapse."""
    n = 300
    vertex = _dirichlet([0.1, 0.1, 0.1], n, 0)
    uniform = _dirichlet([1.0, 1.0, 1.0], n, 1)
    centred = _dirichlet([30.0, 30.0, 30.0], n, 2)
    collapsed = _dirichlet([30.0, 0.3, 0.3], n, 3)

    ppl = {
        name: perplexity_loss(p).item()
        for name, p in [("vertex", vertex), ("uniform", uniform), ("centred", centred), ("collapsed", collapsed)]
    }

    # Figure 1B: the three non-collapsed sets are all near the optimum, the collapsed one far off.
    assert max(ppl["vertex"], ppl["uniform"], ppl["centred"]) < 0.01
    assert ppl["collapsed"] > 0.3

    for metric in ("ce", "l2"):
        knn = {
            name: knn_loss(p.log(), 8, metric).loss.item()
            for name, p in [("vertex", vertex), ("uniform", uniform), ("centred", centred), ("collapsed", collapsed)]
        }

        # Figure 1C.
        assert knn["vertex"] < knn["uniform"] < knn["centred"]
        assert knn["collapsed"] > knn["uniform"]
        assert knn["vertex"] < 0.05 * knn["centred"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_a_toy_problem(method: str) -> None:
    """Autoencode 2-D clusters through the quantizer for a few steps: finite losses, the
    reconstruction improves, and gradients reach the encoder in front of the quantizer."""
    torch.manual_seed(0)

    centres = torch.randn(8, 12) * 3.0
    data = centres[torch.randint(8, (256,))] + 0.1 * torch.randn(256, 12)

    quantizer = make_quantizer(method, groups=2, size=8, knn_k=2)
    encoder = torch.nn.Linear(12, 12)
    decoder = torch.nn.Linear(12, 12)

    params = [*quantizer.parameters(), *encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)

    losses = []
    for _ in range(30):
        output = quantizer(encoder(data))
        reconstruction = (decoder(output.quantized) - data).square().mean()
        loss = reconstruction + output.loss

        optimizer.zero_grad()
        loss.backward()

        assert encoder.weight.grad is not None and torch.count_nonzero(encoder.weight.grad) > 0

        optimizer.step()

        assert torch.isfinite(loss)
        losses.append(reconstruction.item())

    assert min(losses[-5:]) < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["softmax-knn-ce", "hg-ppl", "ste-euclid", "re-euclid", "simvq"])
def test_autocast_keeps_quantizer_math_in_float32(dtype: torch.dtype, method: str) -> None:
    quantizer = make_quantizer(method)

    x = torch.randn(50, 12, requires_grad=True)

    with torch.autocast("cpu", dtype=dtype):
        output = quantizer(x, return_probs=True)

    assert output.quantized.dtype == torch.float32
    assert torch.isfinite(output.loss)
    if output.log_probs is not None:
        assert output.log_probs.dtype == torch.float32

    (output.quantized.sum() + output.loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_input_projection_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)

    config = QuantizerConfig.from_method(
        "softmax-knn-ce", input_dim=20, num_codebooks=2, codebook_size=16, codebook_dim=6
    )
    quantizer = VectorQuantizer(config)

    assert quantizer.input_proj is not None

    seen: list[torch.dtype] = []
    quantizer.input_proj.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    x = torch.randn(30, 20)

    with torch.autocast("cpu", dtype=dtype):
        autocast_output = quantizer(x)

    assert seen == [torch.float32]
    assert torch.allclose(autocast_output.quantized, quantizer(x).quantized, atol=1e-6)


def test_tiny_temperature_gives_no_nan() -> None:
    quantizer = make_quantizer("softmax-knn-ce", init_temperature=2e-3, min_temperature=1e-3)

    x = torch.randn(50, 12, requires_grad=True)
    output = quantizer(x)
    (output.quantized.sum() + output.loss).backward()

    assert torch.isfinite(output.loss) and x.grad is not None and torch.isfinite(x.grad).all()


def test_meta_device_construction() -> None:
    config = QuantizerConfig.from_method("simvq", input_dim=512, num_codebooks=2, codebook_size=320, codebook_dim=128)
    quantizer = VectorQuantizer(config, device=torch.device("meta"))

    assert all(p.is_meta for p in quantizer.parameters())
    # 512 x 256 projection + bias, 2 learnable 128 x 128 SimVQ matrices (the random basis is a buffer).
    assert sum(p.numel() for p in quantizer.parameters()) == 512 * 256 + 256 + 2 * 128 * 128


def test_codebook_usage_report_by_hand() -> None:
    usage = CodebookUsage(num_codebooks=2, codebook_size=4)

    codes = torch.tensor(
        [
            [[0, 1], [0, 1], [2, 1]],
            [[0, 3], [1, 3], [3, 0]],  # last frame is padding
        ]
    )
    mask = torch.tensor([[True, True, True], [True, True, False]])

    usage.update(codes, mask)
    usage.update(torch.tensor([[[1, 2]]]))

    report = usage.compute()

    # Codebook 0 used {0, 1, 2}; codebook 1 used {1, 3, 2} (code 0 only in padding).
    torch.testing.assert_close(report.usage, torch.tensor([0.75, 0.75], dtype=torch.float64))
    torch.testing.assert_close(
        report.per_sample_usage,
        torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.25, 0.25]], dtype=torch.float64),
    )
    torch.testing.assert_close(
        report.popularity,
        torch.tensor([[2, 2, 1, 0], [0, 1, 1, 1]], dtype=torch.float64) / 3,
    )
    assert report.code_counts.tolist() == [[3, 2, 1, 0], [0, 3, 1, 2]]
    assert report.perplexity_percentiles is None


def test_codebook_usage_perplexity_percentiles() -> None:
    usage = CodebookUsage(num_codebooks=1, codebook_size=4)

    # Individual perplexities 1 (onehot), 2 (two codes), 4 (uniform) and 4 again.
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.25] * 4]).reshape(1, 4, 1, 4)
    log_probs = probs.clamp_min(1e-30).log()

    usage.update(probs.argmax(-1), log_probs=log_probs)

    percentiles = usage.compute().perplexity_percentiles
    assert percentiles is not None

    expected = torch.quantile(torch.tensor([1.0, 2.0, 4.0, 4.0]), torch.tensor([0.75, 0.9, 0.99, 1.0]))
    torch.testing.assert_close(percentiles[0].float(), expected, atol=1e-4, rtol=0)


def test_codebook_usage_rejects_bad_input() -> None:
    usage = CodebookUsage(num_codebooks=1, codebook_size=4)

    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        usage.update(torch.tensor([[[4]]]))

    with pytest.raises(ValueError, match="empty"):
        usage.compute()


def test_individual_perplexity_of_uniform_is_m() -> None:
    assert individual_perplexity(torch.full((5,), math.log(0.2))).item() == pytest.approx(5.0)


@pytest.mark.parametrize("method", ["ste-euclid", "ste-cosine", "simvq", "re-euclid", "re-cosine"])
def test_hard_codebooks_learn_from_the_codebook_loss_only(method: str) -> None:
    quantizer = make_quantizer(method)
    x = torch.randn(30, 12, requires_grad=True)

    output = quantizer(x)
    output.quantized.square().sum().backward(retain_graph=True)

    # The main loss reaches the features, not the codebook (eq. 2-4).
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in quantizer.codebook.parameters())

    output.loss.backward()

    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in quantizer.codebook.parameters())


def test_temperature_stays_learnable_at_its_floor() -> None:
    quantizer = make_quantizer("softmax-knn-ce")

    with torch.no_grad():
        quantizer.log_temperature.fill_(-30.0)  # t = min_temperature + exp(-30)

    assert quantizer.temperature().item() == pytest.approx(quantizer.config.min_temperature)

    output = quantizer(torch.randn(40, 12))
    output.loss.backward()

    assert quantizer.log_temperature.grad is not None and quantizer.log_temperature.grad != 0


@pytest.mark.parametrize("method", ["ste-euclid", "simvq"])
def test_literal_eq_2_lets_the_main_loss_reach_the_chosen_entries(method: str) -> None:
    quantizer = make_quantizer(method, straight_through_codebook=True)
    x = torch.randn(30, 12)

    output = quantizer(x)

    # q + z - detach(z): d(sum q^2)/dq = 2q on each chosen entry, none on the others.
    output.quantized.square().sum().backward()

    grads = [p.grad for p in quantizer.codebook.parameters() if p.grad is not None]
    assert grads and any(torch.count_nonzero(grad) > 0 for grad in grads)

    if method == "ste-euclid":
        weight_grad = quantizer.codebook.weight.grad
        assert weight_grad is not None

        used = set(output.codes[:, 0].tolist())
        unused = [m for m in range(weight_grad.size(1)) if m not in used]
        assert torch.count_nonzero(weight_grad[0, unused]) == 0
