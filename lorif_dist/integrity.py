"""Shard integrity: who checks what, when, and how a damaged shard is regenerated.

A shard is finished when (1) its file exists under its final name (only a complete, fsynced
file is ever renamed there), (2) its `complete` attribute is set, and (3) the manifest
lists it with its size and SHA-256. Checks, from cheapest to dearest:

    size, structure, shapes   every open (curvature, query, inspect): a stat and HDF5
                              metadata; catches truncation, a missing or foreign file
    Fletcher-32 per chunk     every read of factors (storage.py): CPU only, on reads the
                              stage makes anyway; catches corrupted bytes in the data
    SHA-256 of the whole file one extra sequential read of the file. Paid where it is
                              cheap relative to the stage: by extraction when it finds a
                              finished shard on a rerun, and by curvature before its first
                              pass (curvature reads every shard q + 3 times, so one more
                              read costs ~1/(q + 3) of its I/O). Not by query: it reads
                              each shard exactly once per query batch and is I/O bound, so
                              a hash would double its cost; its reads are covered by the
                              per-chunk checksums. `lorif inspect --verify` hashes on demand.

Every error names the file and the exact commands that regenerate it: delete the file, then
rerun extraction for its array task with the same number of ranks (`config.yaml`, written
into the index by extraction, holds the resolved recipe; the other ranks of that task find
their shards finished and only wait at the final barrier).

A (task, rank) is written by one process at a time: `shard_lock` takes an exclusive flock
on `rank-RRRRR.lock` beside the shard, so a job submitted twice, or a requeued job whose
first instance is still alive, fails at once instead of interleaving parts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorif_dist.config import Config, config_yaml, replace
from lorif_dist.manifest import update_section
from lorif_dist.safe_io import write_text_atomic
from lorif_dist.storage import ShardCorruptError, ShardReader, file_sha256, shard_path

CONFIG_FILE = "config.yaml"


class ShardBusyError(ValueError):
    """Another live process holds this (task, rank)'s shard lock."""


def record_extract_run(cfg: Config) -> None:
    """Writes the resolved recipe to INDEX/config.yaml and where it was run from, so that
    error messages and `lorif inspect` can print commands that rebuild any shard."""
    index_dir = Path(cfg.run.index_dir)
    path = (index_dir / CONFIG_FILE).resolve()
    recipe = replace(cfg, run={"task_id": None, "num_tasks": None})
    write_text_atomic(path, config_yaml(recipe), "config")
    update_section(index_dir, "extract_run", {"cwd": os.getcwd(), "config_file": str(path)})


def parse_shard_name(name: str) -> tuple[int, int]:
    """ "task-0003/rank-00001" -> (3, 1)."""
    task, rank = name.split("/")
    return int(task.removeprefix("task-")), int(rank.removeprefix("rank-"))


def extract_command(index_dir: str | Path, manifest: dict[str, Any], task_id: int) -> str:
    """The command that (re)runs extraction for one array task, as the index was built."""
    index_dir = Path(index_dir).resolve()
    layout = manifest["layout"]
    world_size, num_tasks = layout["world_size"], layout["num_tasks"]
    run = manifest.get("extract_run", {})
    config = run.get("config_file") or str(index_dir / CONFIG_FILE)
    if not Path(config).is_file():
        config = "<your recipe.yaml> --run.index_dir " + shlex.quote(str(index_dir))
    else:
        config = shlex.quote(config)
    args = f"extract --config {config} --run.task_id {task_id} --run.num_tasks {num_tasks}"
    if world_size == 1:
        command = f"lorif {args}"
    else:
        command = (
            f"torchrun --nproc_per_node {world_size} -m lorif_dist {args}   (or any launcher "
            f"giving {world_size} ranks in all: srun -n {world_size}, mpiexec -n {world_size}, "
            f"accelerate launch --num_processes {world_size})"
        )
    cwd = run.get("cwd")
    return f"cd {shlex.quote(cwd)} && {command}" if cwd else command


def regenerate_commands(index_dir: str | Path, manifest: dict[str, Any], shard: str) -> list[str]:
    """Delete the shard, rerun its array task's extraction (same number of ranks)."""
    task_id, rank = parse_shard_name(shard)
    path = shard_path(index_dir, task_id, rank).resolve()
    return [f"rm {shlex.quote(str(path))}", extract_command(index_dir, manifest, task_id)]


