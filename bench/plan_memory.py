"""Curvature memory: `lorif plan`'s per-layer estimate beside the measured peak.

For each case, writes a shard of random rank-1 factors for one layer (d1 x d2), then, in a
fresh process, runs that layer's randomized SVD the way `lorif curvature` does
(`LayerGram` + `randomized_eigh`) and measures the growth of the peak resident set size
(VmHWM, reset just before the SVD). Prints it beside `plan.curvature_peak_bytes` for the
same D, m = r + p and curvature.batch_examples.

    python bench/plan_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CASES = [  # (d1, d2, examples, r, p, batch_examples)
    (256, 256, 1024, 64, 16, 512),
    (256, 672, 1024, 32, 16, 256),
    (512, 512, 512, 128, 32, 128),
]

CHILD = r"""
import json, sys
import torch
from lorif_dist.collectives import SingleProcess
from lorif_dist.curvature import LayerGram
from lorif_dist.rsvd import randomized_eigh
from lorif_dist.storage import ShardReader

path, dim, rank, oversample, batch = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(1)
reader = ShardReader(path)

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current resident set
before = rss("VmRSS:")
gram = LayerGram([reader], "layer", dim, batch, torch.float32, SingleProcess())
randomized_eigh(gram, dim, rank, oversample, 2, seed=0)
print(json.dumps({"peak_growth": rss("VmHWM:") - before}))
"""


def write_shard(path: Path, d1: int, d2: int, n: int) -> None:
    from lorif_dist.storage import FactorBlock, ShardWriter

    rng = np.random.default_rng(0)
    left = rng.standard_normal((n, d1, 1)).astype(np.float16)
    right = rng.standard_normal((n, d2, 1)).astype(np.float16)
    block = FactorBlock(
        example_ids=np.arange(n, dtype=np.int64),
        losses=np.zeros(n, np.float32),
        num_tokens=np.zeros(n, np.int32),
        left={"layer": left / np.linalg.norm(left, axis=1, keepdims=True)},
        right={"layer": right / np.linalg.norm(right, axis=1, keepdims=True)},
        scale={"layer": rng.random((n, 1)).astype(np.float32)},
    )
    writer = ShardWriter(path, "0" * 16, {"layer": (d1, d2, 1)}, "float16")
    writer.write_part(block, 0, 1)
    writer.finalize()


def main() -> None:
    from lorif_dist.plan import curvature_peak_bytes

    repo = Path(__file__).resolve().parents[1]
    header = ("d1 x d2", "D", "m", "B", "estimate MiB", "measured MiB", "measured/estimate")
    widths = (10, 8, 4, 4, 13, 13, 18)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for d1, d2, n, r, p, batch in CASES:
        dim, width = d1 * d2, r + p
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.h5"
            write_shard(path, d1, d2, n)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(dim), str(r), str(p), str(batch)],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
            )
        measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
        estimate = curvature_peak_bytes(dim, width, batch, 4)
        print(
            f"{d1:>4} x {d2:<4} {dim:>8} {width:>4} {batch:>4} {estimate / 2**20:>13.1f} "
            f"{measured / 2**20:>13.1f} {measured / estimate:>18.2f}"
        )


if __name__ == "__main__":
    main()
