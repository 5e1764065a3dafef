"""The whole pipeline against the dense brute-force influence formula, in float64."""

import numpy as np
import pytest
import torch

from lorif_dist.data import load_examples
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, load_train_examples
from tests.conftest import REL_EXACT, exact_overrides
from tests.pipeline import run_pipeline, stored_ids
from tests.reference import brute_force_scores, projected_gradients


def _reference(cfg, query_file, damping):
    ex = GradientExtractor(cfg, init_runtime("cpu", "single"))
    ex.close()  # the reference uses plain autograd, no hooks
    train, _ = load_train_examples(cfg, ex.tokenizer)
    queries, _ = load_examples(ex.tokenizer, [str(query_file)], max_length=cfg.data.max_length)
    g_train = projected_gradients(ex.model, ex.specs, ex.projections, train)
    g_query = projected_gradients(ex.model, ex.specs, ex.projections, queries)
    return [e.example_id for e in train], brute_force_scores(g_train, g_query, damping)


@pytest.mark.parametrize("kind,factor", [("gpt2", 1), ("llama", 1), ("gpt2", 2), ("llama", 2)])
@pytest.mark.parametrize("path", ["dense", "factored"])
def test_scores_equal_brute_force(tmp_path, checkpoints, data_files, kind, factor, path):
    overrides = exact_overrides(
        tmp_path / "index",
        checkpoints[kind],
        [data_files["train"], data_files["chat"]],
        data_files["queries"],
    ) + ["--extract.projection_factor", str(factor), "--query.path", path]
    cfg, scores, rows = run_pipeline(overrides)
    ids, expected = _reference(cfg, data_files["queries"], damping=0.5)

    # The empty response (id 14) is skipped; the chat record (id 15) is kept.
    assert list(stored_ids(scores)) == ids and 14 not in ids and 15 in ids
    got = torch.from_numpy(scores[:, ids])
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=REL_EXACT, atol=REL_EXACT * expected.abs().max())

    # The top-k lists are the brute-force ranking.
    for q in range(expected.shape[0]):
        want = [ids[i] for i in torch.argsort(expected[q], descending=True)[:5].tolist()]
        assert [r["train_id"] for r in rows if r["query_id"] == q] == want


def test_rank_one_factors_approximate_the_dense_scores(tmp_path, checkpoints, data_files):
    """c = 1 (the default) stores far less; scores stay strongly correlated with exact ones."""
    base = exact_overrides(
        tmp_path / "exact", checkpoints["gpt2"], [data_files["train"]], data_files["queries"]
    )
    _, exact, _ = run_pipeline(base)
    _, approx, _ = run_pipeline(
        base
        + [
            "--extract.exact_factors",
            "false",
            "--extract.factor_rank",
            "1",
            "--extract.factor_method",
            "power",
            "--run.index_dir",
            str(tmp_path / "rank1"),
        ]
    )
    ids = stored_ids(exact)
    for q in range(exact.shape[0]):
        corr = np.corrcoef(exact[q, ids], approx[q, ids])[0, 1]
        assert 0.3 < corr < 1 - 1e-9  # related, and genuinely different
