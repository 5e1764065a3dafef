"""Per-(task, rank) HDF5 shards of rank-c factors, written crash-safely and resumably.

A finished shard, `shards/task-TTTT/rank-RRRRR.h5`, holds:

    /example_id                (n,)        int64    global example ids, in processing order
    /loss                      (n,)        float32  per-example loss
    /num_tokens                (n,)        int32    tokens of the example (prompt + response)
    /layers/<name>/left        (n, d1, c)  storage dtype, unit-norm columns
    /layers/<name>/right       (n, d2, c)  storage dtype, unit-norm columns
    /layers/<name>/scale       (n, c)      float32 (float64 when stored in float64)
    /skipped_example_id        (k,)        int64    examples dropped for a non-finite loss or
                                                    gradient
    attrs: complete, num_examples_done, config_hash, storage_dtype, layout ("factors")

A projected gradient is left @ diag(scale) @ right^T. Shards of the dense baselines
(extract.method logra or graddot; attrs layout = "dense") hold instead, per layer:

    /layers/<name>/dense       (n, d1*d2)  storage dtype, unit-norm rows (row-major vec of
                                           the d1 x d2 projected gradient)
    /layers/<name>/scale       (n, 1)      float32 (float64 when stored in float64), row norms

and a projected gradient is dense * scale. Either layout is read densely by `read_dense`.

HDF5 has no bfloat16; unit-norm columns (rows) lie in [-1, 1], where float16 neither
overflows nor loses its 11-bit precision to underflow for widths up to ~10^6, and the norm
lives in the float32 scale.

Every dataset with rows is chunked with HDF5's Fletcher-32 checksum filter, so any read
of a corrupted chunk fails (h5py raises OSError) instead of returning wrong factors; the
check costs CPU only, on reads that happen anyway. The whole-file SHA-256 of a finished
shard is recorded in the manifest (see integrity.py for who verifies it, and when).

While a shard is being written it does not exist under its final name. Every flush writes
one part file (`rank-RRRRR.parts/part-NNNNNN.h5`) to a temporary name, fsyncs it and renames
it, so a crash leaves only whole parts behind; a rerun resumes after the last whole part.
When all batches are done the parts are joined into the shard (again temp + rename) and
removed. Joining copies bytes in a fixed order, so a resumed shard is bit-identical to one
written without interruption.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lorif_dist.factorize import densify
from lorif_dist.safe_io import create_h5

NP_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def shard_name(task_id: int, rank: int) -> str:
    return f"task-{task_id:04d}/rank-{rank:05d}"


def shard_path(index_dir: str | Path, task_id: int, rank: int) -> Path:
    return Path(index_dir) / "shards" / f"{shard_name(task_id, rank)}.h5"


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Makes a fully written file visible under its final name, durably."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


@dataclass
class FactorBlock:
    """Factors of a group of examples, on the CPU, ready to write."""

    example_ids: np.ndarray  # (n,) int64
    losses: np.ndarray  # (n,) float32
    num_tokens: np.ndarray  # (n,) int32
    left: dict[str, np.ndarray]  # layer -> (n, d1, c)
    right: dict[str, np.ndarray]  # layer -> (n, d2, c)
    scale: dict[str, np.ndarray]  # layer -> (n, c); (n, 1) row norms for dense storage
    skipped_ids: list[int] = field(default_factory=list)
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (n, D) unit rows

    @property
    def num_examples(self) -> int:
        return int(self.example_ids.shape[0])


def concat_blocks(blocks: Sequence[FactorBlock]) -> FactorBlock:
    layers = blocks[0].left.keys()
    dense_layers = blocks[0].dense.keys()
    cat = np.concatenate
    return FactorBlock(
        example_ids=cat([b.example_ids for b in blocks]),
        losses=cat([b.losses for b in blocks]),
        num_tokens=cat([b.num_tokens for b in blocks]),
        left={k: cat([b.left[k] for b in blocks]) for k in layers},
        right={k: cat([b.right[k] for b in blocks]) for k in layers},
        scale={k: cat([b.scale[k] for b in blocks]) for k in blocks[0].scale},
        skipped_ids=[i for b in blocks for i in b.skipped_ids],
        dense={k: cat([b.dense[k] for b in blocks]) for k in dense_layers},
    )


def to_storage(
    left: torch.Tensor, scale: torch.Tensor, right: torch.Tensor, storage_dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Casts factors to their stored dtypes (factors are unit-norm columns already)."""
    np_dtype = NP_DTYPES[storage_dtype]
    scale_dtype = np.float64 if storage_dtype == "float64" else np.float32
    return (
        left.detach().cpu().numpy().astype(np_dtype),
        scale.detach().cpu().numpy().astype(scale_dtype),
        right.detach().cpu().numpy().astype(np_dtype),
    )


