"""Query time against the number of training examples N, LoRIF against LoGRA.

    python -m bench.query_scaling [--sizes 1024,4096,16384] [--queries 16]

Scoring cost does not depend on the values scored, so this builds synthetic indexes of
random gradients with the shapes of one SmolLM2-135M decoder block (q, k, v, o, gate, up,
down; widths 576 and 1536) and times the product's own query path on them: precondition
the Q query gradients (`query.precondition`: Woodbury for LoRIF, the dense D x D inverse for
LoGRA), then score every stored example (`query.score_shard`), as `lorif query` does after
computing the query gradients. The settings:

    lorif f=8 c=1 r=64, dense path      densify each example's factors, dot with h_q
    lorif f=8 c=1 r=64, factored path   rank-1 queries, cached V^T g_t
    logra f=8                           same D as LoRIF f=8 (matched D)
    logra f=16                          a quarter of that D

Times are the process's CPU seconds with one torch thread (the default; wall seconds with
more), the fastest of two repetitions, shards read from the page cache after the first;
results go to bench/results/query-scaling.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, WORK, write_json
from lorif_dist.config import load_config
from lorif_dist.curvature import _write_atomic_h5, coords_path, curvature_path
from lorif_dist.modeling import LayerSpec
from lorif_dist.query import precondition, score_shard
from lorif_dist.storage import FactorBlock, ShardReader, ShardWriter, dense_to_storage, to_storage

BLOCK = [  # (name, in_features, out_features) of one SmolLM2-135M decoder block
    ("q_proj", 576, 576),
    ("k_proj", 576, 192),
    ("v_proj", 576, 192),
    ("o_proj", 576, 576),
    ("gate_proj", 576, 1536),
    ("up_proj", 576, 1536),
    ("down_proj", 1536, 576),
]
SETTINGS = {
    "lorif-f8-dense": ("lorif", 8, "dense"),
    "lorif-f8-factored": ("lorif", 8, "factored"),
    "logra-f8": ("logra", 8, "dense"),
    "logra-f16": ("logra", 16, "dense"),
}
RANK, CHUNK = 64, 4096


def _layers() -> list[LayerSpec]:
    return [LayerSpec(name, "linear", i, o) for name, i, o in BLOCK]


def build_index(root: Path, method: str, f: int, num: int, gen: torch.Generator) -> Path:
    """A synthetic single-shard index of `num` random examples (reused when present)."""
    shard = root / "shards" / "task-0000" / "rank-00000.h5"
    if shard.is_file():
        return root
    dims = {s.name: (s.in_features // f, s.out_features // f) for s in _layers()}
    layout = "factors" if method == "lorif" else "dense"
    writer = ShardWriter(
        shard, "synthetic", {k: (*v, 1) for k, v in dims.items()}, "float16", layout
    )
    for start in range(0, num, CHUNK):
        n = min(CHUNK, num - start)
        block = FactorBlock(
            np.arange(start, start + n), np.ones(n, np.float32), np.ones(n, np.int32), {}, {}, {}
        )
        for name, (d1, d2) in dims.items():
            if method == "lorif":
                left, right = (
                    torch.randn(n, d1, 1, generator=gen),
                    torch.randn(n, d2, 1, generator=gen),
                )
                left, right = (
                    left / left.norm(dim=1, keepdim=True),
                    right / right.norm(dim=1, keepdim=True),
                )
                block.left[name], block.scale[name], block.right[name] = to_storage(
                    left, torch.rand(n, 1, generator=gen), right, "float16"
                )
            else:
                block.dense[name], block.scale[name] = dense_to_storage(
                    torch.randn(n, d1 * d2, generator=gen), "float16"
                )
        writer.write_part(block, start, start + n)
    writer.finalize()
    _write_curvature(root, method, dims, gen)
    return root


def _write_curvature(root: Path, method: str, dims: dict, gen: torch.Generator) -> None:
    coords = {}
    for name, (d1, d2) in dims.items():
        dim = d1 * d2
        if method == "logra":
            # Any dense D x D matrix times the same: a scaled identity plus a small random part.
            inverse = torch.eye(dim) + 1e-3 * torch.randn(dim, dim, generator=gen)
            _write_atomic_h5(
                curvature_path(root, name), {"inverse": inverse.numpy()}, {"lambda": 1.0}
            )
            continue
        vectors, _ = torch.linalg.qr(torch.randn(dim, RANK, generator=gen))
        arrays = {"V": vectors.numpy(), "s": torch.rand(RANK, generator=gen).numpy()}
        _write_atomic_h5(curvature_path(root, name), arrays, {"lambda": 1.0})
    if method == "lorif":
        with ShardReader(root / "shards" / "task-0000" / "rank-00000.h5") as reader:
            for name in dims:
                coords[name] = (
                    np.random.default_rng(0)
                    .standard_normal((reader.num_examples, RANK))
                    .astype(np.float32)
                )
        _write_atomic_h5(coords_path(root, "task-0000/rank-00000"), coords, {})


def time_queries(root: Path, method: str, f: int, path: str, num_queries: int) -> float:
    """Seconds to precondition num_queries queries and score the whole index."""
    cfg = load_config(None, ["--run.index_dir", str(root), "--extract.factor_rank", "1"])
    gen = torch.Generator().manual_seed(1)
    grads = {
        s.name: torch.randn(num_queries, s.in_features // f, s.out_features // f, generator=gen)
        for s in _layers()
    }
    shard = root / "shards" / "task-0000" / "rank-00000.h5"
    coords = coords_path(root, "task-0000/rank-00000") if path == "factored" else None
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    prepared = precondition(cfg, grads, path, torch.float32, method)
    with ShardReader(shard) as reader:
        score_shard(prepared, reader, coords, 512, torch.float32)
    return clock() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096,16384")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    out = {"queries": args.queries, "threads": args.threads, "block": BLOCK, "seconds": {}}
    for name in args.settings.split(","):
        method, f, path = SETTINGS[name]
        out["seconds"][name] = {}
        for num in sizes:
            root = WORK / "query-scaling" / f"{method}-f{f}-n{num}"
            build_index(root, method, f, num, torch.Generator().manual_seed(num))
            best = min(time_queries(root, method, f, path, args.queries) for _ in range(2))
            out["seconds"][name][num] = best
            print(f"{name:20s} N={num:6d}  {best:8.3f} s", flush=True)
            write_json(RESULTS / "query-scaling.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
