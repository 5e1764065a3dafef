"""The bench scripts run on the tiny model, and the report pairs runs as its tables claim."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.reliability_helpers import TINY_RECIPE, tiny_overrides


@pytest.mark.parametrize("method", ["lorif", "logra"])
def test_overhead_runs_on_tiny_model(checkpoints, data_files, tmp_path, monkeypatch, method):
    from bench import overhead

    monkeypatch.setattr(overhead, "RESULTS", tmp_path / "results")
    args = ["--config", str(TINY_RECIPE), "--rounds", "1", "--name", "overhead-test"]
    args += tiny_overrides(checkpoints["llama"], data_files["train"], tmp_path / "index")
    args += ["--extract.method", method]
    assert overhead.main(args) == 0

    result = json.loads((tmp_path / "results" / "overhead-test.json").read_text())
    assert result["num_examples"] == 14  # 15 records, the whitespace-only response skipped
    for key in ("floor_seconds", "capture_seconds", "factor_seconds"):
        assert np.isfinite(result[key]) and result[key] > 0, key


def _run(name: str, method: str, nbytes: float, mean: float, half: float, score_s: float):
    q = {"mean": mean, "low": mean - half, "high": mean + half}
    return {
        "name": name,
        "spec": {"method": method},
        "storage": {"bytes_per_example": nbytes, "index_bytes": 10 * nbytes},
        "query": {"none": {"quality": q, "score_seconds": score_s, "seconds": 1.0 + score_s}},
    }


def test_report_pairs_matched_quality_and_matched_storage():
    from bench.report import targets

    runs = [
        _run("logra-a", "logra", 40_000, 0.30, 0.04, 2.0),
        _run("logra-b", "logra", 10_000, 0.22, 0.05, 0.5),
        _run("lorif-cheap", "lorif", 2_000, 0.15, 0.05, 0.1),
        _run("lorif-mid", "lorif", 11_000, 0.27, 0.04, 0.2),
        _run("lorif-big", "lorif", 60_000, 0.31, 0.04, 0.4),
        _run("graddot", "graddot", 40_000, 0.19, 0.05, 0.1),
    ]
    t = targets({"runs": {r["name"]: r for r in runs}}, "none")

    by_logra = {m["logra"]: m for m in t["matched_quality"]}
    # logra-a's lower bound is 0.26: the cheapest LoRIF reaching it is lorif-mid.
    assert by_logra["logra-a"]["lorif"] == "lorif-mid"
    assert by_logra["logra-a"]["storage_ratio"] == pytest.approx(40_000 / 11_000)
    assert by_logra["logra-a"]["scoring_time_ratio"] == pytest.approx(2.0 / 0.2)
    # logra-b's lower bound is 0.17: lorif-cheap (0.15) does not reach it.
    assert by_logra["logra-b"]["lorif"] == "lorif-mid"

    storage = {m["logra"]: m["lorif"] for m in t["matched_storage"]}
    # Within 1.15x of 40 kB: lorif-mid (lorif-big stores more); of 10 kB: lorif-mid (11 kB).
    assert storage == {"logra-a": "lorif-mid", "logra-b": "lorif-mid"}
    assert t["floor"]["lorif"] == "lorif-big" and t["floor"]["graddot"] == "graddot"


def test_curvature_memory_bench_runs_and_reads_each_shard_once(tmp_path):
    """The curvature bench on a small synthetic index, 1 rank (mpiexec with -n 1)."""
    import subprocess
    import sys

    from tests.reliability_helpers import REPO, cli_env

    cmd = [sys.executable, str(REPO / "bench" / "curvature_memory.py"), "--out", str(tmp_path)]
    cmd += ["--base-examples", "128", "--sizes", "2", "--ranks", "1", "--shards", "2"]
    cmd += ["--layers", "2", "--d1", "8", "--d2", "6", "--rank", "4", "--oversample", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = json.loads((tmp_path / "curvature_memory.json").read_text())["rows"]
    assert [r["N"] for r in rows] == [128, 256]
    assert all(r["reads_match"] for r in rows)
    # Reads per pass double with N: each shard's factors are read once per pass.
    assert rows[1]["pass_mib"] == pytest.approx(2 * rows[0]["pass_mib"], rel=0.05)