def regenerate_hint(index_dir: str | Path, manifest: dict[str, Any], shard: str) -> str:
    commands = regenerate_commands(index_dir, manifest, shard)
    return "regenerate it with:\n    " + "\n    ".join(commands)


def _problem(path: Path, what: str, hint: str) -> ShardCorruptError:
    return ShardCorruptError(f"shard {path} {what}; {hint}")


def check_layers(reader: ShardReader, layers: list[dict[str, Any]], hint: str) -> None:
    """Dataset shapes against the manifest's layer table (metadata reads only)."""
    n = reader.num_examples
    for spec in layers:
        name, d1, d2, c = spec["name"], spec["d1"], spec["d2"], spec["c"]
        if reader.layout == "dense":  # logra / graddot: one row of d1 * d2 per example
            expected = {"dense": (n, d1 * d2), "scale": (n, 1)}
        else:
            expected = {"left": (n, d1, c), "right": (n, d2, c), "scale": (n, c)}
        for key, shape in expected.items():
            found = reader.read_checked(
                lambda k=key, n_=name: reader.h5["layers"][n_][k].shape, key
            )
            if tuple(found) != shape:
                raise _problem(
                    reader.path, f"has layers/{name}/{key} of shape {found}, expected {shape}", hint
                )


def open_shard(
    index_dir: str | Path, manifest: dict[str, Any], shard: str, verify_checksum: bool
) -> ShardReader:
    """Opens a finished shard after checking it against its manifest entry.

    Args:
        index_dir: the index.
        manifest: the loaded manifest (its `shards` entry for `shard` must exist).
        shard: "task-TTTT/rank-RRRRR".
        verify_checksum: also compare the file's SHA-256 (one extra read of the file).

    Raises:
        ShardCorruptError: missing, truncated, changed or corrupted; the message names the
            file and the commands that regenerate it.
    """
    hint = regenerate_hint(index_dir, manifest, shard)
    entry = manifest["shards"][shard]
    path = shard_path(index_dir, *parse_shard_name(shard))
    if not path.is_file():
        raise _problem(path, "is listed as finished in the manifest but does not exist", hint)
    size = path.stat().st_size
    if size != entry["bytes"]:
        what = "is truncated" if size < entry["bytes"] else "has changed"
        raise _problem(path, f"{what}: {size} bytes, the manifest records {entry['bytes']}", hint)
    if verify_checksum:
        found = file_sha256(path)
        if found != entry["sha256"]:
            raise _problem(
                path, f"is corrupted: SHA-256 {found}, the manifest records {entry['sha256']}", hint
            )
    reader = ShardReader(path, regenerate=hint)
    try:
        if reader.num_examples != entry["num_examples"]:
            raise _problem(
                path,
                f"holds {reader.num_examples} examples, the manifest records "
                f"{entry['num_examples']}",
                hint,
            )
        check_layers(reader, manifest["identity"]["layers"], hint)
    except BaseException:
        reader.close()
        raise
    return reader


@contextlib.contextmanager
def shard_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive, non-blocking flock for writing one shard (released on death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(".lock")
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ShardBusyError(
                f"shard {path} is being written by another process ({holder}); two processes "
                "must not write one (task, rank). Wait for it, or stop it, then rerun"
            ) from e
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def open_shards(
    index_dir: str | Path,
    manifest: dict[str, Any],
    names: list[str],
    verify_checksum: bool,
    collective: Any,
) -> list[ShardReader]:
    """Checks and opens this rank's shards; every rank raises if any rank found a problem.

    Raising on one rank only would leave the others waiting in their next collective.
    """
    readers, problems = [], []
    for name in names:
        try:
            reader = open_shard(index_dir, manifest, name, verify_checksum)
        except (ShardCorruptError, OSError) as e:
            problems.append(str(e))
            continue
        readers.append(reader)
    everyone = [
        p for rank_problems in collective.all_gather_object(problems) for p in rank_problems
    ]
    if everyone:
        for reader in readers:
            reader.close()
        raise ShardCorruptError(
            f"{len(everyone)} shard(s) of the index at {index_dir} failed their checks:\n"
            + "\n".join(everyone)
        )
    return readers
