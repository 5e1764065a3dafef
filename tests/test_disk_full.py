"""A full disk: a clear error, nothing marked complete, and a rerun finishes once space is freed.

The index lives on a tmpfs the test mounts (needs root; skipped with the reason otherwise).
It is first too small for the parts, then large enough for the parts but not for joining
them into the shard, then large enough. Before this package wrote HDF5 through its own
file object, a full disk either killed the process with SIGSEGV or raised HDF5's
"RuntimeError: Disable slist on flush dest failure failed" (HDF5 2.0 / h5py 3.16).
"""

import os
import shutil
import subprocess

import pytest

from lorif_dist.cli import main
from lorif_dist.config import load_config, replace
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.safe_io import DiskFullError
from lorif_dist.storage import shard_path
from lorif_dist.testing import make_records, write_json
from tests.reliability_helpers import TINY_RECIPE, manifest, shard_arrays, tiny_overrides


def _mount(point, size: int) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
        check=True,
        capture_output=True,
    )


def _resize(point, size: int) -> None:
    """Frees space the way an operator would: a bigger file system under the same path."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    try:
        _mount(point, 600 * 1024)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(e, 'stderr', e)!r})")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def _leftovers(index) -> list:
    return [p for p in index.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_is_a_clear_error_and_a_rerun_finishes(small_disk, tmp_path, checkpoints):
    train = write_json(tmp_path / "train.json", make_records(24, seed=3))
    more = ["--extract.max_batch_size", "2", "--extract.flush_examples", "4"]
    overrides = tiny_overrides(checkpoints["llama"], train, small_disk / "index", *more)
    cfg = load_config(TINY_RECIPE, overrides)
    runtime = init_runtime("cpu", "single")
    extractor = GradientExtractor(cfg, runtime)
    shard = shard_path(small_disk / "index", 0, 0)
    parts_dir = shard.with_suffix(".parts")
    try:
        # 1. No room for all the parts.
        with pytest.raises(DiskFullError) as info:
            run_extract(cfg, runtime, extractor)
        text = str(info.value)
        assert "no space left on the device while writing shard part" in text
        assert "Nothing was marked complete" in text and "rerun the same command" in text
        parts = sorted(parts_dir.glob("part-*.h5"))
        assert parts and not shard.exists() and not _leftovers(small_disk / "index")
        assert manifest(small_disk / "index")["shards"] == {}

        # 2. Room for the remaining parts, not for joining them: the join fails cleanly,
        # through the command line too (exit code 2, no traceback).
        part_bytes = max(p.stat().st_size for p in parts)
        remaining = 12 // 2 - len(parts)  # 12 batches of 2, a part every 2 batches
        used = shutil.disk_usage(small_disk).used
        _resize(small_disk, used + remaining * part_bytes + part_bytes // 4)
        assert main(["extract", "--config", str(TINY_RECIPE), *overrides]) == 2
        assert len(list(parts_dir.glob("part-*.h5"))) == 6 and not shard.exists()
        assert not _leftovers(small_disk / "index")
        assert manifest(small_disk / "index")["shards"] == {}

        # 3. Space freed: the rerun resumes after the last part, joins and records the shard,
        # identical to a run that never saw a full disk.
        _resize(small_disk, 16 * 1024 * 1024)
        result = run_extract(cfg, runtime, extractor)
        assert result.num_examples == 0  # every batch came from the parts on disk
        assert (
            manifest(small_disk / "index")["shards"]["task-0000/rank-00000"]["num_examples"] == 24
        )
        reference = replace(cfg, run={"index_dir": str(tmp_path / "reference")})
        run_extract(reference, runtime, extractor)
        assert shard_arrays(shard) == shard_arrays(shard_path(tmp_path / "reference", 0, 0))
    finally:
        extractor.close()
