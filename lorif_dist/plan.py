"""`lorif plan`: what a run will cost, from a model's config.json alone (no weights).

The model is built on the meta device (no memory, no weights), and the tracked layers are
chosen by the same `select_layers` the extraction uses, so layer selection and shapes are
the real ones. Per layer (input width I, output width O): d1 = I // f, d2 = O // f,
D = d1 d2 and c; then

    stored bytes per example   (d1 + d2) c b_s + c b_scale per layer, plus 16 bytes of id,
                               loss and token count (b_s: storage dtype, b_scale: 4 or 8)
    shard bytes                payload + HDF5 metadata, see `ShardSizeModel`
    curvature file per layer   D r b_c (V) + r b_c (s) + metadata (b_c: compute dtype)
    coordinates per shard      n r b_c per layer + metadata
    curvature memory per layer estimated peak of the buffers rsvd.py / curvature.py hold,
                               max(3 D m b_c + B D (b_c + 16), D m (6 b_c + 16)), m = r + p,
                               B = batch_examples (bench/plan_memory.py checks it)
    query I/O per query batch  every shard once (+ coordinates on the factored path) and
                               every V once; dense preconditioned queries hold Q sum(D) b_c
    time                       N x mean tokens / (tokens per second per rank x ranks)

Examples are dealt to (task, rank) exactly as extraction deals them, so the shard sizes
are exact counts, not averages. Throughput is given (--tokens-per-second, per rank) or
measured from an index a pilot run wrote (--from-index: tokens and seconds per shard).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorif_dist.config import Config
from lorif_dist.logging_utils import human_bytes
from lorif_dist.manifest import expected_shards
from lorif_dist.modeling import TORCH_DTYPES, LayerSpec, select_layers
from lorif_dist.projection import projected_dims
from lorif_dist.query import lorif_query_path
from lorif_dist.storage import NP_DTYPES, FactorBlock, ShardWriter

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
PER_EXAMPLE_FIXED_BYTES = 8 + 4 + 4  # example_id int64, loss float32, num_tokens int32
FINAL_CHUNK_ROWS = 64  # ShardWriter.finalize's chunk_rows
FLETCHER_BYTES = 4  # one checksum per chunk


@dataclass(frozen=True)
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    d1: int
    d2: int
    c: int

    @property
    def dim(self) -> int:
        return self.d1 * self.d2


def load_model_config(path: str | Path, trust_remote_code: bool = False) -> Any:
    """A transformers config from a config.json file or a directory holding one."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"model config {str(path)!r} not found: pass a config.json (see configs/models/) "
            "or a checkpoint directory holding one"
        )
    raw = json.loads(file.read_text())
    if "model_type" not in raw:
        raise ValueError(f"{file}: no 'model_type' field; is this a Hugging Face config.json?")
    # The file itself: a config saved under another name is read, not its folder's config.json.
    return AutoConfig.from_pretrained(str(file), trust_remote_code=trust_remote_code)


def meta_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The causal LM built on the meta device: real module tree and shapes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def plan_layers(specs: list[LayerSpec], factor: int, rank: int, exact: bool) -> list[LayerPlan]:
    out = []
    for spec in specs:
        d1, d2 = projected_dims(spec, factor)
        c = min(d1, d2) if exact else rank
        out.append(LayerPlan(spec.name, spec.in_features, spec.out_features, d1, d2, c))
    return out


# ---------------------------------------------------------------------------------------
# Bytes on disk.


def _zeros_block(layers: list[LayerPlan], n: int, storage_dtype: str, unit: bool) -> FactorBlock:
    """n rows of zeros with the layers' real dims (or 1 x 1 x 1 when `unit`)."""
    dt = NP_DTYPES[storage_dtype]
    st = np.float64 if storage_dtype == "float64" else np.float32
    shape = {s.name: (1, 1, 1) if unit else (s.d1, s.d2, s.c) for s in layers}
    return FactorBlock(
        example_ids=np.arange(n, dtype=np.int64),
        losses=np.zeros(n, np.float32),
        num_tokens=np.zeros(n, np.int32),
        left={k: np.zeros((n, d1, c), dt) for k, (d1, _, c) in shape.items()},
        right={k: np.zeros((n, d2, c), dt) for k, (_, d2, c) in shape.items()},
        scale={k: np.zeros((n, c), st) for k, (_, _, c) in shape.items()},
    )


