"""Reopening or querying an index with another tokenizer, dataset or config is refused,
showing both sides, and the index is left untouched. There is no --force.

(Another model and another projection are covered by test_errors.py.)
"""

import json
import shutil

import pytest

from lorif_dist.cli import main
from lorif_dist.config import load_config, replace
from lorif_dist.curvature import run_curvature
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.manifest import IndexMismatchError
from lorif_dist.query import run_query
from lorif_dist.storage import file_sha256, shard_path
from lorif_dist.testing import make_records, write_json
from tests.reliability_helpers import TINY_RECIPE, tiny_overrides


def _refused(cfg, stage: str) -> str:
    runtime = init_runtime("cpu", "single")
    extractor = GradientExtractor(cfg, runtime)
    try:
        with pytest.raises(IndexMismatchError) as info:
            if stage == "extract":
                run_extract(cfg, runtime, extractor)
            else:
                run_query(cfg, runtime, extractor)
    finally:
        extractor.close()
    return str(info.value)


def test_other_tokenizer_dataset_or_config_is_refused_showing_both_sides(
    tmp_path, checkpoints, capsys
):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["llama"], model)
    train = write_json(tmp_path / "train.json", make_records(8, seed=2))
    queries = write_json(tmp_path / "queries.json", make_records(2, seed=7))
    index = tmp_path / "index"
    cfg = load_config(
        TINY_RECIPE, tiny_overrides(model, train, index, "--query.files", str(queries))
    )
    runtime = init_runtime("cpu", "single")
    extractor = GradientExtractor(cfg, runtime)
    try:
        run_extract(cfg, runtime, extractor)
        run_curvature(cfg, runtime)
    finally:
        extractor.close()
    before = file_sha256(shard_path(index, 0, 0)), (index / "manifest.json").read_text()
    identity = json.loads((index / "manifest.json").read_text())["identity"]

    # Another tokenizer: same weights and path, the last 20 BPE merges dropped.
    tok_file = model / "tokenizer.json"
    original_tok = tok_file.read_text()
    tok = json.loads(original_tok)
    tok["model"]["merges"] = tok["model"]["merges"][:-20]
    tok_file.write_text(json.dumps(tok))
    for stage in ("extract", "query"):
        text = _refused(cfg, stage)
        assert f"tokenizer.hash: index has '{identity['tokenizer']['hash']}', this run has '" in (
            text
        )
    tok_file.write_text(original_tok)

    # Another dataset: one record of the same file edited in place.
    original_data = train.read_text()
    records = json.loads(original_data)
    records[3]["output"] = "a different answer"
    train.write_text(json.dumps(records))
    old_sha = identity["dataset_files"][0]["sha256"]
    for stage in ("extract", "query"):
        text = _refused(cfg, stage)
        assert f"dataset_files[0].sha256: index has '{old_sha}', this run has '" in text
    train.write_text(original_data)

    # Another config field that changes stored values.
    text = _refused(replace(cfg, data={"max_length": 64}), "extract")
    assert "config.data.max_length: index has 96, this run has 64" in text
    assert "a new run.index_dir" in text

    # Nothing was written by any refused run; and no --force exists to override it.
    assert (file_sha256(shard_path(index, 0, 0)), (index / "manifest.json").read_text()) == before
    overrides = tiny_overrides(model, train, index)
    assert main(["extract", "--config", str(TINY_RECIPE), *overrides, "--force"]) == 2
    assert (file_sha256(shard_path(index, 0, 0)), (index / "manifest.json").read_text()) == before

    # Curvature reads the stored gradients as they are: other extract settings are named in
    # a warning (they have no effect), and the index's curvature is unchanged.
    curvature_file = next((index / "curvature").glob("*.h5"))
    curvature_sha = file_sha256(curvature_file)
    capsys.readouterr()
    run_curvature(replace(cfg, extract={"projection_factor": 4}), runtime)
    assert "extract.projection_factor: index has 2, this run has 4" in capsys.readouterr().err
    assert file_sha256(curvature_file) == curvature_sha
