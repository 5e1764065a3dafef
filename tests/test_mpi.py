"""Curvature and query under `mpiexec -n 2` (mpich + mpi4py from PyPI) equal one process.

The index is extracted once, in this process, as 3 array tasks (3 shards, so the two MPI
ranks own 2 and 1 of them); its copies then go through curvature and query in this process
on one rank, and as real `mpiexec -n 2 python -m lorif_dist ...` runs whose ranks find
their communicator by themselves (run.backend auto).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

from tests.launchers import (
    TINY_RECIPE,
    assert_same_curvature,
    assert_same_topk,
    run_single,
    subprocess_env,
    tiny_inputs,
    tiny_overrides,
    venv_tool,
)

pytestmark = pytest.mark.mpi
MPIEXEC = venv_tool("mpiexec")


def _mpi_stage(stage: str, overrides: list[str], ranks: int = 2) -> str:
    cmd = [MPIEXEC, "-n", str(ranks), _python(), "-m", "lorif_dist", stage]
    cmd += ["--config", str(TINY_RECIPE)] + overrides
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


def _python() -> str:
    import sys

    return sys.executable


@pytest.mark.skipif(
    MPIEXEC is None, reason="no mpiexec: pip install mpich (lorif_dist[distributed])"
)
@pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None, reason="no mpi4py: pip install mpi4py"
)
def test_curvature_and_query_under_mpiexec_equal_one_process(tmp_path):
    inputs = tiny_inputs(tmp_path / "inputs")
    single, mpi = tmp_path / "single", tmp_path / "mpi"
    run_single(["extract"], tiny_overrides(inputs, single), num_tasks=3)
    shutil.copytree(single, mpi)

    # One rank, in this process: the reference.
    run_single(["curvature", "query"], tiny_overrides(inputs, single))
    factored = ["--query.path", "factored", "--query.output"]
    run_single(["query"], tiny_overrides(inputs, single) + factored + [str(single / "q-fact")])

    # Two MPI ranks; the logs show that both joined one communicator.
    log = _mpi_stage("curvature", tiny_overrides(inputs, mpi))
    assert "3 shards over 2 rank(s)" in log, log
    log = _mpi_stage("query", tiny_overrides(inputs, mpi))
    assert "3 shards over 2 rank(s)" in log and "train_examples=24" in log, log
    _mpi_stage("query", tiny_overrides(inputs, mpi) + factored + [str(mpi / "q-fact")])

    layers = assert_same_curvature(mpi, single)
    assert len(layers) == 14
    # Each rank wrote the cached coordinates of its own shards.
    assert (
        sorted(p.name for p in (mpi / "curvature" / "coords").rglob("*.h5"))
        == ["rank-00000.h5"] * 3
    )
    assert_same_topk(mpi / "query", single / "query")
    assert_same_topk(mpi / "q-fact", single / "q-fact")