def _written_size(layers: list[LayerPlan], n: int, storage_dtype: str, unit: bool) -> int:
    """Bytes of a shard written by the real ShardWriter (in a temporary directory)."""
    dims = {s.name: (1, 1, 1) if unit else (s.d1, s.d2, s.c) for s in layers}
    with tempfile.TemporaryDirectory(prefix="lorif-plan-") as tmp:
        writer = ShardWriter(Path(tmp) / "s.h5", "0" * 16, dims, storage_dtype)
        writer.write_part(_zeros_block(layers, n, storage_dtype, unit), 0, 1)
        writer.finalize()
        return (Path(tmp) / "s.h5").stat().st_size


class ShardSizeModel:
    """Bytes of a finished shard of n examples.

    bytes(n) = payload over whole chunks + a Fletcher-32 checksum per chunk + metadata.
    HDF5 allocates the last, partial chunk of each layer dataset in full, so the payload
    counts ceil(n / 64) * 64 rows. Metadata is not modelled by hand: it is the size of a
    one-example shard written by the real `ShardWriter` with these layers, minus its
    payload, plus the growth of a dataset's chunk index (a B-tree that splits beyond 64
    chunks), measured on a one-layer shard of n rows of width 1 and scaled by the number
    of layers (it depends only on the number of chunks and the dataset's rank).
    """

    def __init__(self, layers: list[LayerPlan], storage_dtype: str) -> None:
        self.layers, self.storage_dtype = layers, storage_dtype
        sb = DTYPE_BYTES[storage_dtype]
        scale_b = 8 if storage_dtype == "float64" else 4
        self.layer_row_bytes = sum((s.d1 + s.d2) * s.c * sb + s.c * scale_b for s in layers)
        self.example_bytes = PER_EXAMPLE_FIXED_BYTES + self.layer_row_bytes
        self.metadata_bytes = _written_size(layers, 1, storage_dtype, False) - self._data(
            1, self.layer_row_bytes, len(layers)
        )

    @staticmethod
    def _data(n: int, layer_row_bytes: int, num_layers: int) -> int:
        """Payload plus checksums of n examples."""
        if n == 0:
            return 0
        rows = min(n, FINAL_CHUNK_ROWS)
        chunks = math.ceil(n / rows)
        payload = n * PER_EXAMPLE_FIXED_BYTES + chunks * rows * layer_row_bytes
        return payload + FLETCHER_BYTES * (3 + 3 * num_layers * chunks)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a handful of distinct n per plan)
    def _index_growth(self, n: int) -> int:
        if n <= FINAL_CHUNK_ROWS * FINAL_CHUNK_ROWS:  # <= 64 chunks: one B-tree node
            return 0
        one = [LayerPlan("layer", 1, 1, 1, 1, 1)]
        row = ShardSizeModel._unit_row_bytes(self.storage_dtype)
        grown = _written_size(one, n, self.storage_dtype, True) - self._data(n, row, 1)
        small = _written_size(one, 1, self.storage_dtype, True) - self._data(1, row, 1)
        return (grown - small) * len(self.layers)

    @staticmethod
    def _unit_row_bytes(storage_dtype: str) -> int:
        return 2 * DTYPE_BYTES[storage_dtype] + (8 if storage_dtype == "float64" else 4)

    def bytes(self, n: int) -> int:
        if n == 0:
            return _written_size(self.layers, 0, self.storage_dtype, False)
        data = self._data(n, self.layer_row_bytes, len(self.layers))
        return data + self.metadata_bytes + self._index_growth(n)


