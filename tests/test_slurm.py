"""A real one-node SLURM cluster (Debian's slurmctld, slurmd and munge, started here by
slurm/local-cluster.sh and stopped after) runs srun steps, job arrays and the chain script.

Needs root and the packages, which `launch/setup.sh` installs as root through apt-get
(or `bash slurm/local-cluster.sh install`); skipped otherwise, saying which is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.launchers import (
    ROOT,
    TINY_RECIPE,
    assert_same_curvature,
    assert_same_topk,
    run_single,
    subprocess_env,
    tiny_inputs,
    tiny_overrides,
)

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
DONE_STATES |= {"BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _cannot_run_slurm() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root here: starting slurmctld and slurmd for a local cluster needs root"
    missing = [
        tool
        for tool in ("slurmctld", "slurmd", "sbatch", "munged")
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
    ]
    if missing:
        how = "run `bash launch/setup.sh` (as root with apt-get it installs them)"
        return f"SLURM is not installed ({', '.join(missing)} missing); {how}"
    return None


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """The environment of a running one-node cluster (SLURM_CONF set); stopped at the end."""
    reason = _cannot_run_slurm()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-cluster")
    start = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    try:
        assert start.returncode == 0, f"the local cluster did not start:\n{start.stderr}"
        yield subprocess_env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


def _sbatch(env: dict, *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wait_for_jobs(env: dict, job_ids: list[str], timeout_s: float = 150) -> dict[str, str]:
    """JobState of every job (each task of an array) once all have ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {}
        for job in job_ids:
            out = subprocess.run(
                ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
            ).stdout
            for line in out.splitlines():
                name = re.search(r"JobId=(\S+)", line).group(1)
                task = re.search(r"ArrayTaskId=(\S+)", line)
                states[f"{name}_{task.group(1)}" if task else name] = re.search(
                    r"JobState=(\S+)", line
                ).group(1)
        if states and all(s in DONE_STATES for s in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], env=env)
            raise AssertionError(f"jobs still running after {timeout_s} s: {states}")
        time.sleep(0.5)


def _logs(log_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*")))


PROBE = """
import json, os, sys, torch
from lorif_dist.distributed import init_runtime, shutdown
rt = init_runtime("cpu")
total = rt.collective.all_reduce_sum(torch.tensor([rt.rank + 1.0]))
print("PROBE " + json.dumps({
    "where": sys.argv[1], "rank": rt.rank, "world": rt.world_size, "local_rank": rt.local_rank,
    "task": rt.task_id, "num_tasks": rt.num_tasks, "backend": rt.collective.name,
    "sum": float(total), "master": os.environ.get("MASTER_ADDR"),
    "port": os.environ.get("MASTER_PORT")}), flush=True)
shutdown()
"""


def test_srun_steps_and_array_tasks_set_up_the_runtime(slurm_env, tmp_path):
    """Array tasks 3 and 4 (so task ids 0 and 1 of 2), each a 2-task srun step that joins
    one gloo group from SLURM's variables; the batch script itself stays one process."""
    script = tmp_path / "probe.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f'{sys.executable} -c "$PROBE" batch\n'
        f'srun --kill-on-bad-exit=1 {sys.executable} -c "$PROBE" step\n'
    )
    job = _sbatch(
        {**slurm_env, "PROBE": PROBE},
        "--array=3-4",
        "--ntasks=2",
        f"--output={tmp_path}/probe-%A_%a.out",
        str(script),
    )
    states = _wait_for_jobs(slurm_env, [job], timeout_s=90)
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(tmp_path)}"

    probes = [
        json.loads(line.split(" ", 1)[1])
        for path in tmp_path.glob("probe-*.out")
        for line in path.read_text().splitlines()
        if line.startswith("PROBE ")
    ]
    batch = [p for p in probes if p["where"] == "batch"]
    steps = [p for p in probes if p["where"] == "step"]
    assert len(batch) == 2 and len(steps) == 4, _logs(tmp_path)
    for p in batch:
        assert (p["world"], p["backend"], p["sum"], p["num_tasks"]) == (1, "single", 1.0, 2)
    for task in (0, 1):
        ranks = [p for p in steps if p["task"] == task]
        assert sorted(p["rank"] for p in ranks) == [0, 1]
        assert sorted(p["local_rank"] for p in ranks) == [0, 1]
        assert {(p["world"], p["backend"], p["sum"], p["num_tasks"]) for p in ranks} == {
            (2, "torch", 3.0, 2)
        }
        assert {p["master"] for p in ranks} == {socket.gethostname().split(".")[0]}
    # Each array task is its own job, with its own rendezvous port.
    assert len({p["port"] for p in steps}) == 2


