"""Spearman, bootstrap intervals, subset sampling and the LDS formula against references."""

import numpy as np
import pytest

from lorif_dist.evaluate.lds import lds_score, sample_subsets
from lorif_dist.evaluate.stats import (
    bootstrap_interval,
    compare_groups,
    rankdata,
    spearman_rows,
)

scipy_stats = pytest.importorskip("scipy.stats")


def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(7, 40)).astype(float)  # many ties
    np.testing.assert_array_equal(rankdata(x), scipy_stats.rankdata(x, axis=-1))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy_on_fresh_random_inputs(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(20):
        q, m = rng.integers(1, 6), rng.integers(3, 50)
        x = rng.normal(size=(q, m))
        y = 0.5 * x + rng.normal(size=(q, m))
        if ties:
            x, y = np.round(x), np.round(y * 2)
        ours = spearman_rows(x, y)
        ref = [scipy_stats.spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_spearman_of_a_constant_row_is_nan_and_bad_shapes_are_refused():
    out = spearman_rows(
        np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), np.array([[1, 2, 3], [3, 2, 1.0]])
    )
    assert np.isnan(out[0]) and out[1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same shape"):
        spearman_rows(np.zeros((2, 3)), np.zeros((2, 4)))


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (10, 100, 1000):
        values = rng.normal(loc=1.0, size=n)
        r = bootstrap_interval(values, num_samples=2000, confidence=0.95, seed=3)
        assert r["mean"] == pytest.approx(values.mean())
        assert r["low"] < r["mean"] < r["high"]
        widths.append(r["high"] - r["low"])
        # The percentile interval of a mean is close to +-1.96 standard errors.
        se = values.std(ddof=1) / np.sqrt(n)
        assert r["high"] - r["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_two_stage_bootstrap_and_paired_differences():
    rng = np.random.default_rng(4)
    query_effect = rng.normal(size=(30, 1)) * 3.0  # shared by both groups: cancels when paired
    top = query_effect + 1.0 + 0.1 * rng.normal(size=(30, 5))
    rand = query_effect + 0.1 * rng.normal(size=(30, 5))
    out = compare_groups({"top": top, "random": rand}, [("top", "random")], 2000, 0.9, seed=5)
    assert out["top"]["mean"] == pytest.approx(top.mean())
    diff = out["top_minus_random"]
    assert diff["mean"] == pytest.approx(top.mean() - rand.mean())
    assert diff["low"] < diff["mean"] < diff["high"]
    # Pairing removes the large per-query effect: the difference is far tighter than a group.
    assert diff["high"] - diff["low"] < 0.2 * (out["top"]["high"] - out["top"]["low"])
    assert diff["low"] > 0.9


def test_ragged_groups_use_only_measured_values():
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])
    r = bootstrap_interval(values, num_samples=500, seed=0)
    assert r["mean"] == pytest.approx((1.5 + 3.0) / 2)
    assert 1.0 <= r["low"] <= r["high"] <= 3.0


def test_subsets_are_deterministic_prefix_stable_and_sized():
    ids = np.arange(3, 103)
    a = sample_subsets(ids, 0.5, 8, seed=7)
    b = sample_subsets(ids, 0.5, 12, seed=7)
    assert a.shape == (8, 50) and np.array_equal(a, b[:8])
    assert all(len(set(row)) == 50 and set(row) <= set(ids) for row in a)
    assert not np.array_equal(a, sample_subsets(ids, 0.5, 8, seed=8))
    assert len({tuple(r) for r in a}) == 8
    with pytest.raises(ValueError, match="lds_fraction"):
        sample_subsets(ids[:1], 0.5, 2, seed=0)


def test_lds_score_matches_a_plain_loop():
    rng = np.random.default_rng(9)
    num_train, q, m = 40, 6, 25
    scores = rng.normal(size=(q, num_train))
    subsets = sample_subsets(np.arange(num_train), 0.5, m, seed=1)
    true_effect = scores + 0.5 * rng.normal(size=scores.shape)
    utilities = np.stack([true_effect[:, s].sum(axis=1) for s in subsets])  # [M, Q]
    r = lds_score(scores, subsets, utilities, num_samples=500)
    ref = [
        scipy_stats.spearmanr([scores[i, s].sum() for s in subsets], utilities[:, i]).statistic
        for i in range(q)
    ]
    np.testing.assert_allclose(r["per_query"], ref, rtol=1e-12)
    assert r["mean"] == pytest.approx(np.mean(ref)) and r["low"] <= r["mean"] <= r["high"]
    assert r["mean"] > 0.5  # informative scores rank the subsets
    noise = lds_score(rng.normal(size=scores.shape), subsets, utilities, num_samples=500)
    assert abs(noise["mean"]) < r["mean"] - 0.3


def test_train_and_evaluate_fields_are_validated_by_name():
    from lorif_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            ["--evaluate.lds_fraction", "1.5", "--evaluate.tailpatch_optimizer", "lion"]
            + ["--train.schedule", "step", "--evaluate.lds_subsets", "1", "--train.lr", "0"],
        )
    text = str(err.value)
    for field in (
        "evaluate.lds_fraction: expected a number in (0, 1), got 1.5",
        "evaluate.tailpatch_optimizer",
        "train.schedule",
        "evaluate.lds_subsets: expected a number >= 2, got 1",
        "train.lr: expected a number > 0, got 0.0",
    ):
        assert field in text
