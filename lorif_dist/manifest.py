"""The index manifest: what an index was built from, and which shards are finished.

`manifest.json` at the index root holds:

    format_version, code_version
    identity      config sections model/data/extract (minus fields that do not change
                  stored values), model and dataset fingerprints, projection seed and hash,
                  tracked layers with (I, O, d1, d2), loss reduction
    layout        num_tasks and world_size of the extraction (they fix the work split)
    dataset       examples, records, truncated and skipped counts
    shards        "task-TTTT/rank-RRRRR" -> num_examples, bytes, sha256, skipped ids

The first process to arrive writes it (atomically, under a lock); every later process, on
any task or rank, compares its identity and refuses a mismatch, showing both sides. Shard
entries are added under an exclusive file lock with a read-modify-rename, so array tasks
finishing at the same time never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorif_dist.safe_io import write_text_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Fields that change how fast or where a run goes, not what it stores.
NON_IDENTITY_FIELDS = {
    "model": {"device", "gradient_checkpointing"},
    "extract": {"batch_tokens", "max_batch_size", "flush_examples", "padding_side"},
}


class IndexMismatchError(ValueError):
    """An index exists but was built from a different model, data, projection or config."""


def identity_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section in ("model", "data", "extract"):
        values = dict(config_dict[section])
        for name in NON_IDENTITY_FIELDS.get(section, ()):
            values.pop(name, None)
        out[section] = values
    return out


def manifest_path(index_dir: str | Path) -> Path:
    return Path(index_dir) / MANIFEST


def load_manifest(index_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(index_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no index at {index_dir}: {path} is missing; run `lorif extract` with "
            "run.index_dir set to this directory first"
        )
    return json.loads(path.read_text())


@contextlib.contextmanager
def locked(index_dir: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on the index (flock; works across processes and nodes
    on file systems that support it, which Lustre and NFSv4 do when mounted with locking)."""
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(index_dir) / ".manifest.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, obj: Any) -> None:
    # A full disk leaves the old manifest in place, untouched, and no stray temp file.
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False, default=str), "manifest")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [{"c": 1}]}} -> {"a.b[0].c": 1}, so a difference names its leaf."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {prefix.rstrip(".") + ".length": len(obj)}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix.rstrip('.')}[{i}]."))
        return out
    return {prefix.rstrip("."): obj}


def describe_mismatch(
    index_side: dict[str, Any], run_side: dict[str, Any], per_section: int = 4
) -> list[str]:
    """One line per differing leaf; list entries at most `per_section` per top-level section
    (a model swap changes hundreds of layer entries; the other sections must still show)."""
    a, b = _flatten(index_side), _flatten(run_side)
    sections: dict[str, list[str]] = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(va, list) and len(str(va)) > 120:
                va = f"<{len(va)} entries>"
            if isinstance(vb, list) and len(str(vb)) > 120:
                vb = f"<{len(vb)} entries>"
            section = key.split(".")[0].split("[")[0] if "[" in key else key
            sections.setdefault(section, []).append(f"{key}: index has {va!r}, this run has {vb!r}")
    lines = []
    for section, found in sections.items():
        lines.extend(found[:per_section])
        if len(found) > per_section:
            lines.append(f"... and {len(found) - per_section} more differences in {section}")
    return lines


def check_identity(
    index_dir: str | Path, found: dict[str, Any], expected: dict[str, Any], what: str
) -> None:
    diff = describe_mismatch(found, expected)
    if diff:
        raise IndexMismatchError(
            f"the index at {index_dir} was built with a different {what}:\n  "
            + "\n  ".join(diff)
            + "\nUse the index's settings, or a new run.index_dir for the new settings."
        )


def open_or_create(
    index_dir: str | Path,
    identity: dict[str, Any],
    layout: dict[str, int],
    dataset: dict[str, Any],
    code_version: str,
) -> dict[str, Any]:
    """Creates the manifest, or checks that an existing one matches this run."""
    path = manifest_path(index_dir)
    with locked(index_dir):
        if path.is_file():
            manifest = json.loads(path.read_text())
            check_identity(index_dir, manifest["identity"], identity, "model, data or config")
            check_identity(index_dir, manifest["layout"], layout, "task/rank layout")
            return manifest
        manifest = {
            "format_version": FORMAT_VERSION,
            "code_version": code_version,
            "created_unix": time.time(),
            "identity": identity,
            "layout": layout,
            "dataset": dataset,
            "shards": {},
        }
        _write_atomic(path, manifest)
        return manifest


def record_shard(index_dir: str | Path, name: str, entry: dict[str, Any]) -> None:
    with locked(index_dir):
        manifest = json.loads(manifest_path(index_dir).read_text())
        manifest["shards"][name] = entry
        _write_atomic(manifest_path(index_dir), manifest)


def update_section(index_dir: str | Path, key: str, value: Any) -> None:
    """Sets one top-level entry (e.g. "curvature") of the manifest under the lock."""
    with locked(index_dir):
        manifest = json.loads(manifest_path(index_dir).read_text())
        manifest[key] = value
        _write_atomic(manifest_path(index_dir), manifest)


def expected_shards(manifest: dict[str, Any]) -> list[str]:
    from lorif_dist.storage import shard_name

    layout = manifest["layout"]
    return [
        shard_name(task, rank)
        for task in range(layout["num_tasks"])
        for rank in range(layout["world_size"])
    ]


def require_complete(index_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The finished shards' names; refuses an index with shards missing, listing them."""
    expected = expected_shards(manifest)
    missing = [name for name in expected if name not in manifest["shards"]]
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"the index at {index_dir} is incomplete: {len(missing)} of {len(expected)} shards "
            f"are not finished ({shown}). Rerun `lorif extract` for those array tasks "
            "(run.task_id) with the same number of ranks."
        )
    return expected
