"""Curvature stage: per-rank peak memory stays flat as N doubles; each pass reads each shard once.

For N, 2N, 4N synthetic examples (random unit-norm rank-c factors written with the real
`ShardWriter` into a fixed number of shards, so every shard doubles too), the curvature
stage runs in fresh processes, under `mpiexec -n RANKS` when RANKS > 1, and each rank
reports:

    peak_mib        rise of the resident set (VmHWM after the stage minus VmRSS before it,
                    the high-water mark reset first) while `run_curvature` runs: the
                    randomized SVD's passes, the damping and the cached coordinates
    py_peak_mib     tracemalloc's peak over the stage (numpy / h5py buffers; torch's own
                    allocations are not traced, they show in peak_mib)
    pass_mib        factor bytes the rank read per pass (ShardReader.bytes_read), per layer
                    summed over the layers; checked equal to one read of each shard it owns
                    (sizes taken from the HDF5 datasets themselves) for every pass
    dense_g_mib     what holding one layer's G for the rank's examples would take, for scale

    python bench/curvature_memory.py                      # N = 4096, 8192, 16384; 2 ranks
    python bench/curvature_memory.py --ranks 1 --base-examples 2048

Writes bench/results/curvature_memory.{json,md} and prints the table. mpiexec comes from the
`mpich` wheel in the same environment as this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------
# Synthetic index, written with the real storage and manifest code.


def write_index(index_dir: Path, args: argparse.Namespace, num_examples: int) -> None:
    from lorif_dist.manifest import open_or_create, record_shard
    from lorif_dist.storage import FactorBlock, ShardWriter, shard_name, shard_path

    rng = np.random.default_rng(num_examples)
    names = [f"layers.{i}.proj" for i in range(args.layers)]
    c = args.factor_rank
    layers = [{"name": n, "d1": args.d1, "d2": args.d2, "c": c} for n in names]
    # What curvature reads of an index's identity: its layers, projection seed and method.
    identity = {
        "layers": layers,
        "projection": {"seed": 0},
        "config": {"extract": {"method": "lorif"}},
    }
    layout = {"num_tasks": args.shards, "world_size": 1}
    open_or_create(index_dir, identity, layout, {"num_examples": num_examples}, "bench")
    ids = np.arange(num_examples)
    for task in range(args.shards):
        mine = ids[task :: args.shards]
        writer = ShardWriter(
            shard_path(index_dir, task, 0),
            "bench",
            {n: (args.d1, args.d2, c) for n in names},
            "float16",
        )
        # Parts of `flush` examples, as extraction writes them.
        for start in range(0, len(mine), args.flush_examples):
            rows = mine[start : start + args.flush_examples]
            n = len(rows)
            block = FactorBlock(
                example_ids=rows.astype(np.int64),
                losses=np.zeros(n, np.float32),
                num_tokens=np.ones(n, np.int32),
                left={k: _unit_columns(rng.standard_normal((n, args.d1, c))) for k in names},
                right={k: _unit_columns(rng.standard_normal((n, args.d2, c))) for k in names},
                scale={k: rng.lognormal(0, 1, (n, c)).astype(np.float32) for k in names},
            )
            writer.write_part(block, start, start + n)
        num_stored, sha = writer.finalize()
        entry = {"num_examples": num_stored, "bytes": writer.path.stat().st_size, "sha256": sha}
        record_shard(index_dir, shard_name(task, 0), entry)


def _unit_columns(mat: np.ndarray) -> np.ndarray:
    return (mat / np.linalg.norm(mat, axis=1, keepdims=True)).astype(np.float16)


# ---------------------------------------------------------------------------------------
# One rank of the measured curvature run.


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def expected_pass_bytes(index_dir: Path, shards: list[str], layer: str) -> int:
    """Bytes of one layer's factors over the given shards, from the datasets' own sizes."""
    total = 0
    for name in shards:
        with h5py.File(index_dir / "shards" / f"{name}.h5", "r") as h5:
            group = h5["layers"][layer]
            total += sum(
                group[k].size * group[k].dtype.itemsize for k in ("left", "right", "scale")
            )
    return total


def worker(index_dir: Path, out_json: Path, args: argparse.Namespace) -> None:
    import lorif_dist.curvature as curvature
    from lorif_dist.config import load_config
    from lorif_dist.distributed import init_runtime
    from lorif_dist.manifest import load_manifest, require_complete

    runtime = init_runtime("cpu", "mpi" if args.ranks > 1 else "single")
    cfg = load_config(
        None,
        [
            "--run.index_dir", str(index_dir), "--run.progress", "off",
            "--curvature.rank", str(args.rank), "--curvature.oversample", str(args.oversample),
            "--curvature.power_iters", str(args.power_iters),
            "--curvature.batch_examples", str(args.batch_examples),
        ],
    )  # fmt: skip
    shards = require_complete(index_dir, load_manifest(index_dir))
    mine = shards[runtime.rank :: runtime.world_size]

    # Record the bytes every pass reads (readers are shared by all layers of the rank).
    passes: list[tuple[str, int]] = []

    class CountingGram(curvature.LayerGram):
        def __call__(self, basis):
            before = sum(r.bytes_read for r in self.readers)
            out = super().__call__(basis)
            passes.append((self.layer, sum(r.bytes_read for r in self.readers) - before))
            return out

    curvature.LayerGram = CountingGram

    # Warm up the kernels the stage uses (BLAS buffers, LAPACK workspaces, HDF5 caches are
    # allocated on first use and would otherwise count as the stage's memory at every N).
    import torch

    with curvature.ShardReader(index_dir / "shards" / f"{mine[0]}.h5") as reader:
        blocks = curvature.iter_dense_blocks(
            [reader], "layers.0.proj", args.batch_examples, torch.float32
        )
        block = next(blocks)[2]
    basis = torch.linalg.qr(torch.randn(block.shape[1], args.rank + args.oversample).double())[0]
    torch.linalg.eigh(basis.T @ basis)
    del block, basis, blocks

    # The measured stage.
    runtime.collective.barrier()
    exact_peak = _reset_peak_rss()
    base_kib = _proc_kib("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    curvature.run_curvature(cfg, runtime)
    seconds = time.perf_counter() - start
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Without clear_refs, VmHWM is the process's lifetime peak (flagged in the output).
    peak_kib = _proc_kib("VmHWM")

    # Every pass must read each owned shard's layer exactly once.
    expected = {layer: expected_pass_bytes(index_dir, mine, layer) for layer, _ in passes}
    mismatched = [(layer, got, expected[layer]) for layer, got in passes if got != expected[layer]]
    num_examples = 0
    for name in mine:
        with h5py.File(index_dir / "shards" / f"{name}.h5", "r") as h5:
            num_examples += h5["example_id"].shape[0]
    mine_stats = {
        "rank": runtime.rank,
        "num_shards": len(mine),
        "num_examples": num_examples,
        "peak_mib": (peak_kib - base_kib) / 1024,
        "peak_exact": exact_peak,
        "base_rss_mib": base_kib / 1024,
        "py_peak_mib": py_peak / 2**20,
        "num_passes": len(passes),
        "passes_per_layer": len(passes) // max(1, args.layers),
        "pass_mib": sum(expected.values()) / 2**20,
        "reads_match": not mismatched,
        "mismatched": mismatched[:5],
        "dense_g_mib": num_examples * args.d1 * args.d2 * 4 / 2**20,
        "seconds": seconds,
    }
    gathered = runtime.collective.gather_object(mine_stats, dst=0)
    if runtime.is_main:
        out_json.write_text(json.dumps(gathered))


# ---------------------------------------------------------------------------------------
# The driver: write, measure, tabulate.


def run_size(args: argparse.Namespace, workdir: Path, num_examples: int) -> list[dict]:
    index_dir = workdir / f"index-{num_examples}"
    shutil.rmtree(index_dir, ignore_errors=True)
    write_index(index_dir, args, num_examples)
    out_json = workdir / f"ranks-{num_examples}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(index_dir), str(out_json)]
    cmd += _forwarded(args)
    if args.ranks > 1:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
            "mpiexec"
        )
        if mpiexec is None:
            raise SystemExit("mpiexec not found: pip install mpich mpi4py, or use --ranks 1")
        cmd = [mpiexec, "-n", str(args.ranks)] + cmd
    # Buffers of 64 KiB and more are mmap'ed and unmapped when freed (glibc's threshold would
    # otherwise grow and keep freed blocks in the heap), so the RSS peak follows live memory.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(args.threads),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    subprocess.run(cmd, check=True, env=env, timeout=1800)
    shutil.rmtree(index_dir, ignore_errors=True)
    return json.loads(out_json.read_text())


def _forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("ranks", "layers", "d1", "d2", "factor_rank", "rank", "oversample", "power_iters")
    keys += ("batch_examples",)
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def tabulate(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]
    head = (
        "| N | ranks | examples/rank | peak RSS rise/rank (MiB) | x vs N | tracemalloc peak (MiB) "
        "| read/rank per pass, all layers (MiB) | x vs N | reads = one per owned shard "
        "| dense G, 1 layer (MiB) | seconds |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        lines.append(
            f"| {row['N']} | {args.ranks} | {row['examples_per_rank']} | {row['peak_mib']:.1f} "
            f"| {row['peak_mib'] / base['peak_mib']:.2f} | {row['py_peak_mib']:.2f} "
            f"| {row['pass_mib']:.2f} | {row['pass_mib'] / base['pass_mib']:.2f} "
            f"| {'yes' if row['reads_match'] else 'NO'} ({row['passes_per_layer']} passes/layer) "
            f"| {row['dense_g_mib']:.1f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-examples", type=int, default=4096, help="N")
    parser.add_argument("--sizes", type=int, default=3, help="N, 2N, ... (this many)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4, help="fixed shard count")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d1", type=int, default=32)
    parser.add_argument("--d2", type=int, default=32)
    parser.add_argument("--factor-rank", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64, help="curvature rank r")
    parser.add_argument("--oversample", type=int, default=16)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--batch-examples", type=int, default=256)
    parser.add_argument("--flush-examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", nargs=2, metavar=("INDEX", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="lorif-bench-") as tmp:
        for i in range(args.sizes):
            n = args.base_examples * 2**i
            ranks = run_size(args, Path(tmp), n)
            worst = max(ranks, key=lambda r: r["peak_mib"])
            rows.append(
                {
                    "N": n,
                    "examples_per_rank": max(r["num_examples"] for r in ranks),
                    "peak_mib": worst["peak_mib"],
                    "py_peak_mib": max(r["py_peak_mib"] for r in ranks),
                    "pass_mib": max(r["pass_mib"] for r in ranks),
                    "reads_match": all(r["reads_match"] for r in ranks),
                    "passes_per_layer": ranks[0]["passes_per_layer"],
                    "dense_g_mib": max(r["dense_g_mib"] for r in ranks),
                    "seconds": max(r["seconds"] for r in ranks),
                    "per_rank": ranks,
                }
            )
            print(f"N={n}: done ({rows[-1]['seconds']:.1f} s)", flush=True)
    table = tabulate(rows, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curvature_memory.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1)
    )
    (out / "curvature_memory.md").write_text(
        "# Curvature memory and reads per pass\n\n"
        f"`python bench/curvature_memory.py` with {json.dumps(settings)}\n\n{table}\n"
    )
    if not all(r["reads_match"] for r in rows):
        raise SystemExit("a pass read other than one copy of each owned shard; see the JSON")


if __name__ == "__main__":
    main()
