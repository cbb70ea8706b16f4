"""The paper's formulas on small inputs whose results are written down by hand."""

from __future__ import annotations

import math

import pytest
import torch

from w2v_knnvq.quantizer import (
    commitment_codebook_loss,
    knn_loss,
    perplexity,
    perplexity_loss,
    rotation_trick,
    straight_through,
)
from w2v_knnvq.quantizer.assign import cosine_logits, gumbel_softmax, nearest_codes

PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)


def test_knn_ce_takes_largest_probability_per_vertex() -> None:
    # Vertex e_0: nearest by -log p_0 are rows 0 (0.9), 1 (0.6); vertex e_1: rows 2 (0.8), 1 (0.4).
    k1 = knn_loss(PROBS.log(), 1, "ce").loss
    k2 = knn_loss(PROBS.log(), 2, "ce").loss

    assert k1.item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)
    assert k2.item() == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.4)) / 4)


def test_knn_l2_takes_smallest_squared_distance_per_vertex() -> None:
    # |e_0 - p|^2 per row: 0.02, 0.32, 1.28; |e_1 - p|^2: 1.62, 0.72, 0.08.
    assert knn_loss(PROBS.log(), 1, "l2").loss.item() == pytest.approx((0.02 + 0.08) / 2)
    assert knn_loss(PROBS.log(), 2, "l2").loss.item() == pytest.approx((0.02 + 0.32 + 0.08 + 0.72) / 4)


def test_knn_l2_counts_the_whole_vector_not_only_p_m() -> None:
    # Same p_0 = 0.5, different spread of the rest: |e_0 - p|^2 = 0.25 + 0.09 + 0.04 = 0.38
    # against 0.25 + 0.25 + 0 = 0.50.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.5, 0.0]], dtype=torch.float64)
    log_probs = probs.log()

    # Vertex e_0 picks row 0 (0.38 < 0.50); e_1 picks row 1 (0.25 + 0.25 = 0.5 < 0.25 + 0.49 + 0.04);
    # e_2 picks row 0 (0.25 + 0.09 + 0.64 = 0.98 < 0.25 + 0.25 + 1.0).
    assert knn_loss(log_probs, 1, "l2").loss.item() == pytest.approx((0.38 + 0.50 + 0.98) / 3)


def test_knn_mask_excludes_samples_and_k_is_capped() -> None:
    mask = torch.tensor([False, True, True])

    # Without row 0, vertex e_0's nearest is row 1 (0.6).
    loss = knn_loss(PROBS.log(), 1, "ce", mask=mask).loss
    assert loss.item() == pytest.approx(-(math.log(0.6) + math.log(0.8)) / 2)

    # K larger than the batch uses every sample.
    assert knn_loss(PROBS.log(), 10, "ce").loss.item() == pytest.approx(-PROBS.log().mean().item())

    empty = knn_loss(PROBS.log(), 1, "ce", mask=torch.zeros(3, dtype=torch.bool)).loss
    assert empty.item() == 0.0


def test_knn_stays_finite_when_probabilities_underflow() -> None:
    logits = torch.tensor([[2000.0, 0.0, -2000.0], [0.0, 1.0, 2.0]], requires_grad=True)
    log_probs = torch.log_softmax(logits, dim=-1)

    for metric in ("ce", "l2"):
        loss = knn_loss(log_probs, 1, metric).loss
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)

        assert torch.isfinite(loss)
        assert torch.isfinite(grad).all()


def test_knn_gradient_moves_each_neighbour_toward_its_vertex() -> None:
    logits = torch.zeros(4, 3, requires_grad=True)

    knn_loss(torch.log_softmax(logits, dim=-1), 1, "ce").loss.backward()

    assert logits.grad is not None
    # Ties pick one row per vertex; each picked row is pushed toward its own vertex.
    for m in range(3):
        rows = (logits.grad[:, m] < 0).nonzero().flatten()
        assert len(rows) >= 1


def test_perplexity_loss_is_normalized_perplexity_of_batch_mean() -> None:
    # Mean (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335, ppl = 1.754765.
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)

    assert perplexity(probs).item() == pytest.approx(1.754765, abs=1e-6)
    assert perplexity_loss(probs).item() == pytest.approx(1.0 - 1.754765 / 2, abs=1e-6)

    # The minimum, zero, is a uniform batch mean, reached by onehot rows as well as by uniform ones.
    assert perplexity_loss(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-7)
    assert perplexity_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-7)

    # Collapse onto one code: ppl = 1.
    assert perplexity_loss(torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)).item() == pytest.approx(0.75)

    # The mask drops the second row: mean (1, 0), ppl 1.
    mask = torch.tensor([True, False])
    assert perplexity_loss(probs, mask=mask).item() == pytest.approx(0.5)


def test_commitment_codebook_loss_values_and_gradients() -> None:
    z = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)

    loss = commitment_codebook_loss(z, q, beta=0.25)

    # Row 0: 0.25 * 5 + 5; row 1: 0.25 * 1 + 1; mean over rows.
    assert loss.item() == pytest.approx((6.25 + 1.25) / 2)

    loss.backward()

    assert z.grad is not None and q.grad is not None
    # d/dz = beta * 2 (z - q) / N, d/dq = -2 (z - q) / N.
    torch.testing.assert_close(z.grad, torch.tensor([[0.25, 0.5], [0.0, 0.25]]))
    torch.testing.assert_close(q.grad, torch.tensor([[-1.0, -2.0], [0.0, -1.0]]))


def test_straight_through_forward_is_q_and_gradient_is_identity() -> None:
    z = torch.randn(5, 3, requires_grad=True)
    q = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)

    out = straight_through(q, z)
    torch.testing.assert_close(out, q)

    out.backward(g)
    assert z.grad is not None and q.grad is not None
    torch.testing.assert_close(z.grad, g)
    torch.testing.assert_close(q.grad, g)