def curvature_file_overhead(compute_dtype: str) -> int:
    """Metadata bytes of one `curvature/<layer>.h5` (V, s and the attrs run_curvature sets)."""
    import torch

    from lorif_dist.curvature import save_curvature
    from lorif_dist.rsvd import Eigen

    dtype = {"float32": torch.float32, "float64": torch.float64}[compute_dtype]
    eigen = Eigen(torch.zeros(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype))
    attrs = {
        "config_hash": "0" * 16,
        "damping_rule": "relative",
        "damping": 0.1,
        "trace": 1.0,
        "explained_variance": 1.0,
        "rank": 1,
        "dim": 1,
    }
    with tempfile.TemporaryDirectory(prefix="lorif-plan-") as tmp:
        path = Path(tmp) / "layer.h5"
        save_curvature(path, eigen, 1.0, attrs)
        return path.stat().st_size - 2 * DTYPE_BYTES[compute_dtype]


def coords_file_overhead(layers: list[LayerPlan], compute_dtype: str) -> int:
    """Metadata bytes of one `curvature/coords/...h5` (one (n, r) dataset per layer)."""
    from lorif_dist.curvature import create_coords_dataset  # what write_coordinates uses
    from lorif_dist.safe_io import create_h5

    vectors = torch.zeros(1, 1, dtype=TORCH_DTYPES[compute_dtype])
    with tempfile.TemporaryDirectory(prefix="lorif-plan-") as tmp:
        path = Path(tmp) / "coords.h5"
        with create_h5(path) as h5:
            for spec in layers:
                create_coords_dataset(h5, spec.name, 1, vectors)[0:1] = vectors.numpy()
            h5.attrs["num_examples"] = 1
        return path.stat().st_size - len(layers) * DTYPE_BYTES[compute_dtype]


def curvature_peak_bytes(dim: int, width: int, batch_examples: int, compute_bytes: int) -> int:
    """Estimated peak memory of one layer's randomized SVD on one rank.

    The larger of two moments (b = compute dtype bytes, m = r + p, B = batch_examples):
    the first pass over the examples holds the basis and a temporary product (D x m in the
    compute dtype), the float64 running sum, its float64 copy and the packed all-reduce
    buffer, beside a densified block and its two float64 copies for the trace,
    D m (2 b + 24) + B D (b + 16); orthonormalization and the final projection hold about six
    D x m buffers in the compute dtype and two in float64, D m (6 b + 16).
    `bench/plan_memory.py` compares this with the measured peak resident set.
    """
    first_pass = dim * width * (2 * compute_bytes + 24) + batch_examples * dim * (
        compute_bytes + 16
    )
    orthonormalize = dim * width * (6 * compute_bytes + 16)
    return max(first_pass, orthonormalize)


def shard_sizes(num_examples: int, num_tasks: int, world_size: int) -> list[int]:
    """Examples per (task, rank), dealt as extraction deals them (order[t::K][r::W])."""
    sizes = []
    for task in range(num_tasks):
        in_task = len(range(task, num_examples, num_tasks))
        sizes.extend(len(range(rank, in_task, world_size)) for rank in range(world_size))
    return sizes


# ---------------------------------------------------------------------------------------
# The plan.


@dataclass
class PlanInputs:
    cfg: Config  # f, c, r, p, layers, dtypes, batch sizes, parallel mode
    model_config: str
    num_examples: int
    mean_tokens: float
    world_size: int = 1
    num_tasks: int = 1
    tokens_per_second: float | None = None  # per rank
    throughput_source: str = "not given"
    num_queries: int = 64


def measured_throughput(index_dir: str | Path) -> float:
    """Tokens per second per rank, from the shard entries a pilot extraction recorded."""
    from lorif_dist.manifest import load_manifest

    entries = load_manifest(index_dir)["shards"].values()
    tokens = sum(e.get("tokens_computed", 0) for e in entries)
    seconds = sum(e.get("seconds", 0.0) for e in entries)
    if tokens <= 0 or seconds <= 0:
        raise ValueError(
            f"the index at {index_dir} records no extraction throughput (tokens_computed and "
            "seconds per shard); extract a pilot with this version, or pass --tokens-per-second"
        )
    return tokens / seconds


