"""Curvature math: randomized eigendecomposition of G^T G, damping, Woodbury (steps 4-5).

Per layer, G (N x D) stacks the examples' projected gradients. Its Gram matrix
A = G^T G (D x D) is never formed: the randomized range finder (Halko, Martinsson and Tropp
2011, algorithm 4.4 with the eigen-step of 5.3) only needs products A Q = G^T (G Q) for
thin Q (D x m, m = r + p), which are sums over examples and so split across ranks:

    Q  = orth(A Omega)                     1 pass
    Q  = orth(A Q)      (q times)          q passes, sharpen the spectrum's decay
    B  = Q^T (A Q)      (m x m)            1 pass
    B  = U diag(e) U^T,  V = Q U[:, :r],  s^2 = e[:r]

The result is exact when m reaches rank(A) (or D). Damping lambda comes from a rule:
relative (lambda = ratio * trace(A) / D, the mean eigenvalue) or absolute. The inverse is

    (V diag(s^2) V^T + lambda I)^-1 g = (1/lambda)(g - V V^T g) + V diag(1/(lambda + s^2)) V^T g

evaluated in this split form: the fused s^2 / (lambda (lambda + s^2)) weights lose precision
in low-precision arithmetic when s^2 >> lambda.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GramProduct = Callable[[torch.Tensor], torch.Tensor]  # Q [D, m] -> A Q [D, m]


def orthonormalize(mat: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of mat's columns (QR in float64: cheap at D x m, and stable)."""
    q, _ = torch.linalg.qr(mat.to(torch.float64))
    return q.to(mat.dtype)


@dataclass
class Eigen:
    """Top-r eigenpairs of A = G^T G: A ~= V diag(s^2) V^T; `s` are G's singular values."""

    vectors: torch.Tensor  # V [D, r], orthonormal columns
    singular_values: torch.Tensor  # s [r], descending


def randomized_eigh(
    gram: GramProduct,
    dim: int,
    rank: int,
    oversample: int,
    power_iters: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    agree: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Eigen:
    """Top-`rank` eigenpairs of the PSD matrix applied by `gram`.

    Args:
        gram: computes A Q (already summed over ranks when distributed).
        dim: D.
        rank, oversample, power_iters: r, p, q above; m = min(r + p, D).
        seed: seeds the Gaussian test matrix Omega.
        agree: makes every rank use one rank's copy of an orthonormalized basis (a
            broadcast from rank 0 when distributed; QR is deterministic, but a basis that
            differs in its last bits across ranks would make their sums diverge).
    """
    if rank > dim:
        raise ValueError(f"curvature.rank={rank} exceeds D = {dim}; use rank <= {dim}")
    width = min(rank + oversample, dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(dim, width, generator=gen, dtype=torch.float64).to(device, dtype)

    basis = agree(orthonormalize(gram(omega)))
    for _ in range(power_iters):
        basis = agree(orthonormalize(gram(basis)))
    projected = basis.T.to(torch.float64) @ gram(basis).to(torch.float64)  # B [m, m]
    projected = (projected + projected.T) / 2
    evals, evecs = torch.linalg.eigh(projected)  # ascending
    order = torch.argsort(evals, descending=True)[:rank]
    vectors = (basis.to(torch.float64) @ evecs[:, order]).to(dtype)
    singular = evals[order].clamp(min=0).sqrt().to(dtype)
    return Eigen(vectors=vectors, singular_values=singular)


def damping_value(rule: str, value: float, trace: float, dim: int) -> float:
    """lambda from the configured rule: relative (value * trace / D) or absolute (value)."""
    if rule == "absolute":
        return float(value)
    if rule == "relative":
        lam = float(value) * trace / dim
        # An all-zero layer (it never reached the loss) still needs an invertible curvature.
        return lam if lam > 0 else float(value)
    raise ValueError(f"curvature.damping_rule: expected 'relative' or 'absolute', got {rule!r}")


def woodbury_precondition(
    grads: torch.Tensor, vectors: torch.Tensor, singular: torch.Tensor, damping: float
) -> torch.Tensor:
    """(V diag(s^2) V^T + lambda I)^-1 applied to each row of grads [Q, D], split form."""
    coords = grads @ vectors  # V^T g  [Q, r]
    residual = grads - coords @ vectors.T  # g - V V^T g
    weights = 1.0 / (damping + singular**2)  # [r]
    return residual / damping + (coords * weights) @ vectors.T


def explained_variance(singular: torch.Tensor, trace: float) -> float:
    """Share of trace(G^T G) captured by the rank-r curvature."""
    return float((singular.double() ** 2).sum() / trace) if trace > 0 else 0.0
