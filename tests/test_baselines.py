"""The LoGRA and gradient-dot baselines and the score normalizations, against float64 brute
force: dense per-example projected gradients by plain autograd, dense damped inverses."""

import h5py
import numpy as np
import pytest
import torch

from lorif_dist.config import ConfigError, load_config, replace
from lorif_dist.curvature import run_curvature
from lorif_dist.data import load_examples
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, load_train_examples, run_extract
from lorif_dist.inspection import format_report, inspect_index
from lorif_dist.manifest import IndexMismatchError, load_manifest
from lorif_dist.normalize import largest_hub
from lorif_dist.query import load_score_matrix, output_dir, run_query
from tests.conftest import REL_EXACT, exact_overrides
from tests.reference import brute_force_scores, projected_gradients

NORMALIZATIONS = ("none", "unit", "cosine")


def _build_index(overrides: list[str]):
    """Extract + curvature once; returns (cfg, runtime, extractor) for several queries."""
    cfg = load_config(None, overrides)
    runtime = init_runtime("cpu", "single")
    extractor = GradientExtractor(cfg, runtime)
    run_extract(cfg, runtime, extractor)
    run_curvature(cfg, runtime)
    return cfg, runtime, extractor


def _query(cfg, runtime, extractor, tmp_path, normalize: str, path: str = "dense"):
    output = str(tmp_path / f"q-{normalize}-{path}")
    cfg = replace(cfg, query={"normalize": normalize, "path": path, "output": output})
    result = run_query(cfg, runtime, extractor)
    num = load_manifest(cfg.run.index_dir)["dataset"]["num_records"]
    return load_score_matrix(output_dir(cfg), num), result


def _brute_force(cfg, extractor, query_file, method: str) -> dict:
    """Raw and normalized scores by the dense formulas; lambda by the configured rule."""
    train, _ = load_train_examples(cfg, extractor.tokenizer)
    queries, _ = load_examples(
        extractor.tokenizer, [str(query_file)], max_length=cfg.data.max_length
    )
    extractor.close()  # plain autograd below, no hooks
    model, specs, projections = extractor.model, extractor.specs, extractor.projections
    g_train = projected_gradients(model, specs, projections, train)
    g_query = projected_gradients(model, specs, projections, queries)
    cc = cfg.curvature
    damping = {}
    for name, g in g_train.items():
        trace = float((g**2).sum())
        damping[name] = (
            cc.damping if cc.damping_rule == "absolute" else cc.damping * trace / g.shape[1]
        )

    def score(a: dict, b: dict) -> torch.Tensor:
        if method == "graddot":
            return sum(a[n] @ b[n].T for n in a)
        # g_a^T (G^T G + lambda I)^-1 g_b, the training set's curvature either way.
        return brute_force_scores(g_train, a, damping, targets=b)

    raw = score(g_query, g_train)
    train_norm = sum((g**2).sum(dim=1) for g in g_train.values()).sqrt()
    q_self = torch.diagonal(score(g_query, g_query))
    t_self = torch.diagonal(score(g_train, g_train))
    return {
        "ids": [e.example_id for e in train],
        "none": raw,
        "unit": raw / train_norm[None, :],
        "cosine": raw / (q_self.sqrt()[:, None] * t_self.sqrt()[None, :]),
    }


def _assert_matches(scores: np.ndarray, expected: torch.Tensor, ids: list[int], what: str):
    got = torch.from_numpy(scores[:, ids])
    assert expected.abs().max() > 0, f"{what}: zero reference, the test would prove nothing"
    torch.testing.assert_close(
        got, expected, rtol=REL_EXACT, atol=REL_EXACT * expected.abs().max(), msg=what
    )


@pytest.mark.parametrize(
    "kind,factor,method,damping_rule",
    [
        ("gpt2", 1, "logra", "relative"),
        ("llama", 3, "logra", "absolute"),
        ("gpt2", 2, "graddot", "relative"),
        ("llama", 1, "graddot", "relative"),
    ],
)
def test_baselines_and_normalizations_equal_brute_force(
    tmp_path, checkpoints, data_files, kind, factor, method, damping_rule
):
    """logra = sum_l g_q^T (G^T G + lambda I)^-1 g_t with lambda by the same rule as LoRIF,
    graddot = sum_l g_q . g_t, for any f, and each normalization of both, to 1e-8."""
    overrides = exact_overrides(
        tmp_path / "index", checkpoints[kind], [data_files["train"]], data_files["queries"]
    )
    overrides += ["--extract.method", method, "--extract.projection_factor", str(factor)]
    overrides += ["--curvature.damping_rule", damping_rule, "--curvature.damping", "0.3"]
    cfg, runtime, extractor = _build_index(overrides)

    manifest = load_manifest(cfg.run.index_dir)
    assert manifest["identity"]["config"]["extract"]["method"] == method
    assert manifest["curvature"]["method"] == method
    results = {n: _query(cfg, runtime, extractor, tmp_path, n) for n in NORMALIZATIONS}
    expected = _brute_force(cfg, extractor, data_files["queries"], method)
    for name, (scores, _) in results.items():
        _assert_matches(scores, expected[name], expected["ids"], f"{method} {name}")
    cosine = results["cosine"][0][:, expected["ids"]]
    assert np.abs(cosine).max() <= 1 + 1e-12

    # `lorif inspect` reads the dense index: curvature done, not suggested again (the
    # queries above wrote elsewhere, so the query is what it suggests).
    report = inspect_index(cfg.run.index_dir)
    assert report["stages"]["curvature"] == "done", report["curvature"]
    assert len(report["next"]) == 1 and " lorif query " in report["next"][0], report["next"]
    assert f"method {method}" in format_report(report)


