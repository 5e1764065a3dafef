"""Statistics of attribution quality: Spearman correlation and bootstrap intervals.

Everything here is plain numpy on small arrays (queries x subsets, queries x k), with no
model or file in sight, so it is tested directly against scipy and simple references.

Bootstrap intervals are percentile intervals. For values grouped by query ([Q, k]: k
measurements per query), a resample draws Q queries with replacement and then, within
each drawn query, k of its measurements with replacement (a two-stage bootstrap), so the
interval reflects both how many queries were measured and how much a query's k examples
disagree. Several groups measured on the same queries (top-k, random-k, bottom-k) share
the query draws, which makes intervals of their differences paired.
"""

from __future__ import annotations

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (as scipy's default)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=-1)
    ranks_sorted = np.empty(values.shape, dtype=np.float64)
    flat_vals = sorted_values.reshape(-1, n)
    flat_ranks = ranks_sorted.reshape(-1, n)
    for row, vals in enumerate(flat_vals):
        # Runs of equal values share the mean of the positions they occupy.
        starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
        ends = np.r_[starts[1:], n]
        flat_ranks[row] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=-1)
    return ranks


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of x [Q, M] with the same row of y [Q, M].

    A row that is constant in x or y has no defined correlation and gives NaN.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"spearman: x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.shape[-1] < 2:
        raise ValueError(f"spearman: need at least 2 points per row, got {x.shape[-1]}")
    rx = rankdata(x)
    ry = rankdata(y)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=-1) / denom, np.nan)


def _as_groups(values: np.ndarray) -> np.ndarray:
    """[Q] -> [Q, 1]; [Q, k] stays (NaN marks a missing measurement in a ragged row)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected values of shape [Q] or [Q, k], got {values.shape}")
    if np.isnan(values).all(axis=1).any():
        raise ValueError("every query needs at least one measured value (found an all-NaN row)")
    return values


def bootstrap_means(
    groups: dict[str, np.ndarray], num_samples: int, seed: int = 0
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Point estimates and bootstrap resamples of the mean of each group.

    Args:
        groups: name -> values [Q] or [Q, k], all with the same Q (the same queries); NaN
            entries are missing measurements and are left out of that query's mean.
        num_samples: number of bootstrap resamples B.
        seed: seed of the resampling.

    Returns:
        (point, samples): point[name] is the mean over queries of each query's mean;
        samples[name] [B] are the same statistic on resampled data.
    """
    arrays = {name: _as_groups(v) for name, v in groups.items()}
    num_queries = {a.shape[0] for a in arrays.values()}
    if len(num_queries) != 1:
        raise ValueError(f"every group must cover the same queries, got sizes {num_queries}")
    (q,) = num_queries
    rng = np.random.default_rng(seed)
    query_draw = rng.integers(0, q, size=(num_samples, q))  # [B, Q], shared by every group
    point, samples = {}, {}
    for name, a in arrays.items():
        point[name] = float(np.nanmean(a, axis=1).mean())
        if np.isnan(a).any():
            # A ragged row (NaN-padded) resamples among its measured entries only.
            picked = _resample_ragged(a, query_draw, rng)
        else:
            inner = rng.integers(0, a.shape[1], size=(num_samples, q, a.shape[1]))  # [B, Q, k]
            picked = a[query_draw[:, :, None], inner]  # [B, Q, k]
        samples[name] = np.nanmean(picked, axis=2).mean(axis=1)
    return point, samples


def _resample_ragged(a: np.ndarray, query_draw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    num_samples, q = query_draw.shape
    k = a.shape[1]
    valid = [np.flatnonzero(~np.isnan(row)) for row in a]
    out = np.full((num_samples, q, k), np.nan)
    for b in range(num_samples):
        for j, qi in enumerate(query_draw[b]):
            cols = valid[qi]
            out[b, j, : len(cols)] = a[qi, rng.choice(cols, size=len(cols))]
    return out


def interval(point: float, samples: np.ndarray, confidence: float) -> dict[str, float]:
    """A percentile bootstrap interval around a point estimate, as a plain dict."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return {
        "mean": float(point),
        "low": float(low),
        "high": float(high),
        "confidence": float(confidence),
        "num_samples": int(len(samples)),
    }


def bootstrap_interval(
    values: np.ndarray, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of values ([Q] or [Q, k]) with a (two-stage) percentile bootstrap interval."""
    point, samples = bootstrap_means({"x": values}, num_samples, seed)
    return interval(point["x"], samples["x"], confidence)


def compare_groups(
    groups: dict[str, np.ndarray],
    differences: list[tuple[str, str]],
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Intervals for each group's mean and for paired differences ("a_minus_b")."""
    point, samples = bootstrap_means(groups, num_samples, seed)
    out = {name: interval(point[name], samples[name], confidence) for name in groups}
    for a, b in differences:
        out[f"{a}_minus_{b}"] = interval(point[a] - point[b], samples[a] - samples[b], confidence)
    return out
