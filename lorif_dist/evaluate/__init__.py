"""Attribution quality: tail-patch and the linear datamodeling score (LDS).

The public API, for scripts comparing methods on one model (every function takes the run's
Config and, optionally, a score matrix [num_queries, num_train] with columns by example id,
and returns plain dicts with point estimates and bootstrap intervals):

    run_tailpatch(cfg, scores=None, top_ids=None, patcher=None)   -> dict   (tailpatch.py)
    TailPatcher(cfg)      the model and queries, reusable across score matrices; caches
                          each training example's measured effect on disk
    run_lds(cfg, scores=None, runtime=None)                        -> dict   (lds.py)
    measure_utilities(cfg) -> (subsets [M, n], utilities [M, Q])   the cached retrainings
    lds_score(scores, subsets, utilities)                          -> dict   (no model)
    spearman_rows, bootstrap_interval, compare_groups               (stats.py)

Intervals are {"mean", "low", "high", "confidence", "num_samples"}.
"""

from lorif_dist.evaluate.lds import lds_score, measure_utilities, run_lds, sample_subsets
from lorif_dist.evaluate.stats import bootstrap_interval, compare_groups, spearman_rows
from lorif_dist.evaluate.tailpatch import TailPatcher, run_tailpatch, select_examples

__all__ = [
    "TailPatcher",
    "bootstrap_interval",
    "compare_groups",
    "lds_score",
    "measure_utilities",
    "run_lds",
    "run_tailpatch",
    "sample_subsets",
    "select_examples",
    "spearman_rows",
]
