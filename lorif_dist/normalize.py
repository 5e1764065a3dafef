"""Score normalizations (`query.normalize`): none, unit-norm training gradients, cosine.

Unnormalized influence I(q, t) = sum over layers g_q^T H^-1 g_t grows with the size of g_t,
so a few training examples with large gradients can top the lists of unrelated queries
("hubs"). The normalizations divide that size out:

    none    I(q, t)
    unit    I(q, t) / ||g_t||, with ||g_t||^2 = sum over layers ||g_t||_F^2: the score of
            the unit-norm training gradient
    cosine  I(q, t) / sqrt(I(q, q) I(t, t)), I(t, t) = sum over layers g_t^T H^-1 g_t: the
            cosine of the angle between g_q and g_t in the inner product H^-1 that defines
            the score (the plain cosine for graddot, where H = I); always in [-1, 1]

The query-side factor sqrt(I(q, q)) is one positive number per query, so it changes no
per-query ranking; it makes cosine scores comparable across queries. The training-side
statistics come from what is stored, per shard, by the rank that scores the shard:

    ||g_t||^2     dense rows: row . row; factors: s^T ((L^T L) o (R^T R)) s,
                  O(c^2 (d1 + d2)) per example and layer
    g^T H^-1 g    lorif: (||g||^2 - ||V^T g||^2) / lambda + sum_i (V^T g)_i^2 / (lambda + s_i^2)
                  with V^T g from the cached curvature coordinates (computed when absent);
                  logra: row . (H^-1 row), D^2 per example and layer; graddot: ||g||^2
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from lorif_dist.baselines import load_inverse
from lorif_dist.storage import ShardReader


def stored_sq_norms(reader: ShardReader, layer: str, start: int, stop: int) -> torch.Tensor:
    """||g_t||_F^2 [n] of rows [start, stop) of one layer, as stored, in float64."""
    if reader.layout == "dense":
        rows = reader.read_dense(layer, start, stop, torch.float64)
        return (rows * rows).sum(dim=1)
    left, scale, right = reader.read(layer, start, stop, torch.float64)
    gram_l = torch.einsum("nik,nil->nkl", left, left)  # L^T L  [n, c, c]
    gram_r = torch.einsum("njk,njl->nkl", right, right)  # R^T R [n, c, c]
    return torch.einsum("nk,nkl,nl->n", scale, gram_l * gram_r, scale)


def _lorif_self_influence(reader, layer, start, stop, curvature, coords_h5, dtype) -> torch.Tensor:
    vectors, singular, lam = curvature
    sq = stored_sq_norms(reader, layer, start, stop)
    if coords_h5 is not None:
        coords = torch.from_numpy(coords_h5[layer][start:stop]).double()  # [n, r]
    else:
        coords = (reader.read_dense(layer, start, stop, dtype) @ vectors).double()
    weights = 1.0 / (lam + singular.double() ** 2)  # [r]
    return (sq - (coords**2).sum(dim=1)) / lam + (coords**2 * weights).sum(dim=1)


def train_statistic(
    kind: str,
    method: str,
    reader: ShardReader,
    layers: list[str],
    index_dir: str,
    coords_file: Path | None,
    block_rows: int,
    dtype: torch.dtype,
) -> np.ndarray:
    """The training-side denominator [n] of one shard: ||g_t|| (unit) or sqrt(I(t, t))."""
    from lorif_dist.curvature import load_curvature

    n = reader.num_examples
    total = torch.zeros(n, dtype=torch.float64)
    coords_h5 = h5py.File(coords_file, "r") if coords_file is not None else None
    try:
        for layer in layers:
            # Curvature is loaded once per layer; rows stream in blocks.
            curvature = None
            if kind == "cosine" and method == "lorif":
                curvature = load_curvature(index_dir, layer, dtype)
            elif kind == "cosine" and method == "logra":
                curvature = load_inverse(index_dir, layer, dtype)  # [D, D]
            for start in range(0, n, block_rows):
                stop = min(start + block_rows, n)
                if kind == "unit" or method == "graddot":
                    part = stored_sq_norms(reader, layer, start, stop)
                elif method == "lorif":
                    part = _lorif_self_influence(
                        reader, layer, start, stop, curvature, coords_h5, dtype
                    )
                else:  # logra: row . (H^-1 row)
                    rows = reader.read_dense(layer, start, stop, dtype)  # [n_b, D]
                    part = (rows * (rows @ curvature)).sum(dim=1).double()
                total[start:stop] += part
    finally:
        if coords_h5 is not None:
            coords_h5.close()
    return total.clamp(min=0).sqrt().numpy()


def normalize_scores(
    scores: np.ndarray, kind: str, query_self: np.ndarray | None, train_stat: np.ndarray
) -> np.ndarray:
    """Divides raw scores [Q, n] by the normalization's factors (zero where a factor is 0)."""
    if kind == "none":
        return scores
    denom = np.broadcast_to(train_stat[None, :], scores.shape).astype(np.float64)
    if kind == "cosine":
        if query_self is None:
            raise ValueError("cosine normalization needs the queries' self-influence I(q, q)")
        denom = denom * np.sqrt(np.clip(query_self, 0, None))[:, None]
    out = np.zeros_like(scores, dtype=np.float64)
    np.divide(scores, denom, out=out, where=denom > 0)
    return out


def largest_hub(top_ids: np.ndarray) -> tuple[int, int]:
    """(number of queries, train id): the training example found in the most queries' top-k.

    A hub that appears for unrelated queries is the symptom the normalizations treat; ties
    go to the smallest id. top_ids is [Q, k]; an empty list gives (0, -1).
    """
    if top_ids.size == 0:
        return 0, -1
    ids, counts = np.unique(
        np.concatenate([np.unique(row) for row in top_ids]), return_counts=True
    )  # an id counts once per query
    best = int(np.argmax(counts))
    return int(counts[best]), int(ids[best])
