"""2- and 3-rank runs (gloo, spawned from pytest) with an unsharded model, FSDP2 and
DeepSpeed ZeRO-3 equal a one-rank unsharded run: stored factors by example id, curvature
(singular values, the spectrum-weighted subspace, damping) and the top-k, with queries
that include greedy generations.

The example counts leave ranks with unequal numbers of batches (7 examples, one per batch)
and a rank with no examples at all (3 ranks, 2 examples); a sharded model all-gathers in
every pass, so without lockstep passes these runs would hang (and time out).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
import torch.multiprocessing as mp

from lorif_dist.storage import file_sha256
from lorif_dist.testing import make_records, write_json
from tests.multirank import CRASH_EXIT_CODE, compare_indexes, spawn_ranks
from tests.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
FACTOR_RTOL = 1e-4  # float32 extraction in different batch shapes
CURVATURE_RTOL = 1e-4  # float32 randomized SVD, sums in a different order
SCORE_RTOL = 1e-5


def _overrides(ckpt: Path, train: Path, queries: Path, index: Path, parallel: str, ds: Path):
    return [
        "--model.name_or_path",
        str(ckpt),
        "--model.device",
        "cpu",
        "--data.train_files",
        str(train),
        "--data.max_length",
        "72",
        "--extract.projection_factor",
        "2",
        "--extract.storage_dtype",
        "float32",
        # Exact factors: a rank-1 factor turns float32 noise in a gradient whose top two
        # singular values are close into a much larger change of its singular vectors.
        "--extract.exact_factors",
        "true",
        # One example per batch and per part: ranks get unequal numbers of passes.
        "--extract.max_batch_size",
        "1",
        "--extract.flush_examples",
        "1",
        "--curvature.rank",
        "8",
        "--curvature.oversample",
        "8",
        # Float64 sums: what remains is the model's float32 arithmetic, not reduction order.
        "--curvature.compute_dtype",
        "float64",
        "--query.files",
        str(queries),
        "--query.prompts",
        "the cat sat on,write a short poem about rain",
        "--query.max_new_tokens",
        "6",
        "--query.top_k",
        "4",
        "--query.save_scores",
        "true",
        "--run.index_dir",
        str(index),
        "--run.progress",
        "off",
        "--run.parallel",
        parallel,
        "--run.deepspeed_config",
        str(ds),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoints):
    """Data, a DeepSpeed JSON, and the one-rank unsharded reference indexes."""
    root = tmp_path_factory.mktemp("parallel")
    # The shipped DeepSpeed JSON with persistence threshold 0: every parameter is then
    # partitioned, however small (by default small ones stay whole, which would leave this
    # tiny model unsharded).
    ds_config = json.loads((REPO / "launch" / "ds_zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds = root / "ds_zero3.json"
    ds.write_text(json.dumps(ds_config))
    data = {
        7: write_json(root / "train7.json", make_records(7, seed=3)),
        2: write_json(root / "train2.json", make_records(2, seed=4)),
    }
    queries = write_json(root / "queries.json", make_records(2, seed=7))

    def overrides(kind, num, index, parallel):
        return _overrides(checkpoints[kind], data[num], queries, index, parallel, ds)

    # One thread, as in each spawned rank: the same float32 kernels, so only the sharding
    # and the split over ranks can make a difference.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    references = {}
    try:
        for kind, num in (("llama", 7), ("gpt2", 7), ("llama", 2)):
            index = root / f"ref-{kind}-{num}"
            run_pipeline(overrides(kind, num, index, "none") + ["--run.backend", "single"])
            references[kind, num] = index
    finally:
        torch.set_num_threads(threads)
    return root, overrides, references


def _check(reference: Path, index: Path) -> None:
    diff = compare_indexes(reference, index)
    print(f"{index.name}: {diff}")
    assert diff["factor_rel"] < FACTOR_RTOL, diff
    assert diff["sv_rel"] < CURVATURE_RTOL, diff
    assert diff["subspace_rel"] < CURVATURE_RTOL, diff
    assert diff["damping_rel"] < CURVATURE_RTOL, diff
    assert diff["queries_equal"] and diff["topk_ids_equal"], diff
    assert diff["score_rel"] < SCORE_RTOL, diff
    assert diff["score_matrix_rel"] < SCORE_RTOL, diff


TWO_RANK_CASES = [  # ZeRO-3 last: transformers builds under zero.Init while one lives
    ("llama", 7, "none"),
    ("llama", 7, "fsdp"),
    ("gpt2", 7, "fsdp"),
    ("llama", 7, "zero3"),
    ("gpt2", 7, "zero3"),
]


@pytest.fixture(scope="module")
def two_ranks(setup):
    """Two spawns of 2 ranks: the first ends with a run whose rank 0 dies mid-extraction,
    the second resumes it before the remaining cases (one process start saved)."""
    root, overrides, _ = setup
    index = lambda kind, num, mode: root / f"w2-{kind}-{num}-{mode}"  # noqa: E731
    resume = {
        "overrides": overrides("llama", 7, root / "resume", "fsdp"),
        "stages": ("extract",),
    }
    # Rank 0 has 4 batches, rank 1 has 3: rank 0 dies about to write its 4th part, by
    # which time rank 1 (keeping step in a discarded pass) has saved its shard.
    first = [
        {"overrides": overrides(*case[:2], index(*case), case[2])} for case in TWO_RANK_CASES[:2]
    ]
    with pytest.raises(mp.ProcessExitedException) as crash:
        spawn_ranks(2, first + [{**resume, "crash": (0, 4)}])
    shards = root / "resume" / "shards" / "task-0000"
    finished = shards / "rank-00001.h5"
    state = {
        "exit_code": crash.value.exit_code,
        "finished": finished.is_file(),
        "rank0_shard": (shards / "rank-00000.h5").exists(),
        "rank0_parts": len(list((shards / "rank-00000.parts").glob("part-*.h5"))),
        "rank1_before": (finished.stat().st_mtime_ns, file_sha256(finished))
        if finished.is_file()
        else None,
    }
    rest = [
        {"overrides": overrides(*case[:2], index(*case), case[2])} for case in TWO_RANK_CASES[2:]
    ]
    spawn_ranks(2, [resume] + rest)
    state["rank1_after"] = (finished.stat().st_mtime_ns, file_sha256(finished))
    return state


def test_two_ranks_equal_one_rank(setup, two_ranks):
    root, _, references = setup
    for kind, num, mode in TWO_RANK_CASES:
        _check(references[kind, num], root / f"w2-{kind}-{num}-{mode}")


def test_three_ranks_equal_one_rank_including_a_rank_without_examples(setup):
    root, overrides, references = setup
    cases = [
        ("llama", 7, "none"),
        ("llama", 7, "fsdp"),
        ("llama", 2, "fsdp"),
        ("llama", 7, "zero3"),
        ("llama", 2, "zero3"),
    ]
    runs = [
        {"overrides": overrides(kind, num, root / f"w3-{kind}-{num}-{mode}", mode)}
        for kind, num, mode in cases
    ]
    spawn_ranks(3, runs)
    for kind, num, mode in cases:
        _check(references[kind, num], root / f"w3-{kind}-{num}-{mode}")
    for mode in ("fsdp", "zero3"):
        empty = root / f"w3-llama-2-{mode}" / "shards" / "task-0000" / "rank-00002.h5"
        with h5py.File(empty, "r") as h5:
            assert h5.attrs["complete"] and h5["example_id"].shape == (0,)


def test_sharded_rerun_resumes_after_a_crash(setup, two_ranks):
    """After the crash rank 1's shard is complete and rank 0 has 3 of 4 parts. The rerun
    resumes rank 0 from its parts while rank 1 only keeps step (its shard untouched), and
    both shards end bit-identical to those of the uninterrupted run."""
    root, _, _ = setup
    assert two_ranks["exit_code"] == CRASH_EXIT_CODE
    assert two_ranks["finished"] and not two_ranks["rank0_shard"]
    assert two_ranks["rank0_parts"] == 3
    assert two_ranks["rank1_after"] == two_ranks["rank1_before"]
    shards = root / "resume" / "shards" / "task-0000"
    uninterrupted = root / "w2-llama-7-fsdp" / "shards" / "task-0000"
    for name in ("rank-00000.h5", "rank-00001.h5"):
        assert file_sha256(shards / name) == file_sha256(uninterrupted / name), name


def test_zero3_config_forces_what_extraction_needs(tmp_path):
    """Stage 3, the model's dtype, no optimizer, whatever the JSON says."""
    from lorif_dist.config import load_config
    from lorif_dist.parallel import zero3_config

    user = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}
    user |= {"bf16": {"enabled": "auto"}, "train_batch_size": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    for dtype, bf16, fp16 in (("float32", False, False), ("bfloat16", True, False)):
        cfg = load_config(None, ["--model.dtype", dtype, "--run.deepspeed_config", str(path)])
        ds = zero3_config(cfg)
        assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds
        assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16
        assert "train_batch_size" not in ds
    cfg = load_config(None, ["--model.dtype", "float64", "--run.parallel", "zero3"])
    with pytest.raises(ValueError, match="float64"):
        zero3_config(cfg)


def test_sharding_without_a_process_group_is_refused(checkpoints, data_files):
    from lorif_dist.config import load_config
    from lorif_dist.distributed import init_runtime
    from lorif_dist.extract import GradientExtractor

    overrides = ["--model.name_or_path", str(checkpoints["llama"]), "--model.device", "cpu"]
    overrides += ["--data.train_files", str(data_files["train"]), "--run.parallel", "fsdp"]
    cfg = load_config(None, overrides)
    with pytest.raises(ValueError, match="launch with torchrun"):
        GradientExtractor(cfg, init_runtime("cpu", "single"))
