"""Two-sided random projections (LoGRA): P_in (I x d1) and P_out (O x d2) per layer.

Entries are Rademacher (+-1) scaled by 1/sqrt(d), so E[P P^T] = I and inner products of
projected gradients are unbiased. Each matrix's seed is derived from the base seed and the
layer's name by SHA-256, so every rank, array task and the query side build identical
matrices without communicating them. A projection factor f = 1 means no projection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorif_dist.modeling import LayerSpec


def projected_dims(spec: LayerSpec, factor: int) -> tuple[int, int]:
    """(d1, d2) = (I // f, O // f); a clear error when f exceeds a width."""
    if factor > spec.in_features or factor > spec.out_features:
        raise ValueError(
            f"extract.projection_factor={factor} is larger than layer {spec.name!r}'s width "
            f"(in {spec.in_features}, out {spec.out_features}); use a factor <= "
            f"{min(spec.in_features, spec.out_features)} or leave the layer out with "
            "extract.exclude_layers"
        )
    return spec.in_features // factor, spec.out_features // factor


def layer_seed(base_seed: int, layer_name: str, side: str) -> int:
    digest = hashlib.sha256(f"{base_seed}:{layer_name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rademacher(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A rows x cols matrix of +-1/sqrt(cols), generated on the CPU for reproducibility."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1) / cols**0.5


@dataclass
class LayerProjection:
    """The projection pair of one layer; `None` stands for the identity (f = 1)."""

    spec: LayerSpec
    d1: int
    d2: int
    p_in: torch.Tensor | None  # [I, d1]
    p_out: torch.Tensor | None  # [O, d2]

    def to(self, device: torch.device) -> LayerProjection:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerProjection(self.spec, self.d1, self.d2, move(self.p_in), move(self.p_out))


def build_projections(
    specs: Sequence[LayerSpec], factor: int, seed: int, dtype: torch.dtype
) -> dict[str, LayerProjection]:
    out = {}
    for spec in specs:
        d1, d2 = projected_dims(spec, factor)
        if factor == 1:
            out[spec.name] = LayerProjection(spec, d1, d2, None, None)
            continue
        p_in = rademacher(spec.in_features, d1, layer_seed(seed, spec.name, "in"), dtype)
        p_out = rademacher(spec.out_features, d2, layer_seed(seed, spec.name, "out"), dtype)
        out[spec.name] = LayerProjection(spec, d1, d2, p_in, p_out)
    return out


def projection_hash(projections: dict[str, LayerProjection]) -> str:
    """Fingerprint of the actual matrices (catches a changed RNG as well as a changed seed)."""
    h = hashlib.sha256()
    for name in sorted(projections):
        proj = projections[name]
        h.update(f"{name}:{proj.d1}:{proj.d2}".encode())
        for mat in (proj.p_in, proj.p_out):
            if mat is not None:
                h.update((mat[:64] > 0).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
