"""Which backend and layout a process takes from its launcher's environment (no launcher
runs here; tests/test_slurm.py and tests/test_mpi.py run the real ones)."""

from __future__ import annotations

import os

import pytest
import torch

from lorif_dist import distributed
from lorif_dist.distributed import array_task, first_host, resolve_backend

LAUNCH_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDI_")
TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# What each launcher sets (values as measured under Slurm 22.05 and MPICH 5 hydra).
BATCH_SCRIPT = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}
SRUN_STEP = {
    **BATCH_SCRIPT,
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NODELIST": "node[07-08]",
}
MPIEXEC = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1"}
# mpiexec inside a SLURM job: hydra starts its proxy with srun, the ranks inherit its step.
MPIEXEC_IN_SLURM = {
    **BATCH_SCRIPT,
    **MPIEXEC,
    "SLURM_STEP_ID": "1",
    "SLURM_STEP_NUM_TASKS": "1",
}
SRUN_PMI2 = {**SRUN_STEP, "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "11"}


@pytest.fixture
def launch_env():
    """Clears every launcher variable; returns a setter for one launcher's set. The whole
    environment is restored afterwards (the code under test sets RANK, WORLD_SIZE, ...)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in TORCH_KEYS:
            del os.environ[key]
    yield os.environ.update
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "single"),
        (BATCH_SCRIPT, "single"),  # the batch script itself is one process
        (SRUN_STEP, "torch"),
        ({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, "single"),
        ({"RANK": "0", "WORLD_SIZE": "4"}, "torch"),  # torchrun / accelerate launch
        (MPIEXEC, "mpi"),
        (MPIEXEC_IN_SLURM, "mpi"),
        (SRUN_PMI2, "torch"),  # MPI under srun only with run.backend=mpi
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpi"),  # another PMI launcher
    ],
)
def test_auto_backend_follows_the_launcher(launch_env, env, expected):
    launch_env(env)
    assert resolve_backend("auto") == expected


def test_srun_variables_map_onto_torch_env(launch_env, monkeypatch):
    launch_env(SRUN_STEP)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    distributed._torch_env_from_slurm()
    assert {k: os.environ[k] for k in TORCH_KEYS} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": "20007",
    }


def test_srun_mapping_leaves_torchrun_and_batch_scripts_alone(launch_env):
    launch_env({**SRUN_STEP, "RANK": "3", "WORLD_SIZE": "8"})
    distributed._torch_env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "8")
    for key in ("RANK", "WORLD_SIZE"):
        del os.environ[key]
    launch_env(BATCH_SCRIPT)
    del os.environ["SLURM_STEP_ID"]
    distributed._torch_env_from_slurm()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


@pytest.mark.parametrize(
    "nodelist,host",
    [("vm", "vm"), ("gpu[003-005,9],cpu1", "gpu003"), ("a,b", "a"), ("node-a[01-02]", "node-a01")],
)
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, (0, 1)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_MIN": "3",
                "SLURM_ARRAY_TASK_COUNT": "2",
            },
            (1, 2),
        ),
        (
            {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "5"},
            (2, 6),
        ),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, (0, 8)),
    ],
)
def test_array_task_from_slurm(launch_env, env, expected):
    launch_env(env)
    assert array_task() == expected


def test_runtime_under_an_srun_step_without_peers_is_single(launch_env):
    """srun -n 1 (and the batch script) start no process group."""
    launch_env({**SRUN_STEP, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    rt = distributed.init_runtime("cpu", "auto")
    assert (rt.rank, rt.world_size, rt.collective.name) == (0, 1, "single")


@pytest.mark.parametrize("visible,local_rank,index", [(1, 3, 0), (4, 3, 3), (2, 3, 1)])
def test_gpu_of_a_local_rank(monkeypatch, visible, local_rank, index):
    """--gpus-per-task=1 shows each rank one GPU; --gpus-per-node=G shows all G."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed._gpu_index(local_rank) == index
