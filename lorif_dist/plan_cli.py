"""`lorif plan` on the command line: arguments, and the plan printed as a table.

    lorif plan --model configs/models/llama-3-70b/config.json --config configs/R.yaml \
               --num-examples 1000000 --mean-tokens 900 --world-size 8 --num-tasks 16 \
               --tokens-per-second 2000 [--section.field VALUE ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from lorif_dist.config import load_config
from lorif_dist.logging_utils import human_bytes


def _grouped(rows: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """Layers with the same shapes and a name differing only in block numbers, as one row."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (re.sub(r"\.\d+\.", ".*.", row["name"]), row["I"], row["O"], row["c"])
        groups.setdefault(key, []).append(row)
    return [(key[0], len(members), members[0]) for key, members in groups.items()]


def _count(num: int) -> str:
    return f"{num / 1e9:.2f}B" if num >= 1e8 else f"{num:,}"


def format_plan(plan: dict[str, Any]) -> str:
    m, st, s, d = plan["model"], plan["storage"], plan["settings"], plan["data"]
    cv, q, t = plan["curvature"], plan["query"], plan["time"]
    hb = human_bytes
    per_rank = (
        f"{hb(m['weights_bytes_per_rank'])} per rank ({m['parallel']})"
        if m["parallel"] != "none"
        else "every rank holds all of it"
    )
    lines = [
        f"model {m['class']} from {m['config']}: {_count(m['num_parameters'])} parameters, "
        f"{hb(m['weights_bytes'])} in {m['dtype']}, {per_rank}",
        f"layers: {len(plan['layers'])} tracked of {s['num_linear_layers']} linear "
        f"(extract.layers {s['layers_pattern']!r}); f={s['f']}, c={s['c']}, stored "
        f"{s['storage_dtype']}",
        f"  {'layer (x count)':<44} {'I':>6} {'O':>6} {'d1':>5} {'d2':>5} {'D':>8} "
        f"{'B/example':>9} {'V (r cols)':>10} {'SVD peak':>10}",
    ]
    for name, count, row in _grouped(plan["layers"]):
        label = f"{name} x{count}" if count > 1 else name
        lines.append(
            f"  {label:<44} {row['I']:>6} {row['O']:>6} {row['d1']:>5} {row['d2']:>5} "
            f"{row['D']:>8} {row['bytes_per_example']:>9} {hb(row['curvature_V_bytes']):>10} "
            f"{hb(row['curvature_peak_bytes']):>10}"
        )
    lines += [
        f"data: N={d['num_examples']} examples x {d['mean_tokens']:g} tokens = "
        f"{d['tokens']:.3g} tokens; {d['num_tasks']} array task(s) x {d['world_size']} rank(s)",
        f"storage: {hb(st['bytes_per_example'])} per example ({st['bytes_per_example']} B; dense "
        f"projected gradients would take {hb(st['dense_bytes_per_example'])} in float32)",
        f"  per rank: shard of up to {st['shard_examples_max']} examples = "
        f"{hb(st['shard_bytes_max'])} ({st['shard_bytes_max']} B), up to "
        f"{hb(st['join_peak_bytes_per_rank'])} on disk while its parts are joined",
        f"  index: shards {hb(st['index_bytes'])} ({st['index_bytes']} B), curvature "
        f"{hb(st['curvature_bytes'])} ({st['curvature_bytes']} B), coordinates "
        f"{hb(st['coords_bytes'])} ({st['coords_bytes']} B)",
        f"curvature (r={s['r']}, p={s['p']}, {s['compute_dtype']}): peak memory per layer up "
        f"to {hb(cv['peak_bytes_per_layer_max'])} (estimate, {cv['largest_layer']}); reads "
        f"{hb(cv['read_bytes'])} in all (passes + coordinates + checksum)",
        f"query (batch of {q['num_queries']} queries, {q['path']} path): reads "
        f"{hb(q['read_bytes'])} per batch ({hb(q['read_bytes_per_rank'])} per rank), holds "
        f"{hb(q['preconditioned_bytes_per_rank'])} of preconditioned queries per rank; full "
        f"score matrix {hb(q['score_matrix_bytes'])}",
    ]
    if t["tokens_per_second_per_rank"]:
        lines.append(
            f"time: at {t['tokens_per_second_per_rank']:.4g} tokens/s per rank "
            f"({t['source']}): extraction {t['extract_rank_hours']:.3g} rank-hours, "
            f"{t['extract_wall_hours']:.3g} h wall-clock on {t['ranks']} ranks (all tasks at once)"
        )
    else:
        lines.append(
            "time: pass --tokens-per-second (per rank) or --from-index PILOT_INDEX for an estimate"
        )
    return "\n".join(lines)


def add_plan_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="storage, memory and time of a run, from a model config.json alone",
        description="Predicts a run's shapes, bytes, memory and time before it is submitted. "
        "Settings (f, c, r, dtypes, layers) come from --config and --section.field overrides.",
    )
    p.add_argument("--config", "-c", help="YAML recipe for f, c, r, dtypes and layers")
    p.add_argument(
        "--model",
        help="config.json (or checkpoint directory); default: the recipe's model.name_or_path",
    )
    p.add_argument("--num-examples", type=int, required=True, help="N, training examples")
    p.add_argument(
        "--mean-tokens",
        type=float,
        help="mean tokens per example (default: 512, or the recipe's data.max_length if lower)",
    )
    p.add_argument("--world-size", type=int, default=1, help="ranks per array task")
    p.add_argument("--num-tasks", type=int, default=1, help="SLURM array tasks")
    p.add_argument("--num-queries", type=int, default=64, help="queries per query batch")
    p.add_argument("--tokens-per-second", type=float, help="extraction throughput per rank")
    p.add_argument("--from-index", help="take the throughput measured by a pilot index")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan_command(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    # Here, not at the top: the CLI builds this parser for every command, and the plan
    # needs torch and transformers.
    from lorif_dist.plan import PlanInputs, make_plan, measured_throughput

    cfg = load_config(args.config, overrides)
    model = args.model or cfg.model.name_or_path
    if not model:
        raise ValueError("lorif plan: pass --model configs/models/<name>/config.json")
    for flag, value in (
        ("--num-examples", args.num_examples),
        ("--world-size", args.world_size),
        ("--num-tasks", args.num_tasks),
        ("--num-queries", args.num_queries),
    ):
        if value < 1:
            raise ValueError(f"lorif plan {flag}: expected an integer >= 1, got {value}")
    tps, source = args.tokens_per_second, "given"
    if args.from_index:
        tps, source = measured_throughput(args.from_index), f"measured by {args.from_index}"
    inputs = PlanInputs(
        cfg=cfg,
        model_config=model,
        num_examples=args.num_examples,
        mean_tokens=args.mean_tokens or float(min(512, cfg.data.max_length)),
        world_size=args.world_size,
        num_tasks=args.num_tasks,
        tokens_per_second=tps,
        throughput_source=source,
        num_queries=args.num_queries,
    )
    plan = make_plan(inputs)
    print(json.dumps(plan, indent=1, default=str) if args.json else format_plan(plan))
    return plan
