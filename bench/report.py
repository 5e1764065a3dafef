"""Tables and target ratios from the bench's JSON results, as Markdown.

    python -m bench.report        # rewrites bench/results/*.md from bench/results/*.json

Targets (issue 4), each from one side-by-side run:

    matched LDS      the best LoGRA run against the cheapest LoRIF run whose LDS reaches
                     that run's lower confidence bound: storage and query-time ratios
    matched storage  LoRIF against the LoGRA run of about the same bytes per example: LDS
    floor            the best LoRIF LDS against the best gradient-dot-product LDS
    tail-patch       top-k minus random-k of LoRIF on the demo model, with its interval
    extraction       extraction over forward + activation-only backward (bench.overhead)

All ratios use the normalization chosen as default (the one with the best LoRIF quality).
"""

from __future__ import annotations

import json
from typing import Any

from bench.common import RESULTS

NORMALIZATIONS = ("none", "unit", "cosine")


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
        f"curvature peak MiB | query s | scoring s | largest hub n/u/c | {metric} ({norm}) |"
    )
    # CPU seconds (one thread per stage) where recorded, the stage's wall seconds otherwise.
    sec = _seconds
    lines = [head, "|" + "---|" * 11]
    for name, r in results["runs"].items():
        ex, cv, st, qy = r["extract"], r["curvature"], r["storage"], r["query"]
        hubs = "/".join(str(qy[n]["largest_hub"][0]) for n in NORMALIZATIONS if n in qy)
        lines.append(
            f"| {name} | {r['dims']['total_D']} | {st['bytes_per_example']:.0f} | "
            f"{st['index_bytes'] / 2**20:.1f} | {ex['num_examples'] / sec(ex):.2f} | "
            f"{sec(cv):.1f} | {cv['rss_peak_mb'] - cv['rss_start_mb']:.0f} | "
            f"{sec(qy[norm]):.1f} | {qy[norm]['score_seconds']:.2f} | {hubs} | "
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


def targets(results: dict[str, Any], norm: str) -> dict[str, Any]:
    """The issue's target ratios from one run's results (None where quality is missing)."""
    runs = results["runs"]
    by_method = {m: [r for r in runs.values() if r["spec"]["method"] == m] for m in METHODS}
    rated = {m: [r for r in rs if quality_of(r, norm)] for m, rs in by_method.items()}
    out: dict[str, Any] = {"normalization": norm}
    if rated["logra"] and rated["lorif"]:
        best = max(rated["logra"], key=lambda r: quality_of(r, norm)["mean"])
        low = quality_of(best, norm)["low"]
        matching = [r for r in rated["lorif"] if quality_of(r, norm)["mean"] >= low]
        if matching:
            lorif = min(matching, key=lambda r: r["storage"]["bytes_per_example"])
            out["matched_quality"] = {
                "logra": best["name"],
                "lorif": lorif["name"],
                "logra_quality": quality_of(best, norm),
                "lorif_quality": quality_of(lorif, norm),
                "storage_ratio": best["storage"]["bytes_per_example"]
                / lorif["storage"]["bytes_per_example"],
                "index_ratio": best["storage"]["index_bytes"] / lorif["storage"]["index_bytes"],
                "scoring_time_ratio": best["query"][norm]["score_seconds"]
                / lorif["query"][norm]["score_seconds"],
                "query_time_ratio": _seconds(best["query"][norm]) / _seconds(lorif["query"][norm]),
            }
        else:
            out["matched_quality"] = {"logra": best["name"], "lorif": None}
    pairs = []
    for lorif_name, logra_name in results.get("matched_storage", []):
        a, b = runs.get(lorif_name), runs.get(logra_name)
        if a and b:
            pairs.append(
                {
                    "lorif": lorif_name,
                    "logra": logra_name,
                    "bytes": [a["storage"]["bytes_per_example"], b["storage"]["bytes_per_example"]],
                    "lorif_quality": quality_of(a, norm),
                    "logra_quality": quality_of(b, norm),
                }
            )
    out["matched_storage"] = pairs
    if rated["graddot"] and rated["lorif"]:
        best_lorif = max(rated["lorif"], key=lambda r: quality_of(r, norm)["mean"])
        best_dot = max(rated["graddot"], key=lambda r: quality_of(r, norm)["mean"])
        out["floor"] = {
            "lorif": best_lorif["name"],
            "graddot": best_dot["name"],
            "lorif_quality": quality_of(best_lorif, norm),
            "graddot_quality": quality_of(best_dot, norm),
        }
    return out


METHODS = ("lorif", "logra", "graddot")


def _seconds(record: dict[str, Any]) -> float:
    """CPU seconds of a stage where recorded (one thread), its wall seconds otherwise."""
    return record.get("cpu_seconds", record["seconds"])


def write_report(results: dict[str, Any]) -> str:
    norm, means = choose_default(results)
    parts = [
        f"## {results['recipe']} ({results['config']}, {results['threads']} thread(s) per stage)",
        "",
        cost_table(results, norm),
        "",
        "Quality by normalization (mean [95% interval]):",
        "",
        normalization_table(results),
        "",
        f"Default normalization by mean LoRIF quality: **{norm}** {json.dumps(means)}",
        "",
        "Targets: ```" + json.dumps(targets(results, norm), indent=1) + "```",
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