def _layer_rows(layers: list[LayerPlan], inputs: PlanInputs) -> list[dict[str, Any]]:
    cc, ex = inputs.cfg.curvature, inputs.cfg.extract
    sb, cb = DTYPE_BYTES[ex.storage_dtype], DTYPE_BYTES[cc.compute_dtype]
    scale_b = 8 if ex.storage_dtype == "float64" else 4
    rows = []
    for s in layers:
        width = min(cc.rank + cc.oversample, s.dim)
        rows.append(
            {
                "name": s.name,
                "I": s.in_features,
                "O": s.out_features,
                "d1": s.d1,
                "d2": s.d2,
                "D": s.dim,
                "c": s.c,
                "bytes_per_example": (s.d1 + s.d2) * s.c * sb + s.c * scale_b,
                "curvature_V_bytes": s.dim * min(cc.rank, s.dim) * cb,
                "curvature_peak_bytes": curvature_peak_bytes(s.dim, width, cc.batch_examples, cb),
            }
        )
    return rows


def _query_plan(layers, inputs: PlanInputs, index_bytes: int, coords_bytes: int, v_bytes: int):
    cfg, q = inputs.cfg, inputs.num_queries
    cb = DTYPE_BYTES[cfg.curvature.compute_dtype]
    r = cfg.curvature.rank
    dense_cost = sum(s.dim for s in layers)
    path = lorif_query_path(
        cfg.query.path,
        cfg.curvature.cache_coordinates,
        [(s.d1, s.d2, s.c) for s in layers],
        r,
        cfg.query.factor_rank,
    )
    read = index_bytes + v_bytes + (coords_bytes if path == "factored" else 0)
    held = (
        q * dense_cost * cb
        if path == "dense"
        else q * sum(((cfg.query.factor_rank or s.c) * (s.d1 + s.d2) + r) * 8 for s in layers)
    )
    return {
        "num_queries": q,
        "path": path,
        "read_bytes": read,
        "read_bytes_per_rank": read / inputs.world_size,
        "preconditioned_bytes_per_rank": held,
        "score_matrix_bytes": q * inputs.num_examples * 8,
    }


def _storage_plan(layers: list[LayerPlan], inputs: PlanInputs) -> dict[str, Any]:
    """Exact examples per shard; bytes of shards, curvature files and coordinates."""
    ex, cc = inputs.cfg.extract, inputs.cfg.curvature
    sizes = shard_sizes(inputs.num_examples, inputs.num_tasks, inputs.world_size)
    size_model = ShardSizeModel(layers, ex.storage_dtype)
    shard_bytes = [size_model.bytes(n) for n in sizes]
    cb, r = DTYPE_BYTES[cc.compute_dtype], cc.rank
    curv_overhead = curvature_file_overhead(cc.compute_dtype)
    coords_overhead = coords_file_overhead(layers, cc.compute_dtype)
    coords_bytes = sum(n * r * cb * len(layers) + coords_overhead for n in sizes)
    return {
        "bytes_per_example": size_model.example_bytes,
        "dense_bytes_per_example": sum(s.dim for s in layers) * 4,
        "shard_examples_max": max(sizes),
        "shard_bytes_max": max(shard_bytes),
        "shard_bytes": dict(zip(_shard_names(inputs), shard_bytes, strict=True)),
        "join_peak_bytes_per_rank": 2 * max(shard_bytes),
        "index_bytes": sum(shard_bytes),
        "curvature_bytes": sum(s.dim * min(r, s.dim) * cb + r * cb + curv_overhead for s in layers),
        "coords_bytes": coords_bytes if cc.cache_coordinates else 0,
    }


