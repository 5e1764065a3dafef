"""Runs one pipeline stage in a fresh process and writes its timing and memory as JSON.

    python -m bench.stage {extract,curvature,query} OUT.json --config R.yaml [--section.field V]

A fresh process per stage makes peak memory a property of the stage: `rss_peak_mb` is the
process's peak resident set, `rss_start_mb` the resident set after imports (Python, torch,
transformers), so their difference is what the stage itself held at its peak. `seconds` are
the stage's own wall seconds as it reports them (model loading excluded), `cpu_seconds` the
process's CPU seconds over the same call: with one thread (`BENCH_THREADS`, default 1) the
latter are what other processes on a shared machine do not inflate.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from bench.common import write_json
from lorif_dist.config import load_config
from lorif_dist.distributed import init_runtime
from lorif_dist.logging_utils import setup_logging


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str]) -> int:
    stage, out, rest = argv[0], argv[1], argv[2:]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    setup_logging()
    config = None
    if rest[:1] == ["--config"]:
        config, rest = rest[1], rest[2:]
    cfg = load_config(config, rest)
    runtime = init_runtime(cfg.model.device, "single")
    record: dict = {"stage": stage, "rss_start_mb": _rss_mb(), "threads": torch.get_num_threads()}
    start = time.perf_counter()
    if stage == "extract":
        from lorif_dist.extract import GradientExtractor, run_extract

        extractor = GradientExtractor(cfg, runtime)
        cpu = time.process_time()
        result = run_extract(cfg, runtime, extractor)
        record["cpu_seconds"] = time.process_time() - cpu
        record.update(
            seconds=result.seconds,
            num_examples=result.num_examples,
            num_tokens=result.num_tokens,
            bytes_written=result.bytes_written,
        )
    elif stage == "curvature":
        from lorif_dist.curvature import run_curvature

        cpu = time.process_time()
        report = run_curvature(cfg, runtime)
        record["cpu_seconds"] = time.process_time() - cpu
        record.update(seconds=time.perf_counter() - start, layers=report)
    elif stage == "query":
        from lorif_dist.extract import GradientExtractor
        from lorif_dist.query import run_query

        extractor = GradientExtractor(cfg, runtime)  # model loading is not query time
        cpu = time.process_time()
        result = run_query(cfg, runtime, extractor)
        record["cpu_seconds"] = time.process_time() - cpu
        record.update(
            seconds=result["seconds"],
            score_seconds=result["score_seconds"],
            path=result["path"],
            largest_hub=result["largest_hub"],
            output_dir=result["output_dir"],
        )
    else:
        raise ValueError(f"unknown stage {stage!r}; expected extract, curvature or query")
    record.update(wall_seconds=time.perf_counter() - start, rss_peak_mb=_rss_mb())
    write_json(Path(out), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
