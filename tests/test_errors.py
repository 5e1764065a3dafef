"""Bad input gets a clear error naming what was expected and found; nothing written is lost."""

import json
import subprocess
import sys

import pytest

from lorif_dist.config import ConfigError, load_config
from lorif_dist.manifest import IndexMismatchError, load_manifest
from lorif_dist.storage import file_sha256
from tests.conftest import exact_overrides, make_records, write_json
from tests.pipeline import run_pipeline


def _overrides(tmp_path, checkpoints, data_files, kind="gpt2"):
    return exact_overrides(
        tmp_path / "index", checkpoints[kind], [data_files["train"]], data_files["queries"]
    )


def test_config_errors_name_every_bad_field():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "--extract.factor_rank",
                "0",
                "--curvature.damping_rule",
                "sideways",
                "--query.top_k",
                "many",
            ],
        )
    text = str(info.value)
    assert "extract.factor_rank: expected a number >= 1, got 0" in text
    assert (
        "curvature.damping_rule: expected one of ['relative', 'absolute'], got 'sideways'" in text
    )
    assert "query.top_k: expected an integer, got 'many'" in text


def test_unknown_field_and_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"extract.rank_c: unknown field"):
        load_config(None, ["--extract.rank_c", "2"])
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml.* not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_data_file(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + [
        "--data.train_files",
        str(tmp_path / "gone.json"),
    ]
    with pytest.raises(
        FileNotFoundError, match="data.train_files: data file .*gone.json.* not found"
    ):
        run_pipeline(overrides)


def test_missing_model_directory(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + [
        "--model.name_or_path",
        str(tmp_path / "no-model"),
    ]
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory .*never downloaded"):
        run_pipeline(overrides)


def test_empty_dataset(tmp_path, checkpoints, data_files):
    empty = write_json(tmp_path / "empty.json", [])
    overrides = _overrides(tmp_path, checkpoints, data_files) + ["--data.train_files", str(empty)]
    with pytest.raises(ValueError, match="no examples found in .*empty.json"):
        run_pipeline(overrides)


def test_empty_and_fully_truncated_responses_are_skipped_and_counted(
    tmp_path, checkpoints, data_files
):
    records = make_records(6, seed=3)
    records.append({"instruction": "a cat", "input": "", "output": ""})
    records.append(
        {"instruction": " ".join(["the rain fell"] * 40), "input": "", "output": "over the town"}
    )
    train = write_json(tmp_path / "mixed.json", records)
    overrides = _overrides(tmp_path, checkpoints, data_files) + ["--data.train_files", str(train)]
    cfg, scores, _ = run_pipeline(overrides)
    dataset = load_manifest(cfg.run.index_dir)["dataset"]
    assert dataset["skipped"] == {
        "6": "empty response",
        "7": "response fully truncated by data.max_length",
    }
    assert dataset["num_examples"] == 6 and dataset["num_records"] == 8
    assert (~(scores[0] != scores[0])).sum() == 6  # six scored columns


def test_all_examples_skipped_is_an_error(tmp_path, checkpoints, data_files):
    train = write_json(tmp_path / "bad.json", [{"instruction": "x", "input": "", "output": " "}])
    overrides = _overrides(tmp_path, checkpoints, data_files) + ["--data.train_files", str(train)]
    with pytest.raises(ValueError, match="all 1 examples were skipped .*empty response"):
        run_pipeline(overrides)


def test_layer_pattern_that_matches_nothing_lists_the_layers(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + ["--extract.layers", "nonexistent"]
    with pytest.raises(
        ValueError, match=r"matches no linear layer .*transformer\.h\.0\.attn\.c_attn"
    ):
        run_pipeline(overrides)


def test_projection_factor_larger_than_a_layer(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + [
        "--extract.projection_factor",
        "32",
    ]
    with pytest.raises(
        ValueError, match=r"projection_factor=32 is larger than layer .*width \(in 16"
    ):
        run_pipeline(overrides)


def test_factor_rank_above_min_width(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + [
        "--extract.exact_factors",
        "false",
        "--extract.factor_rank",
        "9",
        "--extract.projection_factor",
        "2",
    ]
    with pytest.raises(ValueError, match=r"factor_rank=9 exceeds min\(d1, d2\) = 8"):
        run_pipeline(overrides)


def test_curvature_rank_above_d(tmp_path, checkpoints, data_files):
    overrides = _overrides(tmp_path, checkpoints, data_files) + [
        "--extract.projection_factor",
        "4",
        "--curvature.rank",
        "100",
    ]
    with pytest.raises(ValueError, match=r"curvature.rank=100 exceeds D = d1 \* d2 = 48"):
        run_pipeline(overrides)


def test_other_model_or_config_is_refused_and_the_index_is_untouched(
    tmp_path, checkpoints, data_files
):
    overrides = _overrides(tmp_path, checkpoints, data_files)
    cfg, _, _ = run_pipeline(overrides)
    shard = next((tmp_path / "index" / "shards").rglob("*.h5"))
    before = file_sha256(shard), (tmp_path / "index" / "manifest.json").read_text()

    # Extracting into it with another projection factor.
    with pytest.raises(
        IndexMismatchError, match=r"extract.projection_factor: index has 1, this run has 2"
    ):
        run_pipeline(overrides + ["--extract.projection_factor", "2"])
    # Querying it with another model.
    from lorif_dist.distributed import init_runtime
    from lorif_dist.query import run_query

    other = load_config(None, overrides + ["--model.name_or_path", str(checkpoints["llama"])])
    with pytest.raises(IndexMismatchError) as info:
        run_query(other, init_runtime("cpu", "single"))
    assert "model.class: index has 'GPT2LMHeadModel', this run has 'LlamaForCausalLM'" in str(
        info.value
    )
    assert (file_sha256(shard), (tmp_path / "index" / "manifest.json").read_text()) == before


def test_cli_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorif_dist", "extract", "--extract.factor_rank", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "extract.factor_rank: expected a number >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_curvature_refuses_an_incomplete_index(tmp_path, checkpoints, data_files):
    from lorif_dist.curvature import run_curvature
    from lorif_dist.distributed import init_runtime
    from lorif_dist.extract import run_extract

    cfg = load_config(
        None,
        _overrides(tmp_path, checkpoints, data_files)
        + ["--run.num_tasks", "3", "--run.task_id", "1"],
    )
    run_extract(cfg, init_runtime("cpu", "single", 1, 3))
    with pytest.raises(
        ValueError, match=r"incomplete: 2 of 3 shards .*task-0000/rank-00000, task-0002/rank-00000"
    ):
        run_curvature(cfg, init_runtime("cpu", "single", 0, 3))
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["task-0001/rank-00000"]
