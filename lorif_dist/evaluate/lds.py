"""LDS, the linear datamodeling score: do summed scores predict retraining outcomes?

    subsets   S_1..S_M, each a random fraction alpha of the training examples
    measured  U_j(q) = - mean over seeds s of loss_q(model retrained on S_j with seed s)
    predicted P_j(q) = sum over t in S_j of score(q, t)
    LDS(q)    = Spearman over j of (P_j(q), U_j(q));  LDS = mean over queries, with a
              bootstrap interval over queries

A positive score means t lowers q's loss, so a good method ranks the subsets' utilities
as retraining does. Retraining follows the `train` recipe from `train.init` (a pre-SFT
base model, or a fixed random init); seed s of every subset uses train.seed + s, so
subsets differ only in their data.

On disk (evaluate.lds_dir, default <index>/lds), shared by every method scored on the
same model, data and queries:

    recipe.json                         what the retrainings depend on; a rerun with another
                                        recipe, init or data is refused, showing both
    subsets.json                        the subsets (subset j depends on (seed, j) only, so
                                        raising M keeps the first M)
    runs/subset-JJJJ/seed-SS/model/     the retrained checkpoint (evaluate.lds_save_checkpoints)
    runs/subset-JJJJ/seed-SS/losses-<queries>.json   query losses; marks the run done

A killed run resumes: finished runs are skipped, a checkpoint without losses is only
evaluated, anything else is retrained (training is deterministic, so this reproduces it).
Runs are dealt round-robin over array tasks and ranks; whoever finds every run done
computes the LDS.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lorif_dist.config import Config
from lorif_dist.data import Example, fingerprint
from lorif_dist.distributed import Runtime
from lorif_dist.evaluate.common import (
    evaluate_dir,
    load_query_examples,
    load_scores,
    write_json,
)
from lorif_dist.evaluate.stats import bootstrap_interval, spearman_rows
from lorif_dist.evaluate.training import example_losses, train_model
from lorif_dist.logging_utils import Timer, logger, summary
from lorif_dist.modeling import load_model, load_tokenizer, model_fingerprint, resolve_device


def lds_dir(cfg: Config) -> Path:
    return Path(cfg.evaluate.lds_dir or Path(cfg.run.index_dir) / "lds")


def sample_subsets(
    train_ids: np.ndarray, fraction: float, num_subsets: int, seed: int
) -> np.ndarray:
    """Subsets [M, round(alpha N)] of train ids, each sorted; subset j depends on (seed, j)."""
    train_ids = np.asarray(train_ids, dtype=np.int64)
    size = int(round(fraction * len(train_ids)))
    if not 1 <= size < len(train_ids):
        raise ValueError(
            f"evaluate.lds_fraction={fraction} of {len(train_ids)} examples gives subsets of "
            f"{size}; expected between 1 and {len(train_ids) - 1}"
        )
    out = np.empty((num_subsets, size), dtype=np.int64)
    for j in range(num_subsets):
        rng = np.random.default_rng([seed, j])
        out[j] = np.sort(rng.choice(train_ids, size=size, replace=False))
    return out


def lds_score(
    scores: np.ndarray,
    subsets: np.ndarray,
    utilities: np.ndarray,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """LDS of a score matrix, given the measured utilities.

    Args:
        scores: [Q, num_train] scores, columns by example id.
        subsets: [M, n] train ids of each subset.
        utilities: [M, Q] measured utility of each subset for each query.

    Returns:
        {"mean", "low", "high", "confidence", "num_samples"} over queries (NaN-correlation
        queries, with constant predictions or utilities, left out), plus "per_query" [Q]
        and "num_queries_used".
    """
    scores = np.asarray(scores, dtype=np.float64)
    # One subset at a time: scores[:, subsets] would hold Q x M x subset-size numbers.
    predicted = np.stack([scores[:, subset].sum(axis=1) for subset in subsets], axis=1)  # [Q, M]
    if np.isnan(predicted).any():
        raise ValueError("LDS: some subset examples have no score (NaN in the score matrix)")
    per_query = spearman_rows(predicted, np.asarray(utilities, dtype=np.float64).T)  # [Q]
    used = per_query[~np.isnan(per_query)]
    if len(used) == 0:
        raise ValueError("LDS: no query has a defined correlation (constant predictions)")
    result = bootstrap_interval(used, num_samples, confidence, seed)
    result["per_query"] = per_query.tolist()
    result["num_queries_used"] = int(len(used))
    return result


# ---------------------------------------------------------------------------------------
# The retrainings.


def _check_or_write(path: Path, expected: dict[str, Any], what: str) -> None:
    if path.is_file():
        found = json.loads(path.read_text())
        if found != json.loads(json.dumps(expected, default=str)):
            raise ValueError(
                f"{path} was made for a different {what}; use another evaluate.lds_dir or "
                f"remove it.\n  found:    {json.dumps(found, sort_keys=True)}\n"
                f"  expected: {json.dumps(expected, sort_keys=True, default=str)}"
            )
        return
    write_json(path, expected)


def _subsets(cfg: Config, root: Path, train_ids: np.ndarray) -> np.ndarray:
    ev = cfg.evaluate
    subsets = sample_subsets(train_ids, ev.lds_fraction, ev.lds_subsets, ev.seed)
    path = root / "subsets.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        common = min(len(saved["subsets"]), len(subsets))
        if (
            saved["fraction"] != ev.lds_fraction
            or saved["seed"] != ev.seed
            or (np.asarray(saved["subsets"][:common]).tolist() != subsets[:common].tolist())
        ):
            raise ValueError(
                f"{path} holds other subsets (fraction {saved['fraction']}, seed "
                f"{saved['seed']}) than evaluate.lds_fraction={ev.lds_fraction}, "
                f"evaluate.seed={ev.seed}; use another evaluate.lds_dir"
            )
        if len(saved["subsets"]) >= len(subsets):
            return subsets
    payload = {"fraction": ev.lds_fraction, "seed": ev.seed, "subsets": subsets.tolist()}
    write_json(path, payload)
    return subsets


def run_path(root: Path, subset: int, seed: int) -> Path:
    return root / "runs" / f"subset-{subset:04d}" / f"seed-{seed:02d}"


class Retrainer:
    """Retrains train.init on subsets and measures query losses, caching both on disk."""

    def __init__(
        self, cfg: Config, tokenizer: Any, train: list[Example], queries: list[Example], device
    ) -> None:
        if not cfg.train.init:
            raise ValueError(
                "LDS needs train.init: the checkpoint every retraining starts from (a pre-SFT "
                "base model, or a fixed random init saved as a checkpoint)"
            )
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.train = {ex.example_id: ex for ex in train}
        self.queries = queries
        self.query_key = fingerprint(queries)
        self.model = load_model(
            cfg.train.init, cfg.train.dtype, cfg.model.trust_remote_code, device
        )
        self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.init_fingerprint = model_fingerprint(self.model, cfg.train.init)

    def losses_path(self, root: Path, subset: int, seed: int) -> Path:
        return run_path(root, subset, seed) / f"losses-{self.query_key}.json"

    def query_losses(self) -> np.ndarray:
        ex = self.cfg.extract
        return example_losses(
            self.model,
            self.queries,
            self.tokenizer.pad_token_id,
            ex.loss_reduction,
            ex.batch_tokens,
            ex.max_batch_size,
            self.device,
        )

    def run(self, root: Path, subset: int, seed: int, ids: np.ndarray) -> dict[str, Any]:
        """Retrains (or reloads) one (subset, seed) and writes its query losses."""
        timer = Timer()
        out = run_path(root, subset, seed)
        model_dir = out / "model"
        info: dict[str, Any] = {}
        if (model_dir / "config.json").is_file():
            state = load_model(str(model_dir), self.cfg.train.dtype).state_dict()
            self.model.load_state_dict(state)
            info = json.loads((out / "train.json").read_text())
        else:
            self.model.load_state_dict(self.init_state)
            examples = [self.train[int(t)] for t in ids]
            step_losses = train_model(
                self.model,
                examples,
                self.cfg.train,
                self.tokenizer.pad_token_id,
                self.cfg.train.seed + seed,
                self.device,
            )
            info = {"step_losses": step_losses, "train_seconds": timer.seconds}
            write_json(out / "train.json", info)
            if self.cfg.evaluate.lds_save_checkpoints:
                tmp = out / ".model.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self.model.save_pretrained(tmp)
                tmp.replace(model_dir)
        losses = self.query_losses()
        write_json(self.losses_path(root, subset, seed), {"losses": losses.tolist()})
        return {"seconds": timer.seconds, **info}


def measure_utilities(
    cfg: Config,
    runtime: Runtime | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Runs (or resumes) this process's share of the M x S retrainings.

    Returns:
        (subsets [M, n], utilities [M, Q]); utilities is None while other tasks or ranks
        still have runs to finish (rerun, or wait for them, then call again).
    """
    from lorif_dist.extract import load_train_examples

    ev = cfg.evaluate
    rank, world, task, num_tasks = 0, 1, 0, 1
    if runtime is not None:
        rank, world, task, num_tasks = (
            runtime.rank,
            runtime.world_size,
            runtime.task_id,
            runtime.num_tasks,
        )
    device = resolve_device(cfg.model.device, runtime.local_rank if runtime else 0)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    train, _ = load_train_examples(cfg, tokenizer)
    queries = load_query_examples(cfg, tokenizer)
    root = lds_dir(cfg)
    retrainer = Retrainer(cfg, tokenizer, train, queries, device)
    recipe = {
        "train": cfg.to_dict()["train"] | {"init": None},
        "init": retrainer.init_fingerprint,
        "data": fingerprint(train),
        "loss_reduction": cfg.extract.loss_reduction,
    }
    if runtime is None or runtime.is_main:
        _check_or_write(root / "recipe.json", recipe, "training recipe, init or data")
    if runtime is not None:
        runtime.collective.barrier()
        _check_or_write(root / "recipe.json", recipe, "training recipe, init or data")
    subsets = _subsets(cfg, root, np.array([ex.example_id for ex in train]))

    # Local work: my share of the (subset, seed) runs; done ones are skipped.
    # Seed-major, so that raising lds_seeds later still splits the new runs evenly.
    runs = [(j, s) for s in range(ev.lds_seeds) for j in range(ev.lds_subsets)]
    mine = runs[task * world + rank :: num_tasks * world]
    todo = [(j, s) for j, s in mine if not retrainer.losses_path(root, j, s).is_file()]
    logger.info(
        "lds: %d subsets x %d seeds; %d runs here, %d already done; cache %s",
        ev.lds_subsets,
        ev.lds_seeds,
        len(mine),
        len(mine) - len(todo),
        root,
    )
    for i, (j, s) in enumerate(todo):
        info = retrainer.run(root, j, s, subsets[j])
        steps = info.get("step_losses") or [float("nan")]
        logger.info(
            "lds: run %d/%d (subset %d, seed %d): train loss %.3f -> %.3f, %.1f s",
            i + 1,
            len(todo),
            j,
            s,
            float(np.mean(steps[:10])),
            float(np.mean(steps[-10:])),
            info["seconds"],
        )
    if runtime is not None:
        runtime.collective.barrier()

    # Gather: utilities from every run's losses, if all are done.
    paths = [
        [retrainer.losses_path(root, j, s) for s in range(ev.lds_seeds)]
        for j in range(ev.lds_subsets)
    ]
    missing = sum(not p.is_file() for row in paths for p in row)
    if missing:
        logger.warning(
            "lds: %d of %d runs not done yet (other tasks?); rerun to finish", missing, len(runs)
        )
        return subsets, None
    losses = np.array([[json.loads(p.read_text())["losses"] for p in row] for row in paths])
    return subsets, -losses.mean(axis=1)  # [M, Q]


