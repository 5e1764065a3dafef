"""Randomized eigendecomposition, damping and Woodbury against dense linear algebra."""

import pytest
import torch

from lorif_dist.factorize import densify, factorize
from lorif_dist.rsvd import damping_value, randomized_eigh, woodbury_precondition


def _low_rank_gram(num, dim, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, dim, generator=gen, dtype=torch.float64
    )
    return g, g.T @ g


@pytest.mark.parametrize("rank,oversample,power_iters", [(12, 0, 0), (8, 4, 0), (10, 6, 2)])
def test_randomized_eigh_is_exact_when_the_sketch_covers_the_rank(rank, oversample, power_iters):
    g, gram = _low_rank_gram(num=40, dim=30, rank=12, seed=rank)
    eig = randomized_eigh(
        lambda q: gram @ q, 30, rank, oversample, power_iters, seed=3, dtype=torch.float64
    )
    evals, evecs = torch.linalg.eigh(gram)
    top = torch.argsort(evals, descending=True)[:rank]
    torch.testing.assert_close(eig.singular_values**2, evals[top], rtol=1e-9, atol=1e-9)
    # Subspaces agree: projectors onto the top-r eigenvectors are equal.
    v_ref = evecs[:, top]
    torch.testing.assert_close(eig.vectors @ eig.vectors.T, v_ref @ v_ref.T, rtol=0, atol=1e-8)


def test_full_rank_r_equals_d_reconstructs_the_gram_matrix():
    g, gram = _low_rank_gram(num=50, dim=20, rank=20, seed=1)
    eig = randomized_eigh(lambda q: gram @ q, 20, 20, 5, 0, seed=0, dtype=torch.float64)
    recon = eig.vectors @ torch.diag(eig.singular_values**2) @ eig.vectors.T
    torch.testing.assert_close(recon, gram, rtol=1e-9, atol=1e-9)


def test_rank_above_dimension_is_refused():
    with pytest.raises(ValueError, match="curvature.rank=21 exceeds D = 20"):
        randomized_eigh(lambda q: q, 20, 21, 0, 0, seed=0)


def test_randomized_eigh_approximates_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    evals = 0.5 ** torch.arange(60, dtype=torch.float64)
    gram = basis @ torch.diag(evals) @ basis.T
    eig = randomized_eigh(lambda q: gram @ q, 60, 5, 10, 2, seed=0, dtype=torch.float64)
    torch.testing.assert_close(eig.singular_values**2, evals[:5], rtol=1e-6, atol=0)


def test_woodbury_split_form_equals_dense_inverse():
    g, gram = _low_rank_gram(num=30, dim=16, rank=6, seed=2)
    eig = randomized_eigh(lambda q: gram @ q, 16, 6, 4, 1, seed=0, dtype=torch.float64)
    lam = 0.3
    queries = torch.randn(4, 16, dtype=torch.float64)
    dense = torch.linalg.solve(gram + lam * torch.eye(16, dtype=torch.float64), queries.T).T
    got = woodbury_precondition(queries, eig.vectors, eig.singular_values, lam)
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-9)


def test_woodbury_in_float32_keeps_precision_with_a_huge_spectrum():
    """s^2 / lambda ~ 1e8: the split form stays close to the float64 answer in float32."""
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    vectors, singular, lam = (
        basis[:, :4],
        torch.tensor([1e4, 5e3, 1e3, 1e2], dtype=torch.float64),
        1e-2,
    )
    q = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    want = woodbury_precondition(q, vectors, singular, lam)
    got = woodbury_precondition(q.float(), vectors.float(), singular.float(), lam)
    assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_relative_damping_is_the_mean_eigenvalue_times_ratio():
    assert damping_value("relative", 0.1, trace=200.0, dim=50) == pytest.approx(0.4)
    assert damping_value("absolute", 0.7, trace=200.0, dim=50) == 0.7


@pytest.mark.parametrize("method", ["svd", "power"])
def test_factorize_exact_at_full_rank_and_best_at_rank_one(method):
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(5, 6, 9, generator=gen, dtype=torch.float64)
    left, scale, right = factorize(grads, 6, method, power_iters=3)
    torch.testing.assert_close(
        densify(left, scale, right), grads.reshape(5, -1), rtol=1e-10, atol=1e-10
    )
    eye = torch.eye(6, dtype=torch.float64).expand(5, 6, 6)
    torch.testing.assert_close(left.transpose(1, 2) @ left, eye, rtol=0, atol=1e-10)
    # Rank 1: the top singular triple (power iteration converges on a clear gap).
    spiked = grads + 20 * torch.einsum(
        "bi,bj->bij",
        torch.randn(5, 6, generator=gen, dtype=torch.float64),
        torch.randn(5, 9, generator=gen, dtype=torch.float64),
    )
    l1, s1, r1 = factorize(spiked, 1, method, power_iters=30)
    s_ref = torch.linalg.svdvals(spiked)[:, 0]
    torch.testing.assert_close(s1[:, 0], s_ref, rtol=1e-8, atol=0)


def test_factorize_refuses_rank_above_min_width():
    with pytest.raises(ValueError, match="factor rank 7 exceeds min"):
        factorize(torch.zeros(1, 6, 9), 7)
