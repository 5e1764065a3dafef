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
    """mpi4py on CPU tensors (buffers exchanged as numpy arrays without pickling)."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        send = np.ascontiguousarray(tensor.detach().cpu().numpy())
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=self.mpi.SUM)
        return torch.from_numpy(recv).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        buf = np.ascontiguousarray(tensor.detach().cpu().numpy())
        self.comm.Bcast(buf, root=src)
        return torch.from_numpy(buf).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return self.comm.gather(obj, root=dst)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.comm.bcast(obj, root=src)

    def barrier(self) -> None:
        self.comm.Barrier()


def _mpi_launched() -> bool:
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
    return any(k in os.environ for k in keys)


def get_collective(backend: str = "auto") -> Collective:
    """The collective for this process.

    "auto": torch.distributed when a process group is initialized, MPI when launched by
    mpiexec with more than one process, else a single process.
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
    if backend == "mpi" or (backend == "auto" and _mpi_launched()):
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
