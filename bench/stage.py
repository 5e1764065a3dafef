"""Runs one pipeline stage in a fresh process and writes its timing and memory as JSON.

    python -m bench.stage {extract,curvature,query} OUT.json --config R.yaml [--section.field V]

A fresh process per stage makes peak memory a property of the stage: a thread samples the
resident set every 5 ms while the stage runs; `rss_peak_mb` is the largest sample,
`rss_start_mb` the resident set when the stage started (Python, torch, transformers and,
for extract and query, the model), so their difference is what the stage itself held. `seconds` are
the stage's own wall seconds as it reports them (model loading excluded), `cpu_seconds` the
process's CPU seconds over the same call: with one thread (`BENCH_THREADS`, default 1) the
latter are what other processes on a shared machine do not inflate.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common import write_json
from lorif_dist.config import load_config
from lorif_dist.distributed import init_runtime
from lorif_dist.logging_utils import setup_logging


def _rss_mb() -> float:
    """The current resident set in MiB (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakSampler(threading.Thread):
    """Samples the resident set until stopped; `peak_mb` is the largest sample."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_mb = interval_s, _rss_mb()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak_mb, _rss_mb())


def _start_sampler(record: dict) -> PeakSampler:
    record["rss_start_mb"] = _rss_mb()
    sampler = PeakSampler()
    sampler.start()
    return sampler


def main(argv: list[str]) -> int:
    stage, out, rest = argv[0], argv[1], argv[2:]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    setup_logging()
    config = None
    if rest[:1] == ["--config"]:
        config, rest = rest[1], rest[2:]
    cfg = load_config(config, rest)
    runtime = init_runtime(cfg.model.device, "single")
    record: dict = {"stage": stage, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    sampler = None
    if stage == "extract":
        from lorif_dist.extract import GradientExtractor, run_extract

        extractor = GradientExtractor(cfg, runtime)
        sampler = _start_sampler(record)
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

        sampler = _start_sampler(record)
        cpu = time.process_time()
        report = run_curvature(cfg, runtime)
        record["cpu_seconds"] = time.process_time() - cpu
        record.update(seconds=time.perf_counter() - start, layers=report)
    elif stage == "query":
        from lorif_dist.extract import GradientExtractor
        from lorif_dist.query import run_query

        extractor = GradientExtractor(cfg, runtime)  # model loading is not query time
        sampler = _start_sampler(record)
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
    record.update(wall_seconds=time.perf_counter() - start, rss_peak_mb=sampler.stop())
    write_json(Path(out), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
