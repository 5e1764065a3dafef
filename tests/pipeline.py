"""Runs the three stages in this process, the way the CLI does, and reads the scores back."""

from __future__ import annotations

import json

import numpy as np

from lorif_dist.config import Config, load_config
from lorif_dist.curvature import run_curvature
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.manifest import load_manifest
from lorif_dist.query import load_score_matrix, output_dir, run_query


def run_pipeline(
    overrides: list[str], config: str | None = None
) -> tuple[Config, np.ndarray, list[dict]]:
    cfg = load_config(config, overrides)
    runtime = init_runtime(cfg.model.device, cfg.run.backend, cfg.run.task_id, cfg.run.num_tasks)
    extractor = GradientExtractor(cfg, runtime)
    try:
        if cfg.run.num_tasks and cfg.run.num_tasks > 1:
            for task in range(cfg.run.num_tasks):
                runtime.task_id = task
                run_extract(cfg, runtime, extractor)
            runtime.task_id = 0
        else:
            run_extract(cfg, runtime, extractor)
        run_curvature(cfg, runtime)
        run_query(cfg, runtime, extractor)
    finally:
        extractor.close()
    manifest = load_manifest(cfg.run.index_dir)
    scores = load_score_matrix(output_dir(cfg), manifest["dataset"]["num_records"])
    rows = [json.loads(line) for line in (output_dir(cfg) / "topk.jsonl").read_text().splitlines()]
    return cfg, scores, rows


def stored_ids(scores: np.ndarray) -> np.ndarray:
    return np.nonzero(~np.isnan(scores[0]))[0]
