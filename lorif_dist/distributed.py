"""Process layout: who am I (rank, local rank, world size, array task) and on which device.

Launchers announce themselves through the environment:

    torchrun / accelerate launch   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    srun                           SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST
    mpiexec (MPICH / Open MPI)     PMI_RANK / OMPI_COMM_WORLD_RANK, ...
    SLURM job arrays               SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN/COUNT

The torch process group is started when more than one process runs and torch is the
collectives backend (NCCL with CUDA, gloo otherwise).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch

from lorif_dist.collectives import Collective, get_collective, mpiexec_launched
from lorif_dist.modeling import resolve_device


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    collective: Collective
    task_id: int
    num_tasks: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*keys: str) -> int | None:
    for key in keys:
        if os.environ.get(key, "") != "":
            return int(os.environ[key])
    return None


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return first_host(nodelist)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list without scontrol: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]*)(?:\[([^\],\-]*))?", nodelist)
    return match.group(1) + (match.group(2) or "")


def _srun_step() -> bool:
    """True in a process started by srun (a job step); false in the batch script itself,
    which has SLURM_PROCID=0 and SLURM_NTASKS of the whole allocation but no step id."""
    return "SLURM_PROCID" in os.environ and (
        "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    )


def _slurm_step_tasks() -> int:
    return _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1


def _torch_env_from_slurm() -> None:
    """Maps srun's variables onto the ones torch.distributed's env:// init reads.

    Only inside an srun step of more than one task, and not when torchrun already set
    RANK: the batch script and a plain `python` in it stay single-process.
    """
    if "RANK" in os.environ or not _srun_step():
        return
    world = _slurm_step_tasks()
    if world <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # One port per job so jobs sharing a node do not collide (array tasks are jobs too).
    os.environ.setdefault(
        "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    )


def resolve_backend(backend: str = "auto") -> str:
    """The collectives backend a process should use: "torch", "mpi" or "single".

    "auto" goes by the launcher: torchrun / accelerate (RANK set) and multi-task srun steps
    -> torch; mpiexec / mpirun (also inside a SLURM job, where they start their ranks
    through srun themselves) -> mpi; otherwise a single process. Under srun, MPI is used
    only when asked for (run.backend=mpi with `srun --mpi=pmi2`).
    """
    import torch.distributed as dist

    if backend != "auto":
        return backend
    if (dist.is_available() and dist.is_initialized()) or (_env_int("WORLD_SIZE") or 1) > 1:
        return "torch"
    if mpiexec_launched():
        return "mpi"
    if _srun_step() and _slurm_step_tasks() > 1:
        return "torch"
    return "single"


def array_task() -> tuple[int, int]:
    """(task_id, num_tasks) of a SLURM job array; (0, 1) outside one."""
    task = _env_int("SLURM_ARRAY_TASK_ID")
    if task is None:
        return 0, 1
    low = _env_int("SLURM_ARRAY_TASK_MIN") or 0
    count = _env_int("SLURM_ARRAY_TASK_COUNT")
    if count is None:
        high = _env_int("SLURM_ARRAY_TASK_MAX") or task
        count = high - low + 1
    return task - low, count


def _gpu_index(local_rank: int) -> int:
    """The GPU of a node-local rank: `srun --gpus-per-task=1` shows each rank only its own
    GPU (index 0), `--gpus-per-node=G` shows all G; local_rank mod the visible count fits both."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank % count if count else local_rank


def init_runtime(
    device: str = "auto",
    backend: str = "auto",
    task_id: int | None = None,
    num_tasks: int | None = None,
) -> Runtime:
    """Starts (or joins) the process group and resolves the device and the array task."""
    import torch.distributed as dist

    backend = resolve_backend(backend)
    if backend == "torch":
        _torch_env_from_slurm()
        world = _env_int("WORLD_SIZE") or 1
        if world > 1 and not dist.is_initialized():
            use_nccl = torch.cuda.is_available() and device != "cpu"
            if use_nccl:
                torch.cuda.set_device(_gpu_index(_env_int("LOCAL_RANK") or 0))
            dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    collective = get_collective(backend)
    # mpiexec inside a SLURM job leaves SLURM_LOCALID=0 in every rank: MPI's own first
    # (SLURM_LOCALID is right under `srun --mpi=pmi2`, which sets no MPI local rank).
    local_keys = ("LOCAL_RANK", "SLURM_LOCALID")
    if collective.name == "mpi":
        local_keys = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
    local_rank = _env_int(*local_keys) or 0
    env_task, env_count = array_task()
    task_id = env_task if task_id is None else task_id
    num_tasks = env_count if num_tasks is None else num_tasks
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"run.task_id={task_id} is outside [0, run.num_tasks={num_tasks})")
    return Runtime(
        rank=collective.rank,
        world_size=collective.world_size,
        local_rank=local_rank,
        device=resolve_device(device, _gpu_index(local_rank)),
        collective=collective,
        task_id=task_id,
        num_tasks=num_tasks,
    )


def shutdown(runtime: Runtime | None = None) -> None:
    """Ends the process group cleanly (a barrier first, so no rank exits mid-collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
