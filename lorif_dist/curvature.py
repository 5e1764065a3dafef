"""Stage 2, curvature: a distributed randomized SVD of every layer's G^T G.

Each rank reads the shards it owns (shard i belongs to rank i mod world_size, so every shard
is read once per pass), densifies a block of examples at a time from their factors and
accumulates G_block^T (G_block Q). The sum is all-reduced; rank 0's orthonormalized basis is
broadcast. Per-rank memory is O(D (r + p)) for one layer plus one block of examples,
whatever the number of examples.

Artifacts, per layer: `curvature/<layer>.h5` with V (D x r), s (r,), and attrs lambda,
damping rule, trace, explained variance and the curvature config hash. A layer whose file
exists with the same config hash is not recomputed, so a killed job resumes layer by layer.
With `cache_coordinates`, a last pass stores V^T g_t for every training example
(`curvature/coords/task-TTTT/rank-RRRRR.h5`, one (n, r) dataset per layer, rows in the
shard's order), which the factored query path needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lorif_dist.config import Config
from lorif_dist.distributed import Runtime
from lorif_dist.integrity import open_shards
from lorif_dist.logging_utils import Timer, logger, progress, summary
from lorif_dist.manifest import (
    describe_mismatch,
    identity_config,
    load_manifest,
    require_complete,
    update_section,
)
from lorif_dist.modeling import TORCH_DTYPES
from lorif_dist.projection import layer_seed
from lorif_dist.rsvd import Eigen, damping_value, explained_variance, randomized_eigh
from lorif_dist.safe_io import replace_h5
from lorif_dist.storage import ShardReader

CURVATURE_DIR = "curvature"


def curvature_path(index_dir: str | Path, layer: str) -> Path:
    return Path(index_dir) / CURVATURE_DIR / f"{layer}.h5"


def coords_path(index_dir: str | Path, shard: str) -> Path:
    return Path(index_dir) / CURVATURE_DIR / "coords" / f"{shard}.h5"


def shard_file(index_dir: str | Path, shard: str) -> Path:
    return Path(index_dir) / "shards" / f"{shard}.h5"


def _write_atomic_h5(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    with replace_h5(path, "curvature file") as h5:
        for key, arr in arrays.items():
            h5.create_dataset(key, data=arr)
        h5.attrs.update(attrs)


def save_curvature(path: Path, eigen: Eigen, damping: float, attrs: dict[str, Any]) -> None:
    arrays = {
        "V": eigen.vectors.cpu().numpy(),
        "s": eigen.singular_values.cpu().numpy(),
    }
    _write_atomic_h5(path, arrays, {"lambda": damping, **attrs})


def load_curvature(
    index_dir: str | Path, layer: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(V [D, r], s [r], lambda) of a layer."""
    path = curvature_path(index_dir, layer)
    if not path.is_file():
        raise FileNotFoundError(
            f"no curvature for layer {layer!r} ({path}); run `lorif curvature` on this index"
        )
    with h5py.File(path, "r") as h5:
        return (
            torch.from_numpy(h5["V"][...]).to(dtype),
            torch.from_numpy(h5["s"][...]).to(dtype),
            float(h5.attrs["lambda"]),
        )


def iter_dense_blocks(
    readers: Sequence[ShardReader], layer: str, block_rows: int, dtype: torch.dtype
):
    """Yields (reader index, row offset, G_block [n, D]) over the readers' examples."""
    for i, reader in enumerate(readers):
        for start in range(0, reader.num_examples, block_rows):
            stop = min(start + block_rows, reader.num_examples)
            yield i, start, reader.read_dense(layer, start, stop, dtype)
        # HDF5's cached chunk index of this layer would otherwise stay until the end.
        reader.drop_caches()


