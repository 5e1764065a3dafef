"""Plots of the bench results (PNG under bench/results/, small enough to commit).

    python -m bench.plots

    storage-vs-lds.png      bytes per example against LDS (lds-tiny), LoRIF and LoGRA runs
    spectrum-<recipe>.png   per-layer explained variance of G^T G against curvature rank r,
                            from the exact projected gradients of a dense-storage run
    query-time-vs-n.png     query seconds against N (bench.query_scaling)

The spectrum is exact: G (N x D) is read densely from the shards and its singular values
give every eigenvalue of G^T G; the curves are cumulative sums over the trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, WORK, write_json  # noqa: E402
from bench.report import choose_default, quality_of  # noqa: E402
from lorif_dist.storage import ShardReader  # noqa: E402

COLORS = {"lorif": "tab:blue", "logra": "tab:red", "graddot": "tab:gray"}


def storage_vs_quality(results: dict, out: Path) -> Path | None:
    norm, _ = choose_default(results)
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    plotted = False
    for name, run in results["runs"].items():
        q = quality_of(run, norm)
        if not q:
            continue
        method = run["spec"]["method"]
        x = run["storage"]["bytes_per_example"]
        err = [[q["mean"] - q["low"]], [q["high"] - q["mean"]]]
        ax.errorbar(x, q["mean"], yerr=err, fmt="o", color=COLORS[method], capsize=3)
        ax.annotate(
            name.split("-", 1)[1],
            (x, q["mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    for method, color in COLORS.items():
        ax.plot([], [], "o", color=color, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per training example (all layers)")
    ax.set_ylabel(f"LDS ({norm}), 95% interval")
    ax.set_title(f"Storage vs LDS, {results['recipe']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def layer_spectra(index_dir: Path) -> dict[str, list[float]]:
    """Per layer, cumulative explained variance of G^T G for r = 1..rank(G)."""
    shards = sorted((index_dir / "shards").rglob("*.h5"))
    out = {}
    readers = [ShardReader(p) for p in shards]
    try:
        for layer in readers[0].h5["layers"]:
            rows = torch.cat(
                [r.read_dense(layer, 0, r.num_examples, torch.float64) for r in readers]
            )
            sq = torch.linalg.svdvals(rows) ** 2
            out[layer] = (torch.cumsum(sq, 0) / sq.sum()).tolist()
    finally:
        for r in readers:
            r.close()
    return out


def rank_energy(index_dir: Path, ranks=(1, 2, 4)) -> dict[str, float]:
    """Mean share of ||G~||_F^2 that the best rank-c factors keep, over examples and layers.

    What LoRIF's rank-c storage throws away, measured on the exact projected gradients of
    a dense-storage index (each row reshaped to its d1 x d2 matrix).
    """
    from lorif_dist.manifest import load_manifest

    dims = {s["name"]: (s["d1"], s["d2"]) for s in load_manifest(index_dir)["identity"]["layers"]}
    kept = {c: [] for c in ranks}
    for path in sorted((index_dir / "shards").rglob("*.h5")):
        with ShardReader(path) as reader:
            for layer, (d1, d2) in dims.items():
                rows = reader.read_dense(layer, 0, reader.num_examples, torch.float64)
                sq = torch.linalg.svdvals(rows.reshape(-1, d1, d2)) ** 2  # [n, min(d1, d2)]
                total = sq.sum(dim=1).clamp(min=1e-300)
                for c in ranks:
                    kept[c].append((sq[:, :c].sum(dim=1) / total).mean().item())
    return {f"c={c}": float(np.mean(v)) for c, v in kept.items()}


def spectrum_plot(spectra: dict[str, list[float]], title: str, rank: int, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in spectra})
    cmap = plt.get_cmap("tab10")
    for name, curve in spectra.items():
        kind = name.rsplit(".", 1)[-1]
        ax.plot(
            np.arange(1, len(curve) + 1), curve, color=cmap(kinds.index(kind)), lw=0.8, alpha=0.7
        )
    for i, kind in enumerate(kinds):
        ax.plot([], [], color=cmap(i), label=kind)
    ax.axvline(rank, color="k", ls="--", lw=0.8)
    ax.text(rank, 0.05, f" r={rank}", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("curvature rank r")
    ax.set_ylabel("explained variance of G^T G")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def query_time_plot(scaling: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    for name, series in scaling["seconds"].items():
        sizes = sorted(int(n) for n in series)
        ax.plot(
            sizes,
            [series[str(n)] if str(n) in series else series[n] for n in sizes],
            "o-",
            color=COLORS[name.split("-")[0]],
            ls="--" if "factored" in name else "-",
            label=name,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training examples N")
    ax.set_ylabel(f"seconds for {scaling['queries']} queries")
    ax.set_title("Query time vs N (one SmolLM2-135M block)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


SPECTRUM_RUNS = {"lds-tiny": ("logra-f4", 64), "demo": ("graddot-f8", 64)}


def main() -> int:
    made = []
    path = RESULTS / "compare-lds-tiny.json"
    if path.is_file():
        made.append(
            storage_vs_quality(json.loads(path.read_text()), RESULTS / "storage-vs-lds.png")
        )
    for recipe, (run, rank) in SPECTRUM_RUNS.items():
        index = WORK / recipe / run / "index"
        if (index / "shards").is_dir():
            spectra = layer_spectra(index)
            write_json(RESULTS / f"spectrum-{recipe}.json", spectra)
            write_json(RESULTS / f"rank-energy-{recipe}.json", rank_energy(index))
            title = f"Per-layer spectrum, {recipe} ({run}: exact projected gradients)"
            made.append(spectrum_plot(spectra, title, rank, RESULTS / f"spectrum-{recipe}.png"))
    path = RESULTS / "query-scaling.json"
    if path.is_file():
        made.append(query_time_plot(json.loads(path.read_text()), RESULTS / "query-time-vs-n.png"))
    for p in made:
        if p is not None:
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