def run_lds(
    cfg: Config,
    scores: np.ndarray | None = None,
    runtime: Runtime | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Retrains (cached) and computes the LDS of a score matrix (default: the saved one).

    Returns:
        lds_score's dict plus "settings", "complete" (False while runs are missing, then
        without the LDS) and, with write, "output" (<evaluate dir>/lds.json).
    """
    timer = Timer()
    ev = cfg.evaluate
    subsets, utilities = measure_utilities(cfg, runtime)
    settings = {
        "num_subsets": ev.lds_subsets,
        "fraction": ev.lds_fraction,
        "num_seeds": ev.lds_seeds,
        "subset_size": int(subsets.shape[1]),
        "train": cfg.to_dict()["train"],
        "lds_dir": str(lds_dir(cfg)),
    }
    if utilities is None:
        return {"complete": False, "settings": settings}
    if runtime is not None and not runtime.is_main:
        return {"complete": True, "settings": settings}
    if scores is None:  # only the rank that computes the LDS reads them, once retrained
        scores = load_scores(cfg)
    if scores.shape[0] != utilities.shape[1]:
        raise ValueError(
            f"LDS: the score matrix has {scores.shape[0]} query rows, the queries are "
            f"{utilities.shape[1]}"
        )
    result = lds_score(scores, subsets, utilities, ev.bootstrap_samples, ev.confidence, ev.seed)
    result.update(complete=True, settings=settings, seconds=timer.seconds)
    result["utilities"] = utilities.tolist()
    if write:
        result["output"] = str(write_json(evaluate_dir(cfg) / "lds.json", result))
    logger.info("LDS %.4f  [%.4f, %.4f]", result["mean"], result["low"], result["high"])
    summary("lds", queries=result["num_queries_used"], lds=result["mean"], seconds=timer.seconds)
    return result
