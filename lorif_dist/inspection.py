"""`lorif inspect INDEX`: what an index holds, what is missing, and what to run next.

Reads the manifest and the file system only (no model, no data): stages done; every
(array task, rank) shard as finished, in progress (parts on disk), missing, damaged or
finished-but-unrecorded; examples stored and skipped; bytes; the curvature spectrum
(explained variance at rank r per layer); and the next commands. Cheap by default (a stat
and HDF5 metadata per shard); `--verify` also hashes every finished shard against the
SHA-256 in the manifest (one read of the whole index).
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path
from typing import Any

import h5py

from lorif_dist.baselines import index_method
from lorif_dist.curvature import coords_path, curvature_path
from lorif_dist.integrity import (
    CONFIG_FILE,
    extract_command,
    open_shard,
    parse_shard_name,
    regenerate_commands,
)
from lorif_dist.logging_utils import human_bytes
from lorif_dist.manifest import expected_shards, load_manifest
from lorif_dist.query import query_output_dir
from lorif_dist.storage import ShardCorruptError, shard_path


def _parts_progress(parts_dir: Path) -> tuple[int, int, int]:
    """(parts, examples, bytes) already written by an unfinished shard."""
    parts = sorted(parts_dir.glob("part-*.h5"))
    examples = 0
    for part in parts:
        try:
            with h5py.File(part, "r") as h5:
                examples += int(h5["example_id"].shape[0])
        except OSError:
            pass  # a part being renamed right now; counted next time
    return len(parts), examples, sum(p.stat().st_size for p in parts)


def _shard_state(index_dir: Path, manifest: dict[str, Any], name: str, verify: bool) -> dict:
    task, rank = parse_shard_name(name)
    path = shard_path(index_dir, task, rank)
    entry = manifest["shards"].get(name)
    row: dict[str, Any] = {"shard": name, "task": task, "rank": rank}
    if entry is not None:
        try:
            open_shard(index_dir, manifest, name, verify_checksum=verify).close()
        except (ShardCorruptError, OSError) as e:
            return {**row, "state": "damaged", "problem": str(e).split(";")[0]}
        skipped = entry.get("skipped_nonfinite", [])
        return {
            **row,
            "state": "finished",
            "examples": entry["num_examples"],
            "bytes": entry["bytes"],
            "skipped_nonfinite": skipped,
        }
    if path.is_file():
        return {**row, "state": "unrecorded", "bytes": path.stat().st_size}
    parts_dir = path.with_suffix(".parts")
    if parts_dir.is_dir():
        num_parts, examples, nbytes = _parts_progress(parts_dir)
        if num_parts:
            progress = {"parts": num_parts, "examples": examples, "bytes": nbytes}
            return {**row, "state": "in progress", **progress}
    return {**row, "state": "missing"}


def _curvature_summary(index_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    layers = [spec["name"] for spec in manifest["identity"]["layers"]]
    recorded = manifest.get("curvature", {})
    method = index_method(manifest)
    explained, lambdas, nbytes, done = {}, [], 0, 0
    for name in layers:
        if method == "graddot":  # no curvature files: the manifest entry is the whole stage
            done += bool(recorded)
            continue
        path = curvature_path(index_dir, name)
        if not path.is_file():
            continue
        with h5py.File(path, "r") as h5:
            if recorded and h5.attrs.get("config_hash") != recorded.get("config_hash"):
                continue  # left over from another curvature config
            if "explained_variance" in h5.attrs:  # lorif; logra stores the exact inverse
                explained[name] = float(h5.attrs["explained_variance"])
            lambdas.append(float(h5.attrs["lambda"]))
        nbytes += path.stat().st_size
        done += 1
    coords = [coords_path(index_dir, s) for s in expected_shards(manifest)]
    coords_bytes = sum(p.stat().st_size for p in coords if p.is_file())
    values = sorted(explained.values())
    return {
        "method": method,
        "layers_done": done,
        "layers_total": len(layers),
        "rank": recorded.get("config", {}).get("rank"),
        "recorded": bool(recorded),
        "explained_variance": {
            "min": values[0] if values else None,
            "median": statistics.median(values) if values else None,
            "max": values[-1] if values else None,
            "lowest": sorted(explained.items(), key=lambda kv: kv[1])[:3],
        },
        "lambda_range": [min(lambdas), max(lambdas)] if lambdas else None,
        "bytes": nbytes,
        "coords_cached": bool(recorded.get("coordinates_cached")),
        "coords_files": sum(p.is_file() for p in coords),
        "coords_bytes": coords_bytes,
    }


def _query_summary(index_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    out_dir = query_output_dir(manifest.get("config", {}).get("query", {}).get("output"), index_dir)
    queries = out_dir / "queries.jsonl"
    if not (out_dir / "topk.jsonl").is_file() or not queries.is_file():
        return {"done": False, "output": str(out_dir)}
    num = sum(1 for line in queries.read_text().splitlines() if line.strip())
    return {"done": True, "output": str(out_dir), "queries": num}


def _next_steps(index_dir: Path, manifest: dict, shards: list[dict], curv: dict, query: dict):
    steps = []
    tasks_todo = sorted({s["task"] for s in shards if s["state"] != "finished"})
    for s in shards:
        if s["state"] == "damaged":
            steps.extend(regenerate_commands(index_dir, manifest, s["shard"]))
    for task in tasks_todo:
        if not any(s["task"] == task and s["state"] == "damaged" for s in shards):
            steps.append(extract_command(index_dir, manifest, task))
    if steps:
        return steps
    run = manifest.get("extract_run", {})
    config = run.get("config_file") or str(index_dir.resolve() / CONFIG_FILE)
    prefix = f"cd {shlex.quote(run['cwd'])} && " if run.get("cwd") else ""
    if curv["layers_done"] < curv["layers_total"] or not curv["recorded"]:
        return [f"{prefix}lorif curvature --config {shlex.quote(config)}"]
    if not query["done"]:
        return [f"{prefix}lorif query --config {shlex.quote(config)} --query.files QUERIES.jsonl"]
    return []


def inspect_index(index_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """Everything `lorif inspect` prints, as a dict (`--json` prints it as is)."""
    index_dir = Path(index_dir)
    manifest = load_manifest(index_dir)
    identity = manifest["identity"]
    shards = [_shard_state(index_dir, manifest, n, verify) for n in expected_shards(manifest)]
    finished = [s for s in shards if s["state"] == "finished"]
    curv = _curvature_summary(index_dir, manifest)
    query = _query_summary(index_dir, manifest)
    extract_state = "done" if len(finished) == len(shards) else "incomplete"
    if curv["layers_done"] == curv["layers_total"] and curv["recorded"]:
        curv_state = "done"
    else:
        curv_state = f"{curv['layers_done']} of {curv['layers_total']} layers"
    return {
        "index": str(index_dir.resolve()),
        "code_version": manifest.get("code_version"),
        "model": identity["model"],
        "tokenizer": identity.get("tokenizer"),
        "layout": manifest["layout"],
        "layers": {
            "count": len(identity["layers"]),
            "projection_factor": identity["projection"]["factor"],
            "factor_rank": sorted({spec["c"] for spec in identity["layers"] if spec["c"]}),
            "D_total": sum(spec["d1"] * spec["d2"] for spec in identity["layers"]),
        },
        "stages": {"extract": extract_state, "curvature": curv_state, "query": query["done"]},
        "shards": shards,
        "examples": {
            "records": manifest["dataset"]["num_records"],
            "tokenized": manifest["dataset"]["num_examples"],
            "stored": sum(s["examples"] for s in finished),
            "skipped_data": len(manifest["dataset"].get("skipped", {})),
            "truncated": manifest["dataset"].get("num_truncated", 0),
            "skipped_nonfinite": sorted(i for s in finished for i in s["skipped_nonfinite"]),
        },
        "bytes": {
            "shards": sum(s["bytes"] for s in finished),
            "in_progress": sum(s.get("bytes", 0) for s in shards if s["state"] == "in progress"),
            "curvature": curv["bytes"],
            "coords": curv["coords_bytes"],
        },
        "curvature": curv,
        "query": query,
        "verified_checksums": verify,
        "next": _next_steps(index_dir, manifest, shards, curv, query),
    }


def _shard_lines(shards: list[dict[str, Any]], world_size: int) -> list[str]:
    """One line per array task; ranks that are not finished are named."""
    lines = []
    for task in sorted({s["task"] for s in shards}):
        rows = [s for s in shards if s["task"] == task]
        done = [s for s in rows if s["state"] == "finished"]
        examples = sum(s["examples"] for s in done)
        nbytes = sum(s["bytes"] for s in done)
        line = (
            f"  task-{task:04d}: {len(done)}/{world_size} ranks finished, {examples} examples, "
            f"{human_bytes(nbytes)}"
        )
        for s in rows:
            if s["state"] == "in progress":
                line += (
                    f"; rank-{s['rank']:05d} in progress ({s['parts']} parts, "
                    f"{s['examples']} examples)"
                )
            elif s["state"] == "damaged":
                line += f"; rank-{s['rank']:05d} DAMAGED: {s['problem']}"
            elif s["state"] != "finished":
                line += f"; rank-{s['rank']:05d} {s['state']}"
        lines.append(line)
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The human-readable `lorif inspect` output."""
    ex, by, cv, lay = report["examples"], report["bytes"], report["curvature"], report["layers"]
    layout = report["layout"]
    tok = report["tokenizer"] or {}
    stages = report["stages"]
    lines = [
        f"index {report['index']}  (code {report['code_version']})",
        f"model {report['model']['class']} [{report['model']['hash']}], tokenizer "
        f"{tok.get('class', '?')} vocab {tok.get('vocab_size', '?')} [{tok.get('hash', '?')}]",
        f"layers {lay['count']} tracked, f={lay['projection_factor']}, "
        f"c={lay['factor_rank'] or 'none (dense rows)'}, sum of D = {lay['D_total']}",
        f"stages: extract {stages['extract']}, curvature {stages['curvature']}, query "
        f"{'done' if stages['query'] else 'not run'}",
        f"shards ({layout['num_tasks']} array task(s) x {layout['world_size']} rank(s)):",
        *_shard_lines(report["shards"], layout["world_size"]),
        f"examples: {ex['stored']} stored of {ex['tokenized']} tokenized ({ex['records']} "
        f"records; {ex['skipped_data']} skipped as empty or fully truncated, {ex['truncated']} "
        f"truncated); non-finite loss or gradient: {len(ex['skipped_nonfinite'])}"
        + (f" {ex['skipped_nonfinite'][:20]}" if ex["skipped_nonfinite"] else ""),
        f"bytes: shards {human_bytes(by['shards'])}, in progress {human_bytes(by['in_progress'])}, "
        f"curvature {human_bytes(by['curvature'])}, coordinates {human_bytes(by['coords'])}",
    ]
    if cv["method"] != "lorif":
        lines.append(
            f"method {cv['method']}: dense projected gradients, "
            + ("exact damped inverse per layer" if cv["method"] == "logra" else "no curvature")
        )
        if cv["lambda_range"]:
            lo, hi = cv["lambda_range"]
            lines.append(f"  damping lambda {lo:.3g} .. {hi:.3g}")
    elif cv["layers_done"]:
        evar = cv["explained_variance"]
        lowest = ", ".join(f"{name} {value:.3f}" for name, value in evar["lowest"])
        lines.append(
            f"curvature: rank r={cv['rank']}, explained variance at r per layer: min "
            f"{evar['min']:.3f}, median {evar['median']:.3f}, max {evar['max']:.3f}; "
            f"lowest: {lowest}"
        )
        lo, hi = cv["lambda_range"]
        lines.append(
            f"  damping lambda {lo:.3g} .. {hi:.3g}; coordinates cached: "
            f"{cv['coords_files']} of {len(report['shards'])} shards"
        )
    if report["query"]["done"]:
        lines.append(f"query: {report['query']['queries']} queries in {report['query']['output']}")
    if report["verified_checksums"]:
        lines.append("checksums: every finished shard verified against the manifest's SHA-256")
    lines.append("next:" if report["next"] else "next: nothing, the index is complete")
    lines.extend(f"  {step}" for step in report["next"])
    return "\n".join(lines)


def run_inspect(index_dir: str, verify: bool = False, as_json: bool = False) -> str:
    report = inspect_index(index_dir, verify)
    text = json.dumps(report, indent=1, default=str) if as_json else format_report(report)
    print(text)
    return text