def dense_method_refusal(layers: list[LayerPlan], inputs: PlanInputs) -> str:
    """The plan models LoRIF's index; for the dense baselines it says what dominates."""
    ex, cc = inputs.cfg.extract, inputs.cfg.curvature
    scale_b = 8 if ex.storage_dtype == "float64" else 4
    per_example = sum(s.dim * DTYPE_BYTES[ex.storage_dtype] + scale_b for s in layers)
    text = (
        f"lorif plan models extract.method lorif only, got {ex.method!r}. Its dense rows take "
        f"{human_bytes(per_example)} per example at f={ex.projection_factor} "
        f"({human_bytes(per_example * inputs.num_examples)} for N={inputs.num_examples:,})"
    )
    if ex.method == "logra":
        inverse = [s.dim**2 * DTYPE_BYTES[cc.compute_dtype] for s in layers]
        text += (
            f"; its damped inverses {human_bytes(sum(inverse))} on disk, the largest "
            f"layer's {human_bytes(max(inverse))} in memory at once"
        )
    return text + ". Plan the LoRIF index with --extract.method lorif."


def make_plan(inputs: PlanInputs) -> dict[str, Any]:
    """Shapes, bytes, memory and time of a run, as a dict (`format_plan` prints it)."""
    cfg = inputs.cfg
    ex, cc = cfg.extract, cfg.curvature
    hf_config = load_model_config(inputs.model_config, cfg.model.trust_remote_code)
    model = meta_model(hf_config, cfg.model.trust_remote_code)
    specs = select_layers(model, ex.layers, ex.exclude_layers)
    layers = plan_layers(specs, ex.projection_factor, ex.factor_rank, ex.exact_factors)
    if ex.method != "lorif":
        raise ValueError(dense_method_refusal(layers, inputs))
    num_params = sum(p.numel() for p in model.parameters())
    weights_bytes = num_params * DTYPE_BYTES[cfg.model.dtype]
    rows = _layer_rows(layers, inputs)
    storage = _storage_plan(layers, inputs)
    tokens = inputs.num_examples * inputs.mean_tokens
    ranks = inputs.world_size * inputs.num_tasks
    tps = inputs.tokens_per_second
    # Every curvature pass reads every shard: 1 + q + 1 passes, the coordinates pass, and
    # the checksum read.
    num_reads = cc.power_iters + 2 + int(cc.cache_coordinates) + 1
    return {
        "model": {
            "config": str(inputs.model_config),
            "class": type(model).__name__,
            "num_parameters": num_params,
            "weights_bytes": weights_bytes,
            "weights_bytes_per_rank": weights_bytes
            / (inputs.world_size if cfg.run.parallel != "none" else 1),
            "parallel": cfg.run.parallel,
            "dtype": cfg.model.dtype,
        },
        "settings": {
            "f": ex.projection_factor,
            "c": ex.factor_rank if not ex.exact_factors else "exact",
            "r": cc.rank,
            "p": cc.oversample,
            "storage_dtype": ex.storage_dtype,
            "compute_dtype": cc.compute_dtype,
            "layers_pattern": ex.layers,
            "num_linear_layers": sum(1 for _ in _linear_names(model)),
        },
        "layers": rows,
        "data": {
            "num_examples": inputs.num_examples,
            "mean_tokens": inputs.mean_tokens,
            "tokens": tokens,
            "num_tasks": inputs.num_tasks,
            "world_size": inputs.world_size,
        },
        "storage": storage,
        "curvature": {
            "peak_bytes_per_layer_max": max(row["curvature_peak_bytes"] for row in rows),
            "largest_layer": max(rows, key=lambda row: row["curvature_peak_bytes"])["name"],
            "read_bytes": num_reads * storage["index_bytes"],
        },
        "query": _query_plan(
            layers,
            inputs,
            storage["index_bytes"],
            storage["coords_bytes"],
            storage["curvature_bytes"],
        ),
        "time": {
            "tokens_per_second_per_rank": tps,
            "source": inputs.throughput_source,
            "extract_rank_hours": tokens / tps / 3600 if tps else None,
            "extract_wall_hours": tokens / tps / ranks / 3600 if tps else None,
            "ranks": ranks,
        },
    }


def _linear_names(model: Any):
    from lorif_dist.modeling import layer_kind

    return (name for name, module in model.named_modules() if layer_kind(module))


def _shard_names(inputs: PlanInputs) -> list[str]:
    layout = {"num_tasks": inputs.num_tasks, "world_size": inputs.world_size}
    return expected_shards({"layout": layout})