class LayerGram:
    """Applies A = G^T G of one layer, summed over the shards of every rank."""

    def __init__(self, readers, layer, dim, block_rows, dtype, collective) -> None:
        self.readers, self.layer, self.dim = readers, layer, dim
        self.block_rows, self.dtype, self.collective = block_rows, dtype, collective
        self.trace: float | None = None
        self.num_passes = 0

    def __call__(self, basis: torch.Tensor) -> torch.Tensor:
        # Blocks are multiplied in the compute dtype but summed in float64, so the result
        # does not depend (beyond float64 rounding) on how shards are split across ranks.
        out = torch.zeros(self.dim, basis.shape[1], dtype=torch.float64)
        sq_norms = torch.zeros((), dtype=torch.float64)
        for _, _, block in iter_dense_blocks(self.readers, self.layer, self.block_rows, self.dtype):
            out += (block.T @ (block @ basis)).double()  # G_b^T (G_b Q)
            if self.trace is None:
                sq_norms += (block.double() ** 2).sum()
        self.num_passes += 1
        # One all-reduce for the product and (on the first pass) the trace.
        packed = torch.cat([out.flatten(), sq_norms.reshape(1)])
        packed = self.collective.all_reduce_sum(packed)
        if self.trace is None:
            self.trace = float(packed[-1])
        return packed[:-1].reshape(self.dim, -1).to(self.dtype)


def record_curvature(
    cfg: Config, runtime: Runtime, method: str, layers: dict[str, Any], coordinates: bool
) -> None:
    """The manifest's curvature entry (rank 0 writes), seen by every rank on return."""
    cc = cfg.curvature
    if runtime.is_main:
        update_section(
            cfg.run.index_dir,
            "curvature",
            {
                "method": method,
                "config": dict(vars(cc)),
                "config_hash": cfg.section_hash("curvature"),
                "layers": layers,
                "coordinates_cached": coordinates,
            },
        )
    runtime.collective.barrier()  # a query started next in this process must see the entry


def warn_ignored_settings(cfg: Config, runtime: Runtime, manifest: dict[str, Any]) -> None:
    """Curvature reads the index as it was extracted: model, data and extract settings of
    this run that differ from the index's have no effect, and rank 0 says so."""
    recorded = manifest["identity"].get("config")
    if not runtime.is_main or not isinstance(recorded, dict):
        return
    mine = identity_config(cfg.to_dict())
    # Only the fields the index recorded (an index of an older version records fewer).
    ours = {
        sec: {k: mine[sec].get(k) for k in fields}
        for sec, fields in recorded.items()
        if sec in mine and isinstance(fields, dict)
    }
    diff = describe_mismatch({sec: recorded[sec] for sec in ours}, ours)
    if diff:
        logger.warning(
            "curvature: the index was extracted with other settings; these of this run are "
            "ignored (the stored gradients are used as they are):\n  %s",
            "\n  ".join(diff),
        )


