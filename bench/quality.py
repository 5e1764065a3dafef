"""Attribution quality for the bench: LDS and tail-patch, from `lorif_dist.evaluate`.

The bench does not implement evaluation; it calls the product's:

    lorif_dist.evaluate.lds.run_lds(cfg, scores, write=False)
        -> {"mean", "low", "high", ...}: Spearman between predicted and retrained utility,
           with a bootstrap interval; retrainings are cached in evaluate.lds_dir
    lorif_dist.evaluate.tailpatch.run_tailpatch(cfg, scores, patcher=..., write=False)
        -> {"top", "random", "bottom", "top_minus_random", ...} each {"mean", "low", "high"}

One TailPatcher is shared by every method of a recipe: it measures each training example
once for all queries, so methods that agree on proponents share the measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorif_dist.config import Config
from lorif_dist.evaluate.lds import run_lds
from lorif_dist.evaluate.tailpatch import TailPatcher, run_tailpatch


def _interval(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(result[k]) for k in ("mean", "low", "high")}


def lds(cfg: Config, scores: np.ndarray) -> dict[str, float]:
    """LDS of a [num_queries, num_train] score matrix."""
    result = run_lds(cfg, scores, write=False)
    if not result.get("complete", True):
        raise RuntimeError(
            f"LDS retrainings are not finished in {result['settings']['lds_dir']}; run "
            "`lorif evaluate lds` for this recipe first (bash launch/lds-tiny.sh)"
        )
    return _interval(result)


class TailPatch:
    """Tail-patch of score matrices of one recipe, sharing one TailPatcher (and its cache)."""

    def __init__(self) -> None:
        self.patcher = None

    def __call__(self, cfg: Config, scores: np.ndarray) -> dict[str, Any]:
        if self.patcher is None:
            self.patcher = TailPatcher(cfg)
        result = run_tailpatch(cfg, scores, patcher=self.patcher, write=False)
        out = {name: _interval(result[name]) for name in result if name in GROUPS}
        out["num_queries"] = result["settings"]["num_queries"]
        out["k"] = result["settings"]["k"]
        return out


GROUPS = ("top", "random", "bottom", "top_minus_random", "top_minus_bottom")