def test_lorif_normalizations_equal_brute_force(tmp_path, checkpoints, data_files):
    """Exact LoRIF (exact factors, r above rank(G)) normalized, on both query paths (one
    index and one brute force for both)."""
    overrides = exact_overrides(
        tmp_path / "index", checkpoints["llama"], [data_files["train"]], data_files["queries"]
    ) + ["--extract.projection_factor", "2", "--curvature.damping_rule", "relative"]
    cfg, runtime, extractor = _build_index(overrides)
    results = {
        (path, n): _query(cfg, runtime, extractor, tmp_path, n, path)
        for path in ("dense", "factored")
        for n in NORMALIZATIONS
    }
    expected = _brute_force(cfg, extractor, data_files["queries"], "lorif")
    for (path, name), (scores, _) in results.items():
        _assert_matches(scores, expected[name], expected["ids"], f"lorif {path} {name}")


def test_method_is_validated_and_recorded_in_the_identity(tmp_path, checkpoints, data_files):
    with pytest.raises(ConfigError, match="extract.method"):
        load_config(None, ["--extract.method", "trak"])
    with pytest.raises(ConfigError, match="query.path"):
        load_config(None, ["--extract.method", "logra", "--query.path", "factored"])
    with pytest.raises(ConfigError, match="query.normalize"):
        load_config(None, ["--query.normalize", "l2"])

    overrides = exact_overrides(
        tmp_path / "index", checkpoints["gpt2"], [data_files["train"]], data_files["queries"]
    )
    cfg = load_config(None, overrides + ["--extract.method", "logra"])
    runtime = init_runtime("cpu", "single")
    run_extract(cfg, runtime)
    shard = next((tmp_path / "index" / "shards").rglob("*.h5"))
    with h5py.File(shard, "r") as h5:
        layer = next(iter(h5["layers"].values()))
        assert h5.attrs["layout"] == "dense" and set(layer) == {"dense", "scale"}
    # The same index with another method is refused, naming the field.
    other = load_config(None, overrides + ["--extract.method", "graddot"])
    with pytest.raises(IndexMismatchError, match="extract.method"):
        run_extract(other, runtime)


def test_largest_hub_counts_each_query_once():
    top = np.array([[3, 5, 7], [5, 1, 2], [9, 5, 5], [1, 2, 4]])
    assert largest_hub(top) == (3, 5)
    assert largest_hub(np.array([[4, 2], [2, 4]])) == (2, 2)  # ties: smallest id
    assert largest_hub(np.zeros((0, 3), np.int64)) == (0, -1)


@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e20])
def test_dense_float16_round_trip_neither_overflows_nor_underflows(tmp_path, magnitude):
    from lorif_dist.storage import FactorBlock, ShardReader, ShardWriter, dense_to_storage

    gen = torch.Generator().manual_seed(0)
    rows = magnitude * torch.randn(5, 120, generator=gen, dtype=torch.float64)
    rows[2] = 0  # a layer the loss never reached stays exactly zero
    unit, norms = dense_to_storage(rows, "float16")
    block = FactorBlock(
        example_ids=np.arange(5),
        losses=np.ones(5, np.float32),
        num_tokens=np.full(5, 3, np.int32),
        left={},
        right={},
        scale={"layer": norms},
        dense={"layer": unit},
    )
    writer = ShardWriter(tmp_path / "d.h5", "h", {"layer": (10, 12, 1)}, "float16", "dense")
    writer.write_part(block, 0, 1)
    writer.finalize()
    with ShardReader(tmp_path / "d.h5") as reader:
        assert reader.layout == "dense" and reader.h5["layers/layer/dense"].dtype == np.float16
        back = reader.read_dense("layer", 0, 5, torch.float64)
        with pytest.raises(ValueError, match="read_dense"):
            reader.read("layer", 0, 5)
    assert torch.isfinite(back).all() and float(back[2].abs().max()) == 0
    keep = [0, 1, 3, 4]
    rel = (back[keep] - rows[keep]).norm(dim=1) / rows[keep].norm(dim=1)
    assert float(rel.max()) < 2e-3

    empty = ShardWriter(tmp_path / "e.h5", "h", {"layer": (10, 12, 1)}, "float16", "dense")
    empty.finalize()
    with ShardReader(tmp_path / "e.h5") as reader:
        assert reader.read_dense("layer", 0, 0).shape == (0, 120)


def test_two_ranks_equal_one_rank_for_the_baselines(tmp_path, checkpoints, data_files):
    """The G^T G all-reduce (logra), identity curvature (graddot) and the per-shard training
    statistics of the normalizations give one rank's scores on two gloo ranks."""
    from tests.multirank import spawn_ranks
    from tests.pipeline import run_pipeline

    def overrides(index, method, normalize, backend):
        return exact_overrides(
            index, checkpoints["llama"], [data_files["train"]], data_files["queries"]
        ) + [
            "--extract.method",
            method,
            "--extract.projection_factor",
            "2",
            "--extract.max_batch_size",
            "2",
            "--query.normalize",
            normalize,
            "--run.backend",
            backend,
        ]

    cases = [("logra", "cosine"), ("graddot", "unit")]
    spawn_ranks(
        2, [{"overrides": overrides(tmp_path / f"w2-{m}", m, n, "torch")} for m, n in cases]
    )
    for method, normalize in cases:
        _, expected, _ = run_pipeline(
            overrides(tmp_path / f"w1-{method}", method, normalize, "single")
        )
        num = load_manifest(tmp_path / f"w2-{method}")["dataset"]["num_records"]
        got = load_score_matrix(tmp_path / f"w2-{method}" / "query", num)
        assert np.isnan(got).sum() == np.isnan(expected).sum()
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=method)