def _checked_dataset(group: h5py.Group, key: str, arr: np.ndarray, rows: int) -> None:
    """A dataset chunked by `rows` rows with a Fletcher-32 checksum per chunk (an empty
    array cannot be chunked, and has nothing to protect)."""
    if arr.shape[0] == 0:
        group.create_dataset(key, data=arr)
        return
    chunks = (min(rows, arr.shape[0]),) + arr.shape[1:]
    group.create_dataset(key, data=arr, chunks=chunks, fletcher32=True)


def dense_to_storage(rows: torch.Tensor, storage_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """[n, D] dense projected gradients -> unit-norm rows in the storage dtype, [n, 1] norms.

    As for factors, float16 holds only values in [-1, 1] and the magnitude lives in a float32
    scale, so gradients far from 1 in norm neither overflow nor underflow.
    """
    norms = rows.norm(dim=1, keepdim=True)  # [n, 1]
    unit = rows / torch.where(norms > 0, norms, torch.ones_like(norms))  # zero rows stay zero
    scale_dtype = np.float64 if storage_dtype == "float64" else np.float32
    return (
        unit.detach().cpu().numpy().astype(NP_DTYPES[storage_dtype]),
        norms.detach().cpu().numpy().astype(scale_dtype),
    )


def _layer_arrays(block: FactorBlock, name: str) -> list[tuple[str, np.ndarray]]:
    if name in block.dense:
        return [("dense", block.dense[name]), ("scale", block.scale[name])]
    return [("left", block.left[name]), ("right", block.right[name]), ("scale", block.scale[name])]


def _write_block(h5: h5py.File, block: FactorBlock, chunk_rows: int) -> None:
    n = block.num_examples
    rows = max(1, min(n, chunk_rows))
    skipped = np.asarray(block.skipped_ids, dtype=np.int64)
    _checked_dataset(h5, "example_id", block.example_ids.astype(np.int64), max(n, 1))
    _checked_dataset(h5, "loss", block.losses.astype(np.float32), max(n, 1))
    _checked_dataset(h5, "num_tokens", block.num_tokens.astype(np.int32), max(n, 1))
    _checked_dataset(h5, "skipped_example_id", skipped, max(len(skipped), 1))
    group = h5.create_group("layers")
    for name in block.scale:
        g = group.create_group(name)
        for key, arr in _layer_arrays(block, name):
            _checked_dataset(g, key, arr, rows)


def _read_block(h5: h5py.File) -> FactorBlock:
    layers = h5["layers"]
    factored = [k for k in layers if "left" in layers[k]]
    dense = [k for k in layers if "dense" in layers[k]]
    return FactorBlock(
        example_ids=h5["example_id"][...],
        losses=h5["loss"][...],
        num_tokens=h5["num_tokens"][...],
        left={k: layers[k]["left"][...] for k in factored},
        right={k: layers[k]["right"][...] for k in factored},
        scale={k: layers[k]["scale"][...] for k in layers},
        skipped_ids=h5["skipped_example_id"][...].tolist(),
        dense={k: layers[k]["dense"][...] for k in dense},
    )


class ShardWriter:
    """Writes one (task, rank) shard in parts; resumes after the last complete part.

    Args:
        path: the final shard path.
        config_hash: identity of the extraction config; parts of another config are refused.
        layer_dims: tracked layer name -> (d1, d2, c), in the order they are stored.
        storage_dtype: "float16", "float32" or "float64".
        layout: "factors" (rank-c factors) or "dense" (the dense baselines; c is ignored).
    """

    def __init__(
        self,
        path: Path,
        config_hash: str,
        layer_dims: dict[str, tuple[int, int, int]],
        storage_dtype: str,
        layout: str = "factors",
    ) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_suffix(".parts")
        self.config_hash = config_hash
        self.layer_dims = dict(layer_dims)
        self.storage_dtype = storage_dtype
        self.layout = layout

    @property
    def complete(self) -> bool:
        return self.path.is_file()

    def resume_point(self) -> int:
        """Number of batches already written by whole parts (0 for a fresh shard)."""
        if not self.parts_dir.is_dir():
            return 0
        for stale in self.parts_dir.glob("*.tmp"):
            stale.unlink()  # a part whose write was interrupted
        batches_done = 0
        for part in sorted(self.parts_dir.glob("part-*.h5")):
            with h5py.File(part, "r") as h5:
                found = h5.attrs.get("config_hash")
                if found != self.config_hash:
                    raise ValueError(
                        f"{part} was written with config hash {found}, this run has "
                        f"{self.config_hash}; finish it with the original config, or delete "
                        f"{self.parts_dir} to start this shard over"
                    )
                if int(h5.attrs["batch_start"]) != batches_done:
                    raise ValueError(f"{part}: parts are not contiguous; delete {self.parts_dir}")
                batches_done = int(h5.attrs["batch_stop"])
        return batches_done

    def write_part(self, block: FactorBlock, batch_start: int, batch_stop: int) -> int:
        """Durably writes the factors of batches [batch_start, batch_stop); returns bytes."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        final = self.parts_dir / f"part-{batch_start:06d}.h5"
        tmp = final.with_suffix(".tmp")
        with create_h5(tmp, "shard part") as h5:
            _write_block(h5, block, chunk_rows=block.num_examples)
            h5.attrs.update(
                config_hash=self.config_hash, batch_start=batch_start, batch_stop=batch_stop
            )
        _publish(tmp, final)
        return final.stat().st_size

    def finalize(self, chunk_rows: int = 64) -> tuple[int, str]:
        """Joins the parts into the shard, removes them; returns (num_examples, sha256)."""
        parts = sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.is_dir() else []
        blocks = []
        for part in parts:
            with h5py.File(part, "r") as h5:
                blocks.append(_read_block(h5))
        block = concat_blocks(blocks) if blocks else self._empty_block()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".h5.tmp")
        # track_order and fixed attrs keep the file bytes a function of the contents only.
        with create_h5(tmp, "shard", track_order=True) as h5:
            _write_block(h5, block, chunk_rows)
            h5.attrs.update(
                complete=True,
                num_examples_done=block.num_examples,
                config_hash=self.config_hash,
                storage_dtype=self.storage_dtype,
                layout=self.layout,
            )
        _publish(tmp, self.path)
        if self.parts_dir.is_dir():
            shutil.rmtree(self.parts_dir)
        return block.num_examples, file_sha256(self.path)

    def _empty_block(self) -> FactorBlock:
        """A rank with no examples still writes a (valid, empty) shard."""
        np_dtype = NP_DTYPES[self.storage_dtype]
        scale_dtype = np.float64 if self.storage_dtype == "float64" else np.float32
        dims = self.layer_dims
        if self.layout == "dense":
            return FactorBlock(
                example_ids=np.zeros(0, np.int64),
                losses=np.zeros(0, np.float32),
                num_tokens=np.zeros(0, np.int32),
                left={},
                right={},
                scale={name: np.zeros((0, 1), scale_dtype) for name in dims},
                dense={
                    name: np.zeros((0, d1 * d2), np_dtype) for name, (d1, d2, _) in dims.items()
                },
            )
        return FactorBlock(
            example_ids=np.zeros(0, np.int64),
            losses=np.zeros(0, np.float32),
            num_tokens=np.zeros(0, np.int32),
            left={name: np.zeros((0, d1, c), np_dtype) for name, (d1, _, c) in dims.items()},
            right={name: np.zeros((0, d2, c), np_dtype) for name, (_, d2, c) in dims.items()},
            scale={name: np.zeros((0, c), scale_dtype) for name, (_, _, c) in dims.items()},
        )


class ShardCorruptError(ValueError):
    """A shard that should be complete is missing, truncated or fails its checksums."""


class ShardReader:
    """Reads a finished shard's factors layer by layer, in row blocks."""

    def __init__(self, path: str | Path, regenerate: str | None = None) -> None:
        self.path = Path(path)
        # How to rebuild this shard, quoted in every error (integrity.py knows the command).
        self.regenerate = regenerate or "delete it and rerun extraction for its task and rank"
        if not self.path.is_file():
            raise FileNotFoundError(f"shard {self.path} does not exist; {self.regenerate}")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise ShardCorruptError(
                f"shard {self.path} is not a readable HDF5 file ({e}); it is truncated or "
                f"corrupted: {self.regenerate}"
            ) from e
        if not self.h5.attrs.get("complete", False):
            self.h5.close()
            raise ShardCorruptError(f"shard {self.path} is not marked complete; {self.regenerate}")
        self.example_ids = self.read_checked(lambda: self.h5["example_id"][...], "example_id")
        # Factor bytes returned by `read` (stored dtypes), so a job can report and check what
        # it read: a curvature pass reads each owned shard's factors exactly once.
        self.bytes_read = 0
        self.layout = str(self.h5.attrs.get("layout", "factors"))

    def read_checked(self, read: Any, what: str) -> Any:
        """Runs a read; a failed checksum or a damaged structure names the file and the fix."""
        try:
            return read()
        except (OSError, KeyError) as e:
            raise ShardCorruptError(
                f"shard {self.path} is corrupted: reading {what} failed ({e}); {self.regenerate}"
            ) from e

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def drop_caches(self) -> None:
        """Frees what HDF5 cached while reading, by closing and reopening the file.

        HDF5 keeps every chunk-index node it has read in memory until the file closes
        (about 25 KB per 64 chunks), so a reader kept open over all layers and passes
        would grow with the shard's size times the number of layers read.
        """
        self.h5.close()
        self.h5 = h5py.File(self.path, "r")

    @property
    def num_examples(self) -> int:
        return int(self.example_ids.shape[0])

    def read(
        self, layer: str, start: int, stop: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left [n, d1, c], scale [n, c], right [n, d2, c]) for rows [start, stop)."""
        if self.layout != "factors":
            raise ValueError(
                f"shard {self.path} stores dense gradients (layout {self.layout!r}), not "
                "factors; read it with read_dense"
            )
        left, scale, right = self._rows(layer, ("left", "scale", "right"), start, stop, dtype)
        return left, scale, right

    def read_dense(
        self, layer: str, start: int, stop: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Projected gradients of rows [start, stop) as [n, D] rows, whatever the layout."""
        if self.layout == "factors":
            return densify(*self.read(layer, start, stop, dtype))
        rows, scale = self._rows(layer, ("dense", "scale"), start, stop, dtype)
        return rows * scale  # [n, D] * [n, 1]

    def _rows(
        self, layer: str, keys: tuple[str, ...], start: int, stop: int, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Rows [start, stop) of one layer's datasets `keys`, checked, counted, as tensors."""

        def read():
            g = self.h5["layers"][layer]
            return [g[key][start:stop] for key in keys]

        arrays = self.read_checked(read, f"layer {layer} rows {start}:{stop}")
        self.bytes_read += sum(a.nbytes for a in arrays)
        return [torch.from_numpy(np.ascontiguousarray(a)).to(dtype) for a in arrays]

    def nbytes(self, layer: str) -> int:
        g = self.h5["layers"][layer]
        return sum(g[k].id.get_storage_size() for k in g)
