"""The one collectives interface the pipeline uses: all-reduce sum, broadcast, gather, barrier.

Math modules never call torch.distributed or MPI themselves; orchestration passes them a
`Collective`. Three backends:

    SingleProcess     world_size 1, every call is the identity
    TorchCollective   torch.distributed (NCCL on GPUs, gloo on CPUs)
    MPICollective     mpi4py, for CPU-node curvature and query jobs under srun / mpiexec
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch


class Collective:
    rank: int = 0
    world_size: int = 1
    name: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Returns the elementwise sum of `tensor` over ranks (on every rank)."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Returns rank `src`'s tensor on every rank (same shape and dtype everywhere)."""
        return tensor

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """A list of every rank's `obj` on rank `dst` (None elsewhere)."""
        return [obj]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        return None

    def max_float(self, value: float) -> float:
        """The largest value over ranks (e.g. the slowest rank's seconds)."""
        return max(self.all_gather_object(float(value)))


class SingleProcess(Collective):
    pass


class TorchCollective(Collective):
    """torch.distributed; the process group must already be initialized."""

    name = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.to(self.device).contiguous()
        self.dist.all_reduce(work, op=self.dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        work = tensor.to(self.device).contiguous()
        self.dist.broadcast(work, src=src)
        return work.to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == dst else None
        self.dist.gather_object(obj, out, dst=dst)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()


class MPICollective(Collective):
    """mpi4py on CPU tensors (buffers exchanged as numpy arrays without pickling).

    Dtypes numpy lacks (bfloat16) travel as their raw bytes for broadcast, and are summed
    in float32 for all-reduce (then cast back), so every tensor the pipeline uses works.
    """

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.detach().cpu()
        if work.dtype not in _NUMPY_SAFE:
            return self.all_reduce_sum(work.float()).to(tensor.dtype).to(tensor.device)
        send = np.ascontiguousarray(work.numpy())
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=self.mpi.SUM)
        return torch.from_numpy(recv).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        # A copy: Bcast writes into the buffer, and the caller's tensor must stay as it was.
        work = tensor.detach().cpu().contiguous().clone()
        raw = work.view(torch.uint8) if work.dtype not in _NUMPY_SAFE else work
        self.comm.Bcast(raw.numpy(), root=src)
        return work.to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return self.comm.gather(obj, root=dst)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.comm.bcast(obj, root=src)

    def barrier(self) -> None:
        self.comm.Barrier()


# torch dtypes whose .numpy() view exists (bfloat16 and the float8s have none).
_NUMPY_SAFE = {
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
}


def mpiexec_launched() -> bool:
    """True in a rank started by mpiexec / mpirun (MPICH hydra or Open MPI).

    Hydra sets MPI_LOCALNRANKS (and HYDI_CONTROL_FD when it starts ranks itself), also when
    it runs inside a SLURM job and starts its proxies through srun. srun's own PMI variables
    (PMI_SIZE under --mpi=pmi2, PMIX_RANK under pmix) do not count: under srun the torch
    backend is the default and MPI is used only when asked for.
    """
    if any(k in os.environ for k in ("MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "OMPI_COMM_WORLD_SIZE")):
        return True
    in_srun_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    return not in_srun_step and any(k in os.environ for k in ("PMI_SIZE", "PMIX_RANK"))


def get_collective(backend: str = "auto") -> Collective:
    """The collective for this process.

    "auto": torch.distributed when a process group is initialized, MPI when launched by
    mpiexec with more than one process (`mpiexec_launched`), else a single process.
    """
    import torch.distributed as dist

    if backend == "single":
        return SingleProcess()
    if backend == "torch" or (backend == "auto" and dist.is_available() and dist.is_initialized()):
        if not dist.is_initialized():
            raise RuntimeError(
                "run.backend=torch but no torch.distributed process group is initialized; "
                "launch with torchrun, accelerate launch or srun"
            )
        return TorchCollective()
    if backend == "mpi" or (backend == "auto" and mpiexec_launched()):
        try:
            coll = MPICollective()
        except ImportError as e:
            raise RuntimeError(
                "run.backend=mpi needs mpi4py: pip install 'lorif_dist[distributed]'"
            ) from e
        if coll.world_size > 1 or backend == "mpi":
            return coll
    return SingleProcess()


def nbytes_of(obj: Any) -> int:
    return len(pickle.dumps(obj))
