"""Integrity: a shard reads as finished only when it is; damage is caught and its fix printed.

An index of two array tasks is built in-process; then one shard is truncated, or has one
byte of factor data flipped, and curvature and query must refuse it naming the file and the
commands that regenerate it. Those commands are then run, exactly as printed, in a real
subprocess, and the index is whole again.
"""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lorif_dist.config import load_config, replace
from lorif_dist.curvature import run_curvature
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.inspection import inspect_index
from lorif_dist.integrity import ShardBusyError, shard_lock
from lorif_dist.manifest import manifest_path
from lorif_dist.query import run_query
from lorif_dist.safe_io import create_h5
from lorif_dist.storage import ShardCorruptError, ShardReader, file_sha256, shard_path
from lorif_dist.testing import make_records, write_json
from tests.reliability_helpers import TINY_RECIPE, cli_env, manifest, shard_arrays, tiny_overrides


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoints):
    """An index of 2 array tasks x 1 rank with curvature, built once in this process."""
    root = tmp_path_factory.mktemp("integrity")
    train = write_json(root / "train.json", make_records(14, seed=1))
    queries = write_json(root / "queries.json", make_records(2, seed=7))
    overrides = tiny_overrides(
        checkpoints["llama"], train, root / "index", "--run.num_tasks", "2"
    ) + ["--query.files", str(queries)]
    cfg = load_config(TINY_RECIPE, overrides)
    runtime = init_runtime("cpu", "single", 0, 2)
    extractor = GradientExtractor(cfg, runtime)
    for task in (0, 1):
        runtime.task_id = task
        run_extract(cfg, runtime, extractor)
    runtime.task_id = 0
    run_curvature(cfg, runtime)
    yield root, cfg, runtime, extractor
    extractor.close()


@pytest.fixture
def index_copy(built, tmp_path):
    """A private copy of the built index (its recorded commands still name the original)."""
    root, cfg, runtime, extractor = built
    shutil.copytree(root / "index", tmp_path / "index")
    runtime.task_id = 0
    yield replace(cfg, run={"index_dir": str(tmp_path / "index")}), runtime, extractor
    runtime.task_id = 0


def _run_printed_commands(message: str, cwd) -> None:
    """Runs the `rm ...` and `cd ... && lorif extract ...` lines of an error message."""
    lines = [line.strip() for line in message.splitlines()]
    rm = next(line for line in lines if line.startswith("rm "))
    extract = next(line for line in lines if "lorif extract" in line)
    subprocess.run(rm, shell=True, check=True)
    command = extract.replace("lorif extract", f"{sys.executable} -m lorif_dist extract")
    proc = subprocess.run(
        command, shell=True, cwd=cwd, env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_truncated_and_corrupted_shards_are_caught_with_the_fix(built, tmp_path):
    root, cfg, runtime, extractor = built  # damaged, then repaired by the printed commands
    index = root / "index"
    victim = shard_path(index, 1, 0)
    pristine = tmp_path / "pristine.h5"
    shutil.copy(victim, pristine)
    entry = manifest(index)["shards"]["task-0001/rank-00000"]
    assert entry["sha256"] == file_sha256(victim) and entry["bytes"] == victim.stat().st_size

    # Truncated: curvature and query both refuse, naming the file and the commands.
    victim.write_bytes(pristine.read_bytes()[: entry["bytes"] // 2])
    for stage in (run_curvature, lambda c, r: run_query(c, r, extractor)):
        with pytest.raises(ShardCorruptError) as info:
            stage(cfg, runtime)
        text = str(info.value)
        assert f"shard {victim} is truncated" in text
        assert f"rm {victim.resolve()}" in text
        assert "lorif extract --config" in text and "config.yaml" in text
        assert "--run.task_id 1 --run.num_tasks 2" in text

    # One byte of factor data flipped, same size: curvature's SHA-256 and query's per-chunk
    # Fletcher-32 both catch it.
    with h5py.File(pristine, "r") as h5:
        layer = next(iter(h5["layers"]))
        offset = h5["layers"][layer]["left"].id.get_chunk_info(0).byte_offset
    data = bytearray(pristine.read_bytes())
    data[offset + 3] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="is corrupted: SHA-256"):
        run_curvature(cfg, runtime)
    with pytest.raises(ShardCorruptError) as info:
        run_query(cfg, runtime, extractor)
    assert f"shard {victim} is corrupted: reading layer" in str(info.value)
    report = inspect_index(index, verify=True)
    assert [s["state"] for s in report["shards"]] == ["finished", "damaged"]
    assert report["next"][0] == f"rm {victim.resolve()}"

    # The printed commands rebuild it, bit-identical; then both stages run.
    _run_printed_commands(str(info.value), tmp_path)
    assert shard_arrays(victim) == shard_arrays(pristine)
    assert file_sha256(victim) == file_sha256(pristine)
    run_curvature(cfg, runtime)
    run_query(cfg, runtime, extractor)


def test_only_a_finished_shard_reads_as_complete(index_copy, tmp_path):
    cfg, runtime, extractor = index_copy
    index = tmp_path / "index"
    path = shard_path(index, 0, 0)

    # A file under the final name without the `complete` mark is refused.
    with create_h5(tmp_path / "half.h5") as h5:
        h5.create_dataset("example_id", data=np.arange(3))
    with pytest.raises(ShardCorruptError, match="is not marked complete"):
        ShardReader(tmp_path / "half.h5")

    # Killed after the shard was renamed into place but before the manifest recorded it:
    # the rerun records it (from the file, hashed) without recomputing anything.
    m = manifest(index)
    before = m["shards"].pop("task-0000/rank-00000")
    manifest_path(index).write_text(json.dumps(m))
    assert inspect_index(index)["shards"][0]["state"] == "unrecorded"
    result = run_extract(cfg, runtime, extractor)
    assert result.num_examples == 0  # nothing recomputed
    after = manifest(index)["shards"]["task-0000/rank-00000"]
    assert {k: after[k] for k in ("sha256", "bytes", "num_examples")} == {
        k: before[k] for k in ("sha256", "bytes", "num_examples")
    }

    # A finished, recorded shard whose bytes changed is not trusted again by a rerun.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="no longer matches its manifest entry"):
        run_extract(cfg, runtime, extractor)


def test_a_second_writer_of_one_shard_is_refused(index_copy, tmp_path):
    cfg, runtime, extractor = index_copy
    path = shard_path(tmp_path / "index", 1, 0)
    runtime.task_id = 1
    with shard_lock(path):  # another process writing task 1, rank 0
        with pytest.raises(ShardBusyError, match=r"is being written by another process \(pid"):
            run_extract(cfg, runtime, extractor)
    run_extract(cfg, runtime, extractor)  # released: fine again


def test_latching_writer_writes_the_same_bytes_as_hdf5s_own_driver(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"g{i}/d": rng.standard_normal((130, 7, 2)).astype(np.float16) for i in range(5)}

    def fill(h5):
        for name, arr in arrays.items():
            h5.create_dataset(name, data=arr, chunks=(64, 7, 2), fletcher32=True)
        h5.attrs["complete"] = True

    with h5py.File(tmp_path / "plain.h5", "w", track_order=True) as h5:
        fill(h5)
    with create_h5(tmp_path / "latched.h5", track_order=True) as h5:
        fill(h5)
    assert (tmp_path / "plain.h5").read_bytes() == (tmp_path / "latched.h5").read_bytes()
