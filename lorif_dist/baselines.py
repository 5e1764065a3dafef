"""The baselines LoRIF is measured against, on the same capture, projection, CLI and outputs.

Selected by `extract.method` (recorded in the index identity):

    logra    LoGRA: dense per-example projected gradients g_t (D = d1 d2 numbers per layer)
             and the exact damped inverse H^-1 = (G^T G + lambda I)^-1 (D x D per layer).
             Curvature: N D^2 flops to accumulate G^T G, D^3 / 3 to factorize it, D^2
             numbers stored per layer. Query: D^2 per query to precondition, then D per
             (query, example) pair.
    graddot  the plain gradient dot product sum over layers g_q . g_t (H = I): the floor any
             curvature has to beat. It stores the same dense gradients as logra, so what
             separates the two is the curvature alone, with no factorization error mixed in;
             the difference between lorif and graddot then bounds what LoRIF's curvature buys
             net of its rank-c and rank-r approximations.

Damping follows LoRIF's rule (`rsvd.damping_value`) on the exact trace of G^T G, so the
three methods differ only where they are meant to.

Artifacts (logra only): `curvature/<layer>.h5` with `inverse` (D, D) in
curvature.compute_dtype, attrs lambda, damping rule and value, trace, dim, method and the
curvature config hash; a layer whose file matches the config hash is not recomputed. graddot
writes only its manifest entry. The G^T G sum is all-reduced over ranks like LoRIF's
products, so the result does not depend on the number of ranks beyond summation order.
"""

from __future__ import annotations

from typing import Any

import h5py
import torch

from lorif_dist.config import Config
from lorif_dist.curvature import (
    _write_atomic_h5,
    curvature_path,
    iter_dense_blocks,
    record_curvature,
)
from lorif_dist.distributed import Runtime
from lorif_dist.integrity import open_shards
from lorif_dist.logging_utils import Timer, logger, progress, summary
from lorif_dist.manifest import require_complete
from lorif_dist.modeling import TORCH_DTYPES
from lorif_dist.rsvd import damping_value
from lorif_dist.storage import ShardReader


def index_method(manifest: dict[str, Any]) -> str:
    """The method an index was extracted with ("lorif" for indexes that predate the field)."""
    return manifest["identity"]["config"]["extract"].get("method", "lorif")


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(G^T G + lambda I)^-1 of a [D, D] Gram matrix, through a float64 Cholesky factor."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(gram.double() + damping * eye)
    return torch.cholesky_inverse(chol)


def accumulate_gram(
    readers: list[ShardReader], layer: str, dim: int, block_rows: int, dtype: torch.dtype, coll
) -> torch.Tensor:
    """G^T G [D, D] of one layer over every rank's shards (float64 sum of blocks)."""
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    for _, _, block in iter_dense_blocks(readers, layer, block_rows, dtype):  # [n_b, D]
        gram += (block.T @ block).double()
    # Every rank needs the same D x D sum; one all-reduce per layer.
    return coll.all_reduce_sum(gram)


def load_inverse(index_dir: str, layer: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored (G^T G + lambda I)^-1 [D, D] of a logra index's layer."""
    path = curvature_path(index_dir, layer)
    if not path.is_file():
        raise FileNotFoundError(
            f"no curvature for layer {layer!r} ({path}); run `lorif curvature` on this index"
        )
    with h5py.File(path, "r") as h5:
        if "inverse" not in h5:
            raise ValueError(
                f"{path} holds no dense inverse: the index was not built with extract.method=logra"
            )
        return torch.from_numpy(h5["inverse"][...]).to(dtype)


def precondition_dense(
    method: str, index_dir: str, layer: str, grads: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """h_q = H^-1 g_q for rows of grads [Q, D]: the dense inverse (logra) or identity (graddot)."""
    if method == "graddot":
        return grads.to(dtype)
    inverse = load_inverse(index_dir, layer, dtype)
    return grads.to(dtype) @ inverse  # H^-1 is symmetric: (H^-1 g)^T = g^T H^-1


def run_baseline_curvature(
    cfg: Config, runtime: Runtime, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The curvature stage of a logra or graddot index (its loaded manifest)."""
    timer = Timer()
    coll = runtime.collective
    index_dir = cfg.run.index_dir
    cc = cfg.curvature
    dtype = TORCH_DTYPES[cc.compute_dtype]
    method = index_method(manifest)
    shards = require_complete(index_dir, manifest)
    layers = manifest["identity"]["layers"]
    config_hash = cfg.section_hash("curvature")
    report: dict[str, Any] = {}

    if method == "logra":
        mine = shards[runtime.rank :: runtime.world_size]
        # Whole-file SHA-256 once per run, as for LoRIF's curvature.
        readers = open_shards(index_dir, manifest, mine, True, coll)
        if runtime.is_main:
            logger.info(
                "curvature: logra, dense damped inverse of %d layers (D up to %d), damping %s %g",
                len(layers),
                max(s["d1"] * s["d2"] for s in layers),
                cc.damping_rule,
                cc.damping,
            )
        for spec in progress(layers, len(layers), "curvature", cfg.run.progress, unit="layer"):
            report[spec["name"]] = _logra_layer(cfg, runtime, readers, spec, config_hash, dtype)
        for reader in readers:
            reader.close()
        coll.barrier()

    seconds = coll.max_float(timer.seconds)
    record_curvature(cfg, runtime, method, report, coordinates=False)
    summary("curvature", method=method, layers=len(layers), seconds=seconds)
    return report


def _logra_layer(cfg, runtime, readers, spec, config_hash, dtype) -> dict[str, float]:
    cc = cfg.curvature
    name, dim = spec["name"], spec["d1"] * spec["d2"]
    path = curvature_path(cfg.run.index_dir, name)
    up_to_date = False
    if runtime.is_main and path.is_file():
        with h5py.File(path, "r") as h5:
            up_to_date = h5.attrs.get("config_hash") == config_hash
    # Rank 0 decides for all: a rank skipping the all-reduce would hang the others.
    if runtime.collective.broadcast_object(up_to_date, src=0):
        with h5py.File(path, "r") as h5:
            return {"lambda": float(h5.attrs["lambda"]), "trace": float(h5.attrs["trace"])}

    gram = accumulate_gram(readers, name, dim, cc.batch_examples, dtype, runtime.collective)
    trace = float(torch.trace(gram))
    lam = damping_value(cc.damping_rule, cc.damping, trace, dim)
    if runtime.is_main:
        inverse = damped_inverse(gram, lam).to(dtype)
        attrs = {
            "method": "logra",
            "lambda": lam,
            "damping_rule": cc.damping_rule,
            "damping": cc.damping,
            "trace": trace,
            "dim": dim,
            "config_hash": config_hash,
        }
        _write_atomic_h5(path, {"inverse": inverse.numpy()}, attrs)
    return {"lambda": lam, "trace": trace}
