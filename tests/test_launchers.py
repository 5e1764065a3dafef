"""The documented launch commands, run as real subprocesses on 2 CPU ranks: `torchrun` and
`accelerate launch` (launch/accelerate_cpu.yaml), each running `lorif run` (extract,
curvature, query) on configs/tiny.yaml, with results equal to a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorif_dist.manifest import load_manifest
from lorif_dist.query import load_score_matrix
from lorif_dist.testing import write_tiny_inputs
from tests.launchers import subprocess_env
from tests.multirank import free_port
from tests.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# tiny.yaml stores float16 factors of rank 1 and runs the curvature in float32; two ranks
# batch the examples differently, which moves scores by ~1e-5 of their scale.
SCORE_ATOL_OF_MAX = 1e-3


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """`python -m lorif_dist.testing runs/tiny`'s inputs, and a single-process run on them."""
    work = tmp_path_factory.mktemp("launch")
    write_tiny_inputs(work / "runs" / "tiny")
    cwd = os.getcwd()
    os.chdir(work)  # tiny.yaml's paths are relative to the launch directory
    try:
        run_pipeline(["--run.index_dir", "runs/tiny/single", "--run.backend", "single"], str(TINY))
    finally:
        os.chdir(cwd)
    return work


def _launch(cmd: list[str], work: Path, timeout_s: float = 300) -> None:
    print(" ".join(cmd))
    proc = subprocess.run(
        cmd, cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )


def _check_against_single(work: Path, name: str) -> None:
    index, single = work / "runs" / "tiny" / name, work / "runs" / "tiny" / "single"
    manifest = load_manifest(index)
    assert manifest["layout"]["world_size"] == 2
    assert sorted(manifest["shards"]) == ["task-0000/rank-00000", "task-0000/rank-00001"]
    num_train = manifest["dataset"]["num_records"]
    expected = load_score_matrix(single / "query", num_train)
    found = load_score_matrix(index / "query", num_train)
    scale = np.abs(expected).max()
    diff = np.abs(found - expected).max() / scale
    ids = [
        [json.loads(line)["train_id"] for line in (d / "query" / "topk.jsonl").open()]
        for d in (single, index)
    ]
    print(f"{name}: max |score difference| / max |score| = {diff:.2e}")
    assert diff < SCORE_ATOL_OF_MAX
    assert ids[0] == ids[1]


def test_torchrun_two_ranks_fsdp(workdir):
    cmd = [_tool("torchrun"), "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "lorif_dist", "run", "--config", str(TINY)]
    cmd += ["--run.index_dir", "runs/tiny/torchrun", "--run.parallel", "fsdp"]
    _launch(cmd, workdir)
    _check_against_single(workdir, "torchrun")


def test_accelerate_launch_two_cpu_processes(workdir):
    config = REPO / "launch" / "accelerate_cpu.yaml"
    cmd = [_tool("accelerate"), "launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(free_port())]
    cmd += ["-m", "lorif_dist", "run", "--config", str(TINY)]
    cmd += ["--run.index_dir", "runs/tiny/accelerate"]
    _launch(cmd, workdir)
    _check_against_single(workdir, "accelerate")


def test_shipped_launch_configs_name_their_mode():
    """Each accelerate config says in its header how it maps to run.parallel."""
    for name, mode in (("cpu", "none"), ("fsdp", "fsdp"), ("zero3", "zero3")):
        text = (REPO / "launch" / f"accelerate_{name}.yaml").read_text()
        assert f"run.parallel {mode}" in text, name
    ds = json.loads((REPO / "launch" / "ds_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds
