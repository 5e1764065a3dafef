"""LoRIF against LoGRA and the gradient dot product, side by side on the same work.

    python -m bench.compare --recipe lds-tiny          # LDS on the tiny recipe
    python -m bench.compare --recipe demo --limit 200  # tail-patch on SmolLM2-135M

For every run of the recipe (LoRIF at several (f, c, r); LoGRA at several f, including the
f of LoRIF (matched D) and an f whose dense rows cost what LoRIF's factors cost (matched
storage); graddot), in fresh processes with `--threads` torch threads each:

    extract     examples/s (the stage's own seconds, model loading excluded)
    storage     payload bytes per example (factors or dense rows, all layers), index size
    curvature   seconds and peak memory (peak RSS of the stage process over its RSS after
                imports)
    query       for each normalization: seconds for the Q queries, and the scoring part of
                them (precondition + score + merge, without the query gradients), the
                largest hub (most queries sharing one training example in their top-k)
    quality     LDS (lds-tiny) or tail-patch top-k vs random-k (demo) of each score matrix,
                through the product's `lorif evaluate` (bench/quality.py)

A run whose index and timings exist is reused (`--fresh` rebuilds). Results go to
bench/results/compare-<recipe>.json and .md; `python -m bench.report` rewrites the tables
and side-by-side ratios from the JSON, `python -m bench.plots` draws the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import quality
from bench.common import RESULTS, ROOT, WORK, demo_overrides, write_json
from lorif_dist.config import NORMALIZATIONS, load_config
from lorif_dist.manifest import load_manifest
from lorif_dist.query import load_score_matrix
from lorif_dist.storage import ShardReader


@dataclass(frozen=True)
class RunSpec:
    """One index of the comparison."""

    method: str
    f: int
    c: int = 1  # 0: exact factors (c = min(d1, d2))
    r: int = 64
    path: str = "auto"  # LoRIF's query path

    @property
    def name(self) -> str:
        if self.method != "lorif":
            return f"{self.method}-f{self.f}"
        c = "exact" if self.c == 0 else f"c{self.c}"
        return f"lorif-f{self.f}-{c}-r{self.r}" + ("" if self.path == "auto" else f"-{self.path}")

    def overrides(self) -> list[str]:
        out = ["--extract.method", self.method, "--extract.projection_factor", str(self.f)]
        if self.method == "lorif":
            if self.c == 0:
                out += ["--extract.exact_factors", "true"]
            else:
                out += ["--extract.factor_rank", str(self.c)]
            out += ["--curvature.rank", str(self.r), "--query.path", self.path]
        return out


@dataclass(frozen=True)
class Recipe:
    config: str
    quality: str  # "lds" or "tailpatch"
    runs: tuple[RunSpec, ...]
    extra: tuple[str, ...] = ()
    # Query prompts added to the recipe's own (more queries, tighter intervals).
    extra_prompts: tuple[str, ...] = ()


# A smoke test of the bench itself: configs/tiny.yaml (python -m lorif_dist.testing runs/tiny).
RECIPES_SMOKE = {
    "tiny": Recipe(
        config="configs/tiny.yaml",
        quality="lds",
        runs=(RunSpec("lorif", 2, 1, 16), RunSpec("logra", 2), RunSpec("graddot", 2)),
    )
}

# The tiny LDS model: 3 blocks of width 96 (MLP 256), 512 training examples.
RECIPES = {
    "lds-tiny": Recipe(
        config="configs/lds-tiny.yaml",
        quality="lds",
        runs=(
            RunSpec("lorif", 1, 1, 64),
            RunSpec("lorif", 2, 1, 64),
            RunSpec("lorif", 4, 1, 64),
            RunSpec("lorif", 2, 2, 64),
            # Rank 1 keeps about half of a per-example gradient's energy on this model
            # (bench.plots rank_energy): spend storage on c rather than on a smaller f.
            RunSpec("lorif", 8, 4, 64),
            RunSpec("lorif", 4, 4, 64),
            RunSpec("lorif", 2, 4, 64),
            # Ablations at f = 4 (LoGRA f = 4's D), what separates LoRIF from LoGRA there:
            # the query path, the curvature rank r, the factor rank c (0: exact factors).
            RunSpec("lorif", 4, 1, 64, "dense"),
            RunSpec("lorif", 4, 1, 512, "dense"),
            RunSpec("lorif", 4, 2, 64, "dense"),
            RunSpec("lorif", 4, 0, 64, "dense"),
            RunSpec("lorif", 4, 0, 512, "dense"),
            RunSpec("logra", 2),
            RunSpec("logra", 4),
            RunSpec("logra", 8),
            RunSpec("logra", 11),
            RunSpec("logra", 16),
            RunSpec("graddot", 1),
            RunSpec("graddot", 4),
        ),
        # Bytes per example of LoGRA f = 8, 11, 16: 10452, 4932, 2676; LoRIF f4-c4, f1-c1,
        # f8-c4, f2-c1, f4-c1: 11280, 11028, 5808, 5556, 2820 (bench.report pairs them).
    ),
    # SmolLM2-135M-Instruct, the demo's 105 layers (upper 15 blocks). LoGRA at f = 8 would
    # need 45 dense 13824 x 13824 inverses (34 GB); f = 16 matches LoRIF f = 16's D, and
    # f = 48 stores about what LoRIF f = 8 c = 1 stores (3100 vs 2572 bytes per block).
    "demo": Recipe(
        config="configs/demo.yaml",
        quality="tailpatch",
        runs=(
            RunSpec("lorif", 8, 1, 64),
            RunSpec("lorif", 16, 1, 64),
            RunSpec("logra", 16),
            RunSpec("logra", 48),
            RunSpec("graddot", 8),
        ),
        extra_prompts=(
            "Tell me your name and who trained you.",
            "Give me three tips for sleeping better.",
            "Write a haiku about autumn leaves.",
            "How do I bake a simple loaf of bread?",
            "Explain photosynthesis in one sentence.",
        ),
    ),
    **RECIPES_SMOKE,
}


def _stage(stage: str, recipe: Recipe, overrides: list[str], out: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_THREADS=str(threads))
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "bench.stage", stage, str(out), "--config", recipe.config]
    subprocess.run(cmd + overrides, check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


def storage(index_dir: Path) -> dict[str, float]:
    """Payload bytes per example over all layers, and the index's size on disk."""
    num, payload = 0, 0
    for path in sorted((index_dir / "shards").rglob("*.h5")):
        with ShardReader(path) as reader:
            num += reader.num_examples
            payload += sum(reader.nbytes(name) for name in reader.h5["layers"])
    files = [p for p in index_dir.rglob("*") if p.is_file()]
    return {
        "num_examples": num,
        "bytes_per_example": payload / max(num, 1),
        "index_bytes": sum(p.stat().st_size for p in files),
        "curvature_bytes": sum(p.stat().st_size for p in files if "curvature" in p.parts),
    }


def build(recipe: Recipe, spec: RunSpec, base: list[str], args) -> dict[str, Any]:
    """Extract, curvature and every normalization's query of one run (reused if done)."""
    work = WORK / args.recipe / spec.name
    record_path = work / "run.json"
    overrides = base + spec.overrides() + ["--run.index_dir", str(work / "index")]
    # A run is reused only for the same resolved config: an edit of the recipe file (its
    # damping, say) changes the config without changing the overrides.
    config = json.loads(json.dumps(load_config(recipe.config, overrides).to_dict(), default=str))
    if record_path.is_file() and not args.fresh:
        record = json.loads(record_path.read_text())
        if record.get("overrides") == overrides and record.get("config") == config:
            if args.refresh_curvature:
                # Measure the curvature stage again (it recomputes what it deletes; the
                # scores do not change: every random draw is seeded).
                shutil.rmtree(work / "index" / "curvature", ignore_errors=True)
                record["curvature"] = _stage(
                    "curvature", recipe, overrides, work / "curvature.json", args.threads
                )
                write_json(record_path, record)
            return record
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record: dict[str, Any] = {"spec": asdict(spec), "name": spec.name, "overrides": overrides}
    record["config"] = config
    record["extract"] = _stage("extract", recipe, overrides, work / "extract.json", args.threads)
    record["curvature"] = _stage(
        "curvature", recipe, overrides, work / "curvature.json", args.threads
    )
    record["storage"] = storage(work / "index")
    manifest = load_manifest(work / "index")
    record["dims"] = {
        "num_layers": len(manifest["identity"]["layers"]),
        "total_D": sum(s["d1"] * s["d2"] for s in manifest["identity"]["layers"]),
        "max_D": max(s["d1"] * s["d2"] for s in manifest["identity"]["layers"]),
    }
    record["query"] = {}
    for norm in NORMALIZATIONS:
        q_over = overrides + ["--query.normalize", norm, "--query.output", str(work / f"q-{norm}")]
        record["query"][norm] = _stage(
            "query", recipe, q_over, work / f"q-{norm}.json", args.threads
        )
    write_json(record_path, record)
    return record


def evaluate(recipe: Recipe, record: dict[str, Any], work: Path, tailpatch) -> None:
    """LDS or tail-patch of each normalization's score matrix, stored in the record."""
    num_records = load_manifest(work / "index")["dataset"]["num_records"]
    for norm, q in record["query"].items():
        if q.get("quality") is not None:
            continue
        scores = load_score_matrix(q["output_dir"], num_records)
        cfg = load_config(
            recipe.config,
            record["overrides"]
            + ["--query.output", q["output_dir"], "--query.normalize", norm]
            # One tail-patch cache for all runs of the recipe: same model, same queries.
            + ["--evaluate.output", str(work.parent / "evaluate")],
        )
        if recipe.quality == "lds":
            q["quality"] = quality.lds(cfg, scores)
        else:
            q["quality"] = tailpatch(cfg, scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--limit", type=int, default=None, help="data.limit (demo: Alpaca rows)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    parser.add_argument("--runs", default=None, help="comma-separated run names (default all)")
    parser.add_argument("--fresh", action="store_true", help="rebuild runs that exist")
    parser.add_argument("--no-quality", action="store_true", help="skip LDS / tail-patch")
    parser.add_argument(
        "--refresh-curvature", action="store_true", help="rerun the curvature stage of done runs"
    )
    args, rest = parser.parse_known_args(argv)
    recipe = _with_prompts(RECIPES[args.recipe], WORK / args.recipe)
    base = demo_overrides(recipe.config) + list(recipe.extra) + ["--run.progress", "off"]
    base += ["--query.save_scores", "true", "--run.backend", "single"]
    if args.limit:
        base += _limit(recipe, args.limit)
    base += rest
    runs = [r for r in recipe.runs if not args.runs or r.name in args.runs.split(",")]

    results = {"recipe": args.recipe, "config": recipe.config, "base_overrides": base}
    results["threads"] = args.threads
    results["runs"] = {}
    tailpatch = quality.TailPatch()
    for spec in runs:
        record = build(recipe, spec, base, args)
        if not args.no_quality:
            evaluate(recipe, record, WORK / args.recipe / spec.name, tailpatch)
            write_json(WORK / args.recipe / spec.name / "run.json", record)
        results["runs"][spec.name] = record
    path = RESULTS / f"compare-{args.recipe}.json"
    if path.is_file() and args.runs:  # a partial rerun keeps the other runs' results
        old = json.loads(path.read_text())
        results["runs"] = {**old.get("runs", {}), **results["runs"]}
    write_json(path, results)
    from bench.report import write_report

    print(write_report(results))
    return 0


def _with_prompts(recipe: Recipe, work: Path) -> Recipe:
    """The recipe with its extra prompts, as a config file written next to its runs."""
    if not recipe.extra_prompts:
        return recipe
    import yaml

    raw = yaml.safe_load((ROOT / recipe.config).read_text())
    raw["query"]["prompts"] = list(raw["query"].get("prompts") or []) + list(recipe.extra_prompts)
    work.mkdir(parents=True, exist_ok=True)
    path = work / Path(recipe.config).name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return replace(recipe, config=str(path))


def _limit(recipe: Recipe, limit: int) -> list[str]:
    """data.limit, except for the demo, whose identity file must stay whole."""
    if Path(recipe.config).stem != "demo":
        return ["--data.limit", str(limit)]
    from lorif_dist.demo import cache_dir

    src = cache_dir() / "alpaca_en_demo.json"
    subset = WORK / "demo" / f"alpaca_first_{limit}.json"
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text(json.dumps(json.loads(src.read_text())[:limit]))
    return ["--data.train_files", f"{subset},{cache_dir() / 'identity.json'}"]


if __name__ == "__main__":
    raise SystemExit(main())