def _rotation_matrix(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Footnote 1, written out as a dense matrix."""
    z_hat, q_hat = z / z.norm(), q / q.norm()
    r = q_hat + z_hat
    r_hat = r / r.norm()

    eye = torch.eye(z.numel(), dtype=z.dtype)

    return eye - 2.0 * torch.outer(r_hat, r_hat) + 2.0 * torch.outer(q_hat, z_hat)


def test_rotation_trick_forward_is_q_and_jacobian_is_scaled_rotation() -> None:
    generator = torch.Generator().manual_seed(0)

    for _ in range(5):
        z = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
        q = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
        g = torch.randn(6, generator=generator, dtype=torch.float64)

        out = rotation_trick(z, q)
        torch.testing.assert_close(out, q.detach())

        out.backward(g)

        rotation = _rotation_matrix(z.detach(), q.detach())

        # R is a proper rotation that maps z^ onto q^.
        torch.testing.assert_close(rotation @ rotation.t(), torch.eye(6, dtype=torch.float64))
        assert torch.linalg.det(rotation).item() == pytest.approx(1.0)

        expected = (q.norm() / z.norm()).detach() * rotation.t() @ g

        assert z.grad is not None
        torch.testing.assert_close(z.grad, expected)
        # The codebook side is detached (eq. 3).
        assert q.grad is None or torch.count_nonzero(q.grad) == 0


def test_rotation_trick_batched_matches_single() -> None:
    z = torch.randn(4, 2, 5, dtype=torch.float64)
    q = torch.randn(4, 2, 5, dtype=torch.float64)

    batched = rotation_trick(z, q)

    torch.testing.assert_close(batched, q)
    torch.testing.assert_close(rotation_trick(z[1, 1], q[1, 1]), batched[1, 1])


def test_cosine_logits_divide_cosine_similarity_by_temperature() -> None:
    z = torch.tensor([[[3.0, 4.0]]])  # (N=1, G=1, D=2), unit vector (0.6, 0.8)
    codebook = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]])

    logits = cosine_logits(z, codebook, torch.tensor(0.5))

    expected = torch.tensor([[[0.6, 0.8, -1.4 / math.sqrt(2.0)]]]) / 0.5
    torch.testing.assert_close(logits, expected)


def test_nearest_codes_euclidean_and_cosine_disagree_where_they_should() -> None:
    # z = (1, 0): Euclidean nearest is the short (0.9, 0.3); cosine nearest is the long (10, 0).
    z = torch.tensor([[[1.0, 0.0]]])
    codebook = torch.tensor([[[10.0, 0.0], [0.9, 0.3]]])

    assert nearest_codes(z, codebook, "euclidean").item() == 1
    assert nearest_codes(z, codebook, "cosine").item() == 0


def test_gumbel_softmax_soft_and_hard() -> None:
    logits = torch.randn(1000, 4, requires_grad=True)
    torch.manual_seed(0)

    soft, soft_codes = gumbel_softmax(logits, 1.0, hard=False)
    torch.testing.assert_close(soft.sum(-1), torch.ones(1000))
    assert (soft.argmax(-1) == soft_codes).all()

    hard, hard_codes = gumbel_softmax(logits, 1.0, hard=True)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert (hard.argmax(-1) == hard_codes).all()

    (hard * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0


def test_gumbel_samples_follow_the_assignment_probabilities() -> None:
    # argmax(g + log pi) ~ Categorical(pi) (eq. 6).
    pi = torch.tensor([0.5, 0.3, 0.2])
    logits = pi.log().expand(20000, 3)

    torch.manual_seed(1)

    _, codes = gumbel_softmax(logits, 1.0, hard=True)

    frequencies = torch.bincount(codes, minlength=3).float() / codes.numel()
    torch.testing.assert_close(frequencies, pi, atol=0.015, rtol=0.0)


def test_codebook_statistics_by_hand() -> None:
    from w2v_knnvq.quantizer import code_counts, code_perplexity, code_usage, individual_perplexity

    # Two samples of three frames, one codebook of four codes; the last frame of sample 1 is padding.
    codes = torch.tensor([[[0], [0], [2]], [[1], [3], [-1]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])

    counts = code_counts(codes, 4, mask)

    assert counts.tolist() == [[[2, 0, 1, 0]], [[0, 1, 0, 1]]]
    assert code_usage(counts).tolist() == [[0.5], [0.5]]
    assert code_usage(counts.sum(dim=0)).tolist() == [1.0]

    # Frequencies (2/3, 1/3): exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8899.
    assert code_perplexity(counts[0]).item() == pytest.approx(1.8899, abs=1e-4)
    assert code_perplexity(torch.zeros(1, 4, dtype=torch.int64)).item() == 1.0

    # An underflowed probability (log p = -inf) counts 0 log 0 = 0, not NaN.
    log_probs = torch.tensor([[0.0, -math.inf, -math.inf], [math.log(0.5), math.log(0.5), -math.inf]])

    assert individual_perplexity(log_probs).tolist() == pytest.approx([1.0, 2.0])


def test_codebook_usage_takes_perplexities_or_log_probabilities() -> None:
    from w2v_knnvq.quantizer import CodebookUsage, individual_perplexity

    torch.manual_seed(0)

    log_probs = torch.randn(3, 7, 2, 5).log_softmax(dim=-1)
    codes = log_probs.argmax(dim=-1)

    from_log_probs, from_perplexities = CodebookUsage(2, 5), CodebookUsage(2, 5)

    from_log_probs.update(codes, log_probs=log_probs)
    from_perplexities.update(codes, perplexity=individual_perplexity(log_probs))

    expected = from_log_probs.compute().perplexity_percentiles
    actual = from_perplexities.compute().perplexity_percentiles

    assert expected is not None and actual is not None
    assert torch.allclose(actual, expected)

    with pytest.raises(ValueError, match="`perplexity` must have shape"):
        from_perplexities.update(codes, perplexity=torch.ones(3, 7))
