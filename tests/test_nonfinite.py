"""An example whose loss is NaN for real is not stored; it is listed and counted; the run goes on.

The model is the tiny Llama, untied, with the input embedding row of a token that only
example 0 uses set to NaN: example 0's forward pass produces a NaN loss through the
model's own arithmetic, every other example is untouched.
"""

import logging

import h5py
import numpy as np

from lorif_dist.config import load_config
from lorif_dist.curvature import run_curvature
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.inspection import inspect_index
from lorif_dist.logging_utils import logger, setup_logging
from lorif_dist.query import load_score_matrix, output_dir, run_query
from lorif_dist.storage import shard_path
from lorif_dist.testing import make_records, write_json
from tests.reliability_helpers import TINY_RECIPE, manifest, tiny_overrides, write_nan_inputs


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_nan_example_is_skipped_listed_counted_and_the_run_goes_on(tmp_path, checkpoints):
    ckpt, train, _ = write_nan_inputs(tmp_path, checkpoints["llama"], num=20)
    queries = write_json(tmp_path / "queries.json", make_records(2, seed=7))
    index = tmp_path / "index"
    cfg = load_config(
        TINY_RECIPE, tiny_overrides(ckpt, train, index, "--query.files", str(queries))
    )
    runtime = init_runtime("cpu", "single")
    lines = _Lines()
    setup_logging(0)  # info lines on, as the command line has them
    logger.addHandler(lines)
    extractor = GradientExtractor(cfg, runtime)
    try:
        result = run_extract(cfg, runtime, extractor)
        run_curvature(cfg, runtime)
        run_query(cfg, runtime, extractor)
    finally:
        extractor.close()
        logger.removeHandler(lines)

    # Not stored; listed in the shard and the manifest; counted in the summary.
    assert result.num_skipped == 1 and result.num_examples == 19
    with h5py.File(shard_path(index, 0, 0), "r") as h5:
        assert h5["skipped_example_id"][...].tolist() == [0]
        assert sorted(h5["example_id"][...].tolist()) == list(range(1, 20))
        for name in h5["layers"]:
            for key in ("left", "right", "scale"):
                assert np.isfinite(h5["layers"][name][key][...]).all()
    assert manifest(index)["shards"]["task-0000/rank-00000"]["skipped_nonfinite"] == [0]
    summary = next(line for line in lines.lines if line.startswith("extract done:"))
    assert "skipped_nonfinite=1" in summary
    assert any("skipped examples [0]" in line for line in lines.lines)

    # The run went on: curvature and query used the other 19, with finite scores.
    scores = load_score_matrix(output_dir(cfg), 20)
    assert np.isnan(scores[:, 0]).all() and np.isfinite(scores[:, 1:]).all()
    report = inspect_index(index)
    assert report["examples"]["skipped_nonfinite"] == [0]
    assert report["examples"]["stored"] == 19
