"""Multi-rank runs on CPU (gloo) started from pytest with torch.multiprocessing.spawn, and
the comparisons of their indexes against a one-rank run.

One spawn runs a list of pipeline runs in order, so several checks share the cost of
starting the processes and importing torch, transformers and DeepSpeed. DeepSpeed runs go
last in a list: while a ZeRO-3 model lives, transformers builds every model under
`deepspeed.zero.Init`.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.multiprocessing as mp

from lorif_dist.query import load_score_matrix

CRASH_EXIT_CODE = 17


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world_size: int, runs: list[dict[str, Any]], timeout_s: float = 240) -> None:
    """Runs `runs` on `world_size` spawned ranks; raises if a rank fails or time runs out.

    Each run is {"overrides": [...], "stages": [...], "crash": (rank, part) or None}.
    """
    context = mp.spawn(_worker, args=(world_size, free_port(), runs), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{world_size}-rank run did not finish within {timeout_s} s")


def _worker(rank: int, world_size: int, port: int, runs: list[dict[str, Any]]) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)  # up to 3 ranks share 2 cores
    if any("zero3" in run["overrides"] for run in runs):
        _skip_deepspeed_shm_build()

    from lorif_dist.config import load_config
    from lorif_dist.curvature import run_curvature
    from lorif_dist.distributed import init_runtime, shutdown
    from lorif_dist.extract import GradientExtractor, run_extract
    from lorif_dist.logging_utils import setup_logging
    from lorif_dist.query import run_query

    for run in runs:
        cfg = load_config(None, run["overrides"])
        runtime = init_runtime(cfg.model.device, cfg.run.backend)
        setup_logging(runtime.rank)
        if run.get("crash") and run["crash"][0] == rank:
            _crash_at_part(run["crash"][1])
        extractor = GradientExtractor(cfg, runtime)
        stages = run.get("stages", ("extract", "curvature", "query"))
        if "extract" in stages:
            run_extract(cfg, runtime, extractor)
        if "curvature" in stages:
            run_curvature(cfg, runtime)
        if "query" in stages:
            run_query(cfg, runtime, extractor)
        extractor.close()
    shutdown()


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce kernel (minutes on two
    cores) that ZeRO-3 parameter gathering never uses; without it DeepSpeed sends every
    collective through torch.distributed, as it does on GPUs, where no such kernel exists."""
    try:
        # By module path: the attribute deepspeed.comm.torch is the torch package itself.
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


def _crash_at_part(part: int) -> None:
    """Kills this rank, as a node failure would, when it is about to write part `part`."""
    from lorif_dist.storage import ShardWriter

    original = ShardWriter.write_part
    calls = [0]

    def write_part(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == part:
            os._exit(CRASH_EXIT_CODE)
        return original(self, *args, **kwargs)

    ShardWriter.write_part = write_part


# ---------------------------------------------------------------------------------------
# Reading and comparing indexes.


def read_factors(index: str | Path) -> dict[tuple[int, str], np.ndarray]:
    """{(example id, layer): dense G~ (d1, d2)} over all shards, in float64."""
    out = {}
    for path in sorted(glob.glob(f"{index}/shards/*/*.h5")):
        with h5py.File(path, "r") as h5:
            ids = h5["example_id"][...]
            for name, g in h5["layers"].items():
                left, scale, right = (
                    g[k][...].astype(np.float64) for k in ("left", "scale", "right")
                )
                dense = np.einsum("nik,nk,njk->nij", left, scale, right)
                out.update({(int(e), name): dense[i] for i, e in enumerate(ids)})
    return out


def read_curvature(index: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    out = {}
    for path in sorted(glob.glob(f"{index}/curvature/*.h5")):
        with h5py.File(path, "r") as h5:
            out[Path(path).stem] = (h5["V"][...], h5["s"][...], float(h5.attrs["lambda"]))
    return out


def read_topk(index: str | Path) -> list[dict]:
    lines = (Path(index) / "query" / "topk.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def compare_indexes(reference: str | Path, other: str | Path) -> dict[str, Any]:
    """Largest relative differences of factors, curvature and top-k between two indexes."""
    ref_f, oth_f = read_factors(reference), read_factors(other)
    assert ref_f.keys() == oth_f.keys(), "the two indexes store different (example, layer)s"
    factor_rel = max(np.abs(ref_f[k] - oth_f[k]).max() / np.abs(ref_f[k]).max() for k in ref_f)
    ref_c, oth_c = read_curvature(reference), read_curvature(other)
    assert ref_c.keys() == oth_c.keys()
    sv_rel = subspace_rel = damping_rel = 0.0
    for name, (v_ref, s_ref, lam_ref) in ref_c.items():
        v_oth, s_oth, lam_oth = oth_c[name]
        sv_rel = max(sv_rel, np.abs(s_ref - s_oth).max() / s_ref.max())
        # The subspace weighted by its spectrum, V S^2 V^T: directions of (near-)zero
        # singular value, which no two runs pick alike, carry no weight.
        a = (v_ref * s_ref.astype(np.float64) ** 2) @ v_ref.T
        b = (v_oth * s_oth.astype(np.float64) ** 2) @ v_oth.T
        subspace_rel = max(subspace_rel, np.abs(a - b).max() / np.abs(a).max())
        damping_rel = max(damping_rel, abs(lam_ref - lam_oth) / lam_ref)
    ref_t, oth_t = read_topk(reference), read_topk(other)
    num_train = max(e for e, _ in ref_f) + 1
    ref_s = load_score_matrix(Path(reference) / "query", num_train)
    oth_s = load_score_matrix(Path(other) / "query", num_train)
    assert ref_s.shape == oth_s.shape and (np.isnan(ref_s) == np.isnan(oth_s)).all()
    stored = ~np.isnan(ref_s)
    return {
        "factor_rel": float(factor_rel),
        "sv_rel": float(sv_rel),
        "subspace_rel": float(subspace_rel),
        "damping_rel": float(damping_rel),
        "topk_ids_equal": [r["train_id"] for r in ref_t] == [r["train_id"] for r in oth_t],
        "queries_equal": [r["query_response"] for r in ref_t]
        == [r["query_response"] for r in oth_t],
        "score_rel": max(
            abs(r["score"] - o["score"]) / abs(r["score"])
            for r, o in zip(ref_t, oth_t, strict=True)
        ),
        "score_matrix_rel": float(
            np.abs(ref_s[stored] - oth_s[stored]).max() / np.abs(ref_s[stored]).max()
        ),
        "num_topk": len(ref_t),
    }
