"""Tables and target ratios from the bench's JSON results, as Markdown.

    python -m bench.report        # rewrites bench/results/*.md from bench/results/*.json

Side-by-side ratios, each from one run of bench.compare (see `targets`): LoRIF against
LoGRA at matched quality (storage and query time) and at matched storage (quality), and the
best LoRIF against the gradient dot product floor. Extraction overhead is bench.overhead's.

All ratios use the normalization chosen as default (the one with the best LoRIF quality).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT
from lorif_dist.config import METHODS, NORMALIZATIONS


def _fmt_interval(q: dict[str, float] | None, digits: int = 3) -> str:
    if not q:
        return "n/a"
    return f"{q['mean']:.{digits}f} [{q['low']:.{digits}f}, {q['high']:.{digits}f}]"


def quality_of(record: dict[str, Any], norm: str) -> dict[str, float] | None:
    """The headline quality interval of one run and normalization (LDS, or top - random)."""
    q = record["query"][norm].get("quality")
    if not q:
        return None
    return q.get("top_minus_random", q) if "mean" not in q else q


def choose_default(results: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The normalization with the best mean quality over the LoRIF runs (and the means).

    "none" stays unless another beats it by more than the runs' mean standard error (half
    an interval's width over 1.96): a normalization costs a second pass over the shards,
    and a difference inside the noise is no reason to pay it.
    """
    means, errors = {}, []
    for norm in NORMALIZATIONS:
        rated = [
            quality_of(r, norm)
            for r in results["runs"].values()
            if r["spec"]["method"] == "lorif" and quality_of(r, norm)
        ]
        if rated:
            means[norm] = sum(q["mean"] for q in rated) / len(rated)
            errors += [(q["high"] - q["low"]) / (2 * 1.96) for q in rated]
    if not means:
        return "none", {}
    best = max(means, key=means.get)
    if "none" in means and means[best] - means["none"] <= sum(errors) / len(errors):
        best = "none"
    return best, means


def cost_table(results: dict[str, Any], norm: str) -> str:
    metric = "LDS" if results["recipe"] != "demo" else "tail-patch top-random (nats)"
    head = (
        "| run | D (all layers) | bytes/example | index MiB | extract ex/s | curvature s | "
        "curvature peak MiB | query path | query s | scoring s | largest hub n/u/c | "
        f"{metric} ({norm}) |"
    )
    # CPU seconds (one thread per stage) where recorded, the stage's wall seconds otherwise.
    sec = _seconds
    lines = [head, "|" + "---|" * 12]
    for name, r in results["runs"].items():
        ex, cv, st, qy = r["extract"], r["curvature"], r["storage"], r["query"]
        hubs = "/".join(str(qy[n]["largest_hub"][0]) for n in NORMALIZATIONS if n in qy)
        lines.append(
            f"| {name} | {r['dims']['total_D']} | {st['bytes_per_example']:.0f} | "
            f"{st['index_bytes'] / 2**20:.1f} | {ex['num_examples'] / sec(ex):.2f} | "
            f"{sec(cv):.1f} | {cv['rss_peak_mb'] - cv['rss_start_mb']:.0f} | "
            f"{qy[norm].get('path', '')} | {sec(qy[norm]):.1f} | "
            f"{qy[norm]['score_seconds']:.2f} | {hubs} | "
            f"{_fmt_interval(quality_of(r, norm))} |"
        )
    return "\n".join(lines)


