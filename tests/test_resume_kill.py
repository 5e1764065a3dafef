"""A worker killed with SIGKILL mid-shard resumes and ends bit-identical to an unkilled run.

Real processes: `python -m lorif_dist extract` on the tiny recipe, 2 examples per batch and
a part every 4 examples, killed with SIGKILL as soon as its first part is on disk. The
training set contains one example whose loss is NaN for real (a NaN embedding row of a token
only it uses), in the first batch, so the resumed shard must also carry its skipped id over
from the parts written before the kill.
"""

import re
import signal
import time

import h5py

from lorif_dist.inspection import inspect_index
from lorif_dist.storage import file_sha256, shard_path
from tests.reliability_helpers import (
    finish,
    manifest,
    shard_arrays,
    start_cli,
    tiny_overrides,
    write_nan_inputs,
)

FLUSH_EXAMPLES = 4
BATCH = 2
BATCH_DONE = re.compile(r"extract: batch (\d+) of (\d+) done \((\d+) examples\)")


def _batches_logged(log_text: str) -> dict[int, int]:
    """batch index -> examples, for every batch the process finished."""
    return {int(m[1]): int(m[3]) for m in BATCH_DONE.finditer(log_text)}


def _parts_on_disk(parts_dir) -> tuple[int, int]:
    """(batches covered, examples stored + skipped) by the whole parts on disk."""
    parts = sorted(parts_dir.glob("part-*.h5"))
    batches, examples = 0, 0
    for part in parts:
        with h5py.File(part, "r") as h5:
            batches = int(h5.attrs["batch_stop"])
            examples += h5["example_id"].shape[0] + h5["skipped_example_id"].shape[0]
    return batches, examples


def test_sigkill_mid_shard_resumes_bit_identical(tmp_path, checkpoints):
    ckpt, train, _ = write_nan_inputs(tmp_path, checkpoints["llama"], num=48)
    more = ["--extract.max_batch_size", str(BATCH), "--extract.flush_examples", str(FLUSH_EXAMPLES)]
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    shard = shard_path(killed_dir, 0, 0)
    parts_dir = shard.with_suffix(".parts")

    # Run 1, killed with SIGKILL once a part is on disk and a later batch is done (so the
    # kill lands inside a flush interval); beside it, the uninterrupted reference run.
    straight_proc = start_cli(
        "extract",
        tiny_overrides(ckpt, train, straight_dir, *more),
        tmp_path / "straight.log",
        tmp_path,
    )
    proc = start_cli(
        "extract",
        tiny_overrides(ckpt, train, killed_dir, *more),
        tmp_path / "killed.log",
        tmp_path,
        LORIF_LOG_LEVEL="DEBUG",
    )
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no part appeared within 180 s"
        if any(parts_dir.glob("part-*.h5")):
            parts_batches, _ = _parts_on_disk(parts_dir)
            done = _batches_logged((tmp_path / "killed.log").read_text())
            if any(i >= parts_batches for i in done):
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL

    # Nothing reads as complete; what is on disk is whole parts.
    assert not shard.exists()
    assert manifest(killed_dir)["shards"] == {}
    parts_batches, parts_examples = _parts_on_disk(parts_dir)
    killed_log = (tmp_path / "killed.log").read_text()
    done_by_killed = _batches_logged(killed_log)
    lost = {i: n for i, n in done_by_killed.items() if i >= parts_batches}
    # The killed run's work that no part holds (plus at most the batch it was in) is all a
    # resume redoes: it lies within one flush interval.
    assert sum(lost.values()) + BATCH <= FLUSH_EXAMPLES
    report = inspect_index(killed_dir)
    assert report["shards"][0]["state"] == "in progress"
    assert report["shards"][0]["examples"] + 1 == parts_examples  # + the skipped NaN example
    assert "--run.task_id 0" in report["next"][0]

    # Run 2: the same command resumes after the last whole part and finishes.
    proc = start_cli(
        "extract",
        tiny_overrides(ckpt, train, killed_dir, *more),
        tmp_path / "resumed.log",
        tmp_path,
        LORIF_LOG_LEVEL="DEBUG",
    )
    assert finish(proc) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resumed_log = (tmp_path / "resumed.log").read_text()
    total = int(BATCH_DONE.search(killed_log)[2])
    assert f"resumes after {parts_batches} of {total} batches" in resumed_log
    redone = _batches_logged(resumed_log)
    assert min(redone) == parts_batches and max(redone) == total - 1  # nothing written redone
    # The summary tells what this run computed apart from what it found written.
    assert f"resumed_examples={parts_examples} " in resumed_log, resumed_log[-2000:]

    assert finish(straight_proc) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    # Bit-identical: every stored array, the file itself, and the manifest entries.
    straight = shard_path(straight_dir, 0, 0)
    assert shard_arrays(shard) == shard_arrays(straight)
    assert file_sha256(shard) == file_sha256(straight)
    entry_a = manifest(killed_dir)["shards"]["task-0000/rank-00000"]
    entry_b = manifest(straight_dir)["shards"]["task-0000/rank-00000"]
    for key in ("num_examples", "bytes", "sha256", "skipped_nonfinite"):
        assert entry_a[key] == entry_b[key]
    assert entry_a["skipped_nonfinite"] == [0]  # from a part written before the kill
    assert not parts_dir.exists()
    print(
        f"\nresume: killed after {len(done_by_killed)} of {total} batches; parts held "
        f"{parts_batches} batches ({parts_examples} examples); redone "
        f"{sum(lost.values())} examples (+ at most one in-flight batch of {BATCH}); "
        f"flush interval {FLUSH_EXAMPLES} examples"
    )