def run_curvature(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Computes and saves (V, s, lambda) for every tracked layer of the index."""
    from lorif_dist.baselines import index_method, run_baseline_curvature

    timer = Timer()
    coll = runtime.collective
    index_dir = cfg.run.index_dir
    cc = cfg.curvature
    dtype = TORCH_DTYPES[cc.compute_dtype]

    # Prepare: a complete index; this rank's shards.
    manifest = load_manifest(index_dir)
    warn_ignored_settings(cfg, runtime, manifest)
    if index_method(manifest) != "lorif":
        return run_baseline_curvature(cfg, runtime, manifest)  # logra / graddot
    shards = require_complete(index_dir, manifest)
    mine = shards[runtime.rank :: runtime.world_size]
    # Whole-file SHA-256 here, once per run: curvature reads each shard q + 3 times anyway.
    readers = open_shards(index_dir, manifest, mine, True, coll)
    layers = manifest["identity"]["layers"]
    for spec in layers:
        if cc.rank > spec["d1"] * spec["d2"]:
            raise ValueError(
                f"curvature.rank={cc.rank} exceeds D = d1 * d2 = {spec['d1'] * spec['d2']} of "
                f"layer {spec['name']!r}; use curvature.rank <= "
                f"{min(s['d1'] * s['d2'] for s in layers)} (the smallest D of the index)"
            )
    config_hash = cfg.section_hash("curvature")
    seed = manifest["identity"]["projection"]["seed"]
    if runtime.is_main:
        logger.info(
            "curvature: %d layers, %d shards over %d rank(s), r=%d p=%d q=%d, damping %s %g",
            len(layers),
            len(shards),
            runtime.world_size,
            cc.rank,
            cc.oversample,
            cc.power_iters,
            cc.damping_rule,
            cc.damping,
        )

    # Local work + reduction, layer by layer.
    report: dict[str, Any] = {}
    for spec in progress(layers, len(layers), "curvature", cfg.run.progress, unit="layer"):
        name, dim = spec["name"], spec["d1"] * spec["d2"]
        path = curvature_path(index_dir, name)
        if _up_to_date(path, config_hash, coll):
            report[name] = _summary_of(path)
            continue
        gram = LayerGram(readers, name, dim, cc.batch_examples, dtype, coll)
        eigen = randomized_eigh(
            gram,
            dim,
            cc.rank,
            cc.oversample,
            cc.power_iters,
            seed=layer_seed(seed, name, "curvature"),
            dtype=dtype,
            agree=lambda t: coll.broadcast(t, src=0),
        )
        lam = damping_value(cc.damping_rule, cc.damping, gram.trace, dim)
        explained = explained_variance(eigen.singular_values, gram.trace)
        attrs = {
            "config_hash": config_hash,
            "damping_rule": cc.damping_rule,
            "damping": cc.damping,
            "trace": gram.trace,
            "explained_variance": explained,
            "rank": cc.rank,
            "dim": dim,
        }
        if runtime.is_main:
            save_curvature(path, eigen, lam, attrs)
        report[name] = {"lambda": lam, "trace": gram.trace, "explained_variance": explained}
    coll.barrier()

    # Cached curvature coordinates V^T g_t for the factored query path.
    if cc.cache_coordinates:
        for name, reader in zip(mine, readers, strict=False):
            write_coordinates(index_dir, name, reader, layers, cc.batch_examples, dtype)
        coll.barrier()
    for reader in readers:
        reader.close()

    # Record in the manifest; summary.
    seconds = coll.max_float(timer.seconds)
    record_curvature(cfg, runtime, "lorif", report, cc.cache_coordinates)
    mean_explained = float(np.mean([v["explained_variance"] for v in report.values()]))
    summary(
        "curvature",
        layers=len(layers),
        rank=cc.rank,
        mean_explained_variance=mean_explained,
        seconds=seconds,
    )
    return report


def _up_to_date(path: Path, config_hash: str, coll) -> bool:
    """Rank 0 decides (all ranks must agree, or their collectives would mismatch)."""
    ok = False
    if coll.is_main and path.is_file():
        try:
            with h5py.File(path, "r") as h5:
                ok = h5.attrs.get("config_hash") == config_hash
        except OSError:
            ok = False
    return bool(coll.broadcast_object(ok, src=0))


def _summary_of(path: Path) -> dict[str, float]:
    with h5py.File(path, "r") as h5:
        return {
            "lambda": float(h5.attrs["lambda"]),
            "trace": float(h5.attrs["trace"]),
            "explained_variance": float(h5.attrs["explained_variance"]),
        }


def write_coordinates(index_dir, shard, reader, layers, block_rows, dtype) -> None:
    """V^T g_t for every example of one shard, one (n, r) dataset per layer.

    Written block by block into the file (published by rename when whole), so memory holds
    one block of examples and V, whatever the shard's size.
    """
    with replace_h5(coords_path(index_dir, shard), "curvature coordinates file") as h5:
        for spec in layers:
            vectors, _, _ = load_curvature(index_dir, spec["name"], dtype)  # V [D, r]
            coords = create_coords_dataset(h5, spec["name"], reader.num_examples, vectors)
            for _, start, block in iter_dense_blocks([reader], spec["name"], block_rows, dtype):
                coords[start : start + block.shape[0]] = (block @ vectors).numpy()  # [n_b, r]
        h5.attrs["num_examples"] = reader.num_examples


def create_coords_dataset(h5, layer: str, num_examples: int, vectors: torch.Tensor):
    """The (n, r) coordinates dataset of one layer (`lorif plan` sizes files with it too)."""
    return h5.create_dataset(
        layer, shape=(num_examples, vectors.shape[1]), dtype=vectors.numpy().dtype
    )
