"""Scores must not depend on how the work was cut: batch size, padding side, shard size."""

import numpy as np
import pytest

from tests.conftest import REL_FLOAT32
from tests.pipeline import run_pipeline


def _base(tmp_path, name, ckpt, files, queries):
    return [
        "--model.name_or_path",
        str(ckpt),
        "--model.device",
        "cpu",
        "--data.train_files",
        ",".join(str(f) for f in files),
        "--data.max_length",
        "72",
        "--extract.projection_factor",
        "2",
        "--extract.factor_rank",
        "1",
        "--extract.storage_dtype",
        "float32",
        "--curvature.rank",
        "8",
        "--curvature.oversample",
        "8",
        "--query.files",
        str(queries),
        "--query.save_scores",
        "true",
        "--run.index_dir",
        str(tmp_path / name),
        "--run.progress",
        "off",
        "--run.backend",
        "single",
    ]


VARIANTS = {
    "batch_size_1": ["--extract.max_batch_size", "1"],
    "left_padding": ["--extract.padding_side", "left"],
    "small_shards": [
        "--run.num_tasks",
        "3",
        "--curvature.batch_examples",
        "7",
        "--query.batch_examples",
        "7",
    ],
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_scores_do_not_depend_on_batching_padding_or_sharding(
    tmp_path, checkpoints, data_files, kind
):
    files = [data_files["train"], data_files["chat"]]
    base = _base(tmp_path, "base", checkpoints[kind], files, data_files["queries"])
    _, reference, ref_rows = run_pipeline(base + ["--extract.max_batch_size", "8"])
    ids = np.nonzero(~np.isnan(reference[0]))[0]
    scale = np.abs(reference[:, ids]).max()
    assert scale > 0
    for name, extra in VARIANTS.items():
        overrides = base + ["--run.index_dir", str(tmp_path / name)] + extra
        _, scores, rows = run_pipeline(overrides)
        np.testing.assert_array_equal(np.isnan(scores), np.isnan(reference), err_msg=name)
        np.testing.assert_allclose(
            scores[:, ids], reference[:, ids], rtol=0, atol=REL_FLOAT32 * scale, err_msg=name
        )
        assert [r["train_id"] for r in rows] == [r["train_id"] for r in ref_rows], name
