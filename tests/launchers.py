"""Shared by the launcher tests (mpiexec, SLURM): the tiny recipe's inputs, an in-process
single-rank reference run, environments for real subprocesses, and the comparisons.

Launched runs must equal the single-process run of the same recipe: curvature singular
values and subspaces to float32 tolerance, identical top-k ids, scores within 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from lorif_dist.testing import build_checkpoint, make_records, write_json

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "configs" / "tiny.yaml"
REL_SCORE = 1e-5  # top-k scores, launched vs single process
REL_SINGULAR = 1e-4  # singular values, float32 sums in another order
SUBSPACE = 1e-3  # spectral norm of V_a V_a^T - V_b V_b^T


def tiny_inputs(root: Path) -> dict[str, Path]:
    """The tiny recipe's inputs (Llama-style model, 24 train and 3 query records)."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "model": build_checkpoint(root, "llama"),
        "train": write_json(root / "train.json", make_records(24, seed=1)),
        "queries": write_json(root / "queries.json", make_records(3, seed=7)),
    }


def tiny_overrides(inputs: dict[str, Path], index_dir: Path) -> list[str]:
    """`--section.field VALUE` pairs that point the tiny recipe at `inputs` and `index_dir`."""
    return [
        "--model.name_or_path",
        str(inputs["model"]),
        "--data.train_files",
        str(inputs["train"]),
        "--query.files",
        str(inputs["queries"]),
        "--run.index_dir",
        str(index_dir),
    ]


def run_single(stages: list[str], overrides: list[str], num_tasks: int = 1) -> None:
    """Runs stages of the tiny recipe in this process on one rank (extraction as
    `num_tasks` array tasks, one after another)."""
    from lorif_dist.config import load_config
    from lorif_dist.curvature import run_curvature
    from lorif_dist.distributed import init_runtime
    from lorif_dist.extract import GradientExtractor, run_extract
    from lorif_dist.query import run_query

    cfg = load_config(str(TINY_RECIPE), overrides + ["--run.backend", "single"])
    runtime = init_runtime("cpu", "single", 0, num_tasks)
    extractor = GradientExtractor(cfg, runtime) if {"extract", "query"} & set(stages) else None
    try:
        if "extract" in stages:
            for task in range(num_tasks):
                runtime.task_id = task
                run_extract(cfg, runtime, extractor)
        if "curvature" in stages:
            run_curvature(cfg, runtime)
        if "query" in stages:
            run_query(cfg, runtime, extractor)
    finally:
        if extractor is not None:
            extractor.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    """This test's environment for a launched process: this checkout's code first on the
    path, one thread per rank (ranks share the cores), no network, and none of the rank or
    array-task variables of a launcher this test may itself run under."""
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_ARRAY_TASK_ID")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.pop("SLURM_PROCID", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def venv_tool(name: str) -> str | None:
    """A tool installed next to this Python (the mpich wheel's mpiexec), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    from shutil import which

    return which(name)


def read_topk(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "topk.jsonl").read_text().splitlines()]


def assert_same_topk(got_dir: Path, want_dir: Path, rel: float = REL_SCORE) -> None:
    got, want = read_topk(got_dir), read_topk(want_dir)
    key = lambda rows: [(r["query_id"], r["rank"], r["train_id"]) for r in rows]  # noqa: E731
    assert key(got) == key(want), "top-k ids differ from the single-process run"
    got_scores = np.array([r["score"] for r in got])
    want_scores = np.array([r["score"] for r in want])
    np.testing.assert_allclose(got_scores, want_scores, rtol=rel, atol=0)


def assert_same_curvature(got_index: Path, want_index: Path) -> list[str]:
    """Per layer: singular values and the spanned subspace equal; returns the layer names."""
    files = sorted((want_index / "curvature").glob("*.h5"))
    assert files, f"no curvature under {want_index}"
    for want_file in files:
        with (
            h5py.File(want_file, "r") as a,
            h5py.File(got_index / "curvature" / want_file.name) as b,
        ):
            v_want, v_got = (torch.from_numpy(h["V"][...]).double() for h in (a, b))
            s_want, s_got = (torch.from_numpy(h["s"][...]).double() for h in (a, b))
            lam_want, lam_got = float(a.attrs["lambda"]), float(b.attrs["lambda"])
        torch.testing.assert_close(s_got, s_want, rtol=REL_SINGULAR, atol=0)
        gap = torch.linalg.matrix_norm(v_got @ v_got.T - v_want @ v_want.T, ord=2)
        assert gap < SUBSPACE, f"{want_file.stem}: subspaces differ by {gap:.2e}"
        assert abs(lam_got - lam_want) <= REL_SINGULAR * lam_want
    return [f.stem for f in files]