def normalization_table(results: dict[str, Any]) -> str:
    head = "| run | " + " | ".join(NORMALIZATIONS) + " |"
    lines = [head, "|---|" + "---|" * len(NORMALIZATIONS)]
    for name, r in results["runs"].items():
        cells = [_fmt_interval(quality_of(r, n)) for n in NORMALIZATIONS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STORAGE_SLACK = 1.15  # "matched storage": LoRIF may store up to 15% more than the LoGRA run


def _q(record: dict[str, Any], norm: str) -> float:
    return quality_of(record, norm)["mean"]


def targets(results: dict[str, Any], norm: str) -> dict[str, Any]:
    """The side-by-side ratios of one run's results, per LoGRA run.

    matched quality: the cheapest LoRIF run whose mean quality reaches the LoGRA run's
        lower confidence bound; its storage, index and query-time ratios.
    matched storage: the best LoRIF run storing at most STORAGE_SLACK times the LoGRA
        run's bytes per example; both qualities.
    floor: the best LoRIF run against the best gradient dot product.
    """
    runs = results["runs"]
    rated = {
        m: [r for r in runs.values() if r["spec"]["method"] == m and quality_of(r, norm)]
        for m in METHODS
    }
    out: dict[str, Any] = {"normalization": norm, "matched_quality": [], "matched_storage": []}
    for logra in sorted(rated["logra"], key=lambda r: -_q(r, norm)):
        low = quality_of(logra, norm)["low"]
        reach = [r for r in rated["lorif"] if _q(r, norm) >= low]
        if reach:
            lorif = min(reach, key=lambda r: r["storage"]["bytes_per_example"])
            a, b = lorif, logra
            out["matched_quality"].append(
                {
                    "logra": b["name"],
                    "lorif": a["name"],
                    "logra_quality": quality_of(b, norm),
                    "lorif_quality": quality_of(a, norm),
                    "storage_ratio": b["storage"]["bytes_per_example"]
                    / a["storage"]["bytes_per_example"],
                    "index_ratio": b["storage"]["index_bytes"] / a["storage"]["index_bytes"],
                    "scoring_time_ratio": b["query"][norm]["score_seconds"]
                    / a["query"][norm]["score_seconds"],
                    "query_time_ratio": _seconds(b["query"][norm]) / _seconds(a["query"][norm]),
                }
            )
        budget = STORAGE_SLACK * logra["storage"]["bytes_per_example"]
        within = [r for r in rated["lorif"] if r["storage"]["bytes_per_example"] <= budget]
        if within:
            lorif = max(within, key=lambda r: _q(r, norm))
            out["matched_storage"].append(
                {
                    "logra": logra["name"],
                    "lorif": lorif["name"],
                    "bytes": [
                        lorif["storage"]["bytes_per_example"],
                        logra["storage"]["bytes_per_example"],
                    ],
                    "lorif_quality": quality_of(lorif, norm),
                    "logra_quality": quality_of(logra, norm),
                }
            )
    if rated["graddot"] and rated["lorif"]:
        best_lorif = max(rated["lorif"], key=lambda r: _q(r, norm))
        best_dot = max(rated["graddot"], key=lambda r: _q(r, norm))
        out["floor"] = {
            "lorif": best_lorif["name"],
            "graddot": best_dot["name"],
            "lorif_quality": quality_of(best_lorif, norm),
            "graddot_quality": quality_of(best_dot, norm),
        }
    return out


def targets_text(t: dict[str, Any]) -> str:
    """The targets as Markdown tables."""
    iv = _fmt_interval
    lines = [
        "Matched quality (the cheapest LoRIF run reaching the LoGRA run's lower bound):",
        "",
        "| LoGRA | quality | LoRIF | quality | storage ratio | index ratio | scoring ratio "
        "| query ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in t["matched_quality"]:
        lines.append(
            f"| {m['logra']} | {iv(m['logra_quality'])} | {m['lorif']} | "
            f"{iv(m['lorif_quality'])} | {m['storage_ratio']:.1f}x | {m['index_ratio']:.1f}x | "
            f"{m['scoring_time_ratio']:.1f}x | {m['query_time_ratio']:.1f}x |"
        )
    lines += [
        "",
        f"Matched storage (the best LoRIF run storing at most {STORAGE_SLACK:g}x the LoGRA "
        "run's bytes per example):",
        "",
        "| LoGRA | bytes | quality | LoRIF | bytes | quality |",
        "|---|---|---|---|---|---|",
    ]
    for m in t["matched_storage"]:
        lines.append(
            f"| {m['logra']} | {m['bytes'][1]:.0f} | {iv(m['logra_quality'])} | {m['lorif']} | "
            f"{m['bytes'][0]:.0f} | {iv(m['lorif_quality'])} |"
        )
    if "floor" in t:
        f = t["floor"]
        lines += [
            "",
            f"Floor: best LoRIF {f['lorif']} {iv(f['lorif_quality'])} against the gradient dot "
            f"product {f['graddot']} {iv(f['graddot_quality'])}.",
        ]
    return "\n".join(lines)


def _seconds(record: dict[str, Any]) -> float:
    """CPU seconds of a stage where recorded (one thread), its wall seconds otherwise."""
    return record.get("cpu_seconds", record["seconds"])


def _relative(path: str) -> str:
    """A path under the repository as written from its root (results name no home folder)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def write_report(results: dict[str, Any]) -> str:
    norm, means = choose_default(results)
    parts = [
        f"## {results['recipe']} ({_relative(results['config'])}, {results['threads']} "
        "thread(s) per stage)",
        "",
        cost_table(results, norm),
        "",
        "Quality by normalization (mean [95% interval]):",
        "",
        normalization_table(results),
        "",
        f"Default normalization by mean LoRIF quality: **{norm}** {json.dumps(means)}",
        "",
        targets_text(targets(results, norm)),
    ]
    text = "\n".join(parts) + "\n"
    (RESULTS / f"compare-{results['recipe']}.md").write_text(text)
    return text


def main() -> int:
    for path in sorted(RESULTS.glob("compare-*.json")):
        print(write_report(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
