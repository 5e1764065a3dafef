"""Rank-c factors of per-example projected gradients (DESIGN step 3).

    G~ (d1 x d2)  ~=  L diag(s) R^T,   L (d1 x c) and R (d2 x c) with orthonormal columns

Two methods give the same factors up to column signs:

    svd    batched thin SVD, exact; about 4 d1 d2 min(d1, d2) flops per example
    power  block power (subspace) iteration from a fixed start, then a Rayleigh-Ritz step;
           about (4 k + 2) d1 d2 c flops for k iterations. Exact once c >= min(d1, d2).

"auto" takes the cheaper. The start block is derived from the layer's seed, so the factors
of an example do not depend on which batch, rank or task computed them.
Storing c (d1 + d2) + c numbers instead of d1 d2 is where LoRIF's storage saving comes from.
"""

from __future__ import annotations

import torch


def choose_method(d1: int, d2: int, rank: int, power_iters: int, method: str = "auto") -> str:
    if method != "auto":
        return method
    svd_flops = 4 * d1 * d2 * min(d1, d2)
    power_flops = (4 * power_iters + 2) * d1 * d2 * rank + 4 * (d1 + d2) * rank * rank
    return "svd" if svd_flops <= power_flops else "power"


def start_block(d2: int, rank: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The fixed power-iteration start for one layer, [d2, c]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d2, rank, generator=gen, dtype=torch.float64).to(dtype)


def factorize(
    grads: torch.Tensor,
    rank: int,
    method: str = "auto",
    power_iters: int = 4,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-c factors of a batch of matrices.

    Args:
        grads: [B, d1, d2] per-example projected gradients.
        rank: c, at most min(d1, d2).
        method: "svd", "power" or "auto".
        power_iters: block power iterations for "power".
        start: [d2, c] fixed start block for "power" (random if None).

    Returns:
        left [B, d1, c] and right [B, d2, c] with orthonormal columns, and scale [B, c]
        (non-negative, descending), such that grads ~= left @ diag(scale) @ right^T.
    """
    num, d1, d2 = grads.shape
    if rank > min(d1, d2):
        raise ValueError(
            f"factor rank {rank} exceeds min(d1, d2) = {min(d1, d2)} for a {d1} x {d2} "
            f"projected gradient (extract.factor_rank / query.factor_rank); use at most "
            f"{min(d1, d2)}"
        )
    method = choose_method(d1, d2, rank, power_iters, method)
    if method == "svd":
        u, s, vh = torch.linalg.svd(grads, full_matrices=False)
        return u[:, :, :rank], s[:, :rank], vh[:, :rank, :].transpose(1, 2)

    if start is None:
        start = torch.randn(d2, rank, dtype=grads.dtype, device=grads.device)
    right = start.to(grads.device, grads.dtype).expand(num, d2, rank)
    for _ in range(power_iters):
        left, _ = torch.linalg.qr(torch.bmm(grads, right))  # [B, d1, c]
        right, _ = torch.linalg.qr(torch.bmm(grads.transpose(1, 2), left))  # [B, d2, c]
    # Rayleigh-Ritz: the best rank-c approximation of grads within span(right).
    u, s, wh = torch.linalg.svd(torch.bmm(grads, right), full_matrices=False)  # [B, d1, c]
    return u, s, torch.bmm(right, wh.transpose(1, 2))


def densify(left: torch.Tensor, scale: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """[n, d1, c], [n, c], [n, d2, c] -> [n, d1 * d2], rows vec(L diag(s) R^T) (row-major)."""
    dense = torch.einsum("nic,nc,njc->nij", left, scale, right)
    return dense.reshape(dense.shape[0], -1)