def _factors_by_example(index_dir: Path) -> dict[int, np.ndarray]:
    """Every stored example's densified gradient, all layers concatenated."""
    from lorif_dist.factorize import densify
    from lorif_dist.storage import ShardReader

    out: dict[int, list] = {}
    for path in sorted((index_dir / "shards").rglob("*.h5")):
        with ShardReader(path) as reader:
            for layer in reader.h5["layers"]:
                dense = densify(*reader.read(layer, 0, reader.num_examples)).numpy()
                for example_id, row in zip(reader.example_ids.tolist(), dense, strict=True):
                    out.setdefault(example_id, []).append(row)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_chain_script_on_the_tiny_recipe_equals_one_process(slurm_env, tmp_path):
    """slurm/chain.sh: a 2-task extraction array (2 srun ranks each), then curvature and
    query (2 ranks each) on afterok dependencies; the index and results equal a
    single-process run. float32 storage keeps the comparison at float32 tolerance (with
    float16 the two runs' factors, batched differently, may round apart by one ulp)."""
    inputs = tiny_inputs(tmp_path / "inputs")
    slurm_index, single_index, log_dir = tmp_path / "slurm", tmp_path / "single", tmp_path / "logs"
    storage = ["--extract.storage_dtype", "float32"]
    env = {
        **slurm_env,
        "LORIF_CONFIG": str(TINY_RECIPE),
        "LORIF_INDEX": str(slurm_index),
        "LORIF_ARGS": " ".join(tiny_overrides(inputs, slurm_index)[:-2] + storage),
        "LORIF_PYTHON": sys.executable,
        "LORIF_LOG_DIR": str(log_dir),
        "LORIF_NUM_TASKS": "2",
        "LORIF_RANKS": "2",
    }
    chain = subprocess.run(
        ["bash", str(ROOT / "slurm" / "chain.sh")], env=env, capture_output=True, text=True
    )
    assert chain.returncode == 0, chain.stderr
    ids = dict(line.split("=", 1) for line in chain.stdout.split())
    assert list(ids) == ["extract", "curvature", "query"] and all(v.isdigit() for v in ids.values())

    # The single-process reference runs while the cluster works.
    run_single(["extract", "curvature", "query"], tiny_overrides(inputs, single_index) + storage)

    states = _wait_for_jobs(slurm_env, list(ids.values()), timeout_s=150)
    assert len(states) == 4 and set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(log_dir)}"
    manifest = json.loads((slurm_index / "manifest.json").read_text())
    assert manifest["layout"] == {"num_tasks": 2, "world_size": 2}
    assert sorted(manifest["shards"]) == [
        f"task-000{t}/rank-0000{r}" for t in (0, 1) for r in (0, 1)
    ]

    got, want = _factors_by_example(slurm_index), _factors_by_example(single_index)
    assert sorted(got) == sorted(want) == list(range(24))
    scale = max(np.abs(v).max() for v in want.values())
    for example_id, row in want.items():
        np.testing.assert_allclose(got[example_id], row, rtol=1e-4, atol=1e-5 * scale)
    assert_same_curvature(slurm_index, single_index)
    assert_same_topk(slurm_index / "query", single_index / "query")
    assert "4 shards over 2 rank(s)" in _logs(log_dir)
