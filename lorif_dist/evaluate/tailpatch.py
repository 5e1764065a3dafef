"""Tail-patch: does a training step on a query's top proponents raise the query's probability?

For a query q and a training example t, from the final model take `tailpatch_steps`
optimizer steps on t's loss alone (extract.loss_reduction, the loss the scores came from),
measure

    delta(t, q) = log p(response_q | prompt_q) after the steps - before   (nats)

then put the weights back bit-exactly. Good attribution puts the examples with the largest
delta at the top of q's list: the mean delta over each query's top-k is compared with the
same mean over k random training examples and over the bottom-k, with bootstrap intervals
(two-stage: over queries, then over each query's k examples; differences are paired).

Defaults, and why. SGD with a small learning rate (1e-5) and one step: the change is then
close to first order, lr * <grad log p(q), -grad loss(t)>, the effect of t that influence
estimates approximate, yet large enough (typically 1e-3 to 1 nats on the demo) to stand
far above float32 rounding (~1e-5 nats). Adam is offered, but a fresh Adam's first step is
lr * g / (|g| + eps) ~ lr * sign(g), which discards the gradient's magnitudes, and the
state of the optimizer that trained the model is rarely at hand. Only the tracked layers
are stepped by default ("tracked"), since those are what the scores model; "all" steps
every weight. Weights are held in train.dtype (float32): a 1e-5 step vanishes in bfloat16.
Note that to first order SGD tail-patch rewards the plain gradient dot product over the
tracked layers; curvature-aware scores are judged by LDS as well.

Cost: one example's forward and backward per step, plus a forward of the Q queries, per
measured example. A step on t does not depend on q, so each t is measured once for all
queries, and measurements are cached on disk (keyed by model, queries, data and settings):
comparing several methods, or rerunning after a kill, measures only new examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorif_dist.config import Config
from lorif_dist.data import Example, collate, fingerprint
from lorif_dist.evaluate.common import (
    evaluate_dir,
    load_query_examples,
    load_scores,
    load_topk,
    short_hash,
    write_json,
)
from lorif_dist.evaluate.stats import compare_groups
from lorif_dist.evaluate.training import example_losses
from lorif_dist.logging_utils import Timer, logger, progress, summary
from lorif_dist.modeling import (
    load_model,
    load_tokenizer,
    model_fingerprint,
    per_example_loss,
    resolve_device,
    select_layers,
)


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, byte for byte."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(name.encode() + raw.numpy().tobytes())
    return h.hexdigest()


class TailPatcher:
    """The final model and the queries; measures delta(t, q) for training examples t.

    Args:
        cfg: the run's config (model, data, extract.layers, train.dtype, evaluate.*). The
            model is cfg's, the queries the query stage's (queries.jsonl), the training
            examples data.train_files tokenized. Measurements are kept in
            <evaluate.tailpatch_cache or the evaluate dir>/tailpatch-cache-<hash>.jsonl (the
            hash covers model, queries, data and settings).
    """

    def __init__(
        self,
        cfg: Config,
    ) -> None:
        from lorif_dist.extract import load_train_examples

        self.cfg = cfg
        ev = cfg.evaluate
        self.device = resolve_device(cfg.model.device)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        self.model = load_model(
            cfg.model.name_or_path, cfg.train.dtype, cfg.model.trust_remote_code, self.device
        )
        self.model.eval()
        queries = load_query_examples(cfg, self.tokenizer)
        self.queries = queries[: ev.tailpatch_queries] if ev.tailpatch_queries else queries
        train_examples, _ = load_train_examples(cfg, self.tokenizer)
        self.train = {ex.example_id: ex for ex in train_examples}
        self.params = self._stepped_params()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.snapshot = [p.detach().clone() for p in self.params]
        self.digest = state_digest(self.model)
        self.baseline = self.log_probs()  # [Q]
        self.measured: dict[int, np.ndarray] = {}
        self.cache_path = self._cache_path()
        self._read_cache()

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def _stepped_params(self) -> list[torch.nn.Parameter]:
        if self.cfg.evaluate.tailpatch_params == "all":
            return list(self.model.parameters())
        ex = self.cfg.extract
        specs = select_layers(self.model, ex.layers, ex.exclude_layers)
        modules = dict(self.model.named_modules())
        return [modules[s.name].weight for s in specs]

    def log_probs(self) -> np.ndarray:
        """log p(response | prompt) of every query [Q] under the current weights."""
        ex = self.cfg.extract
        losses = example_losses(
            self.model,
            self.queries,
            self.tokenizer.pad_token_id,
            "sum",
            ex.batch_tokens,
            ex.max_batch_size,
            self.device,
        )
        return -losses

    def _step_on(self, example: Example) -> None:
        ev = self.cfg.evaluate
        for p in self.params:
            p.requires_grad_(True)
        if ev.tailpatch_optimizer == "adam":
            optimizer = torch.optim.Adam(self.params, lr=ev.tailpatch_lr)
        else:
            optimizer = torch.optim.SGD(self.params, lr=ev.tailpatch_lr)
        batch = {
            k: v.to(self.device) for k, v in collate([example], self.tokenizer.pad_token_id).items()
        }
        for _ in range(ev.tailpatch_steps):
            optimizer.zero_grad(set_to_none=True)
            loss = per_example_loss(self.model, batch, self.cfg.extract.loss_reduction).sum()
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.requires_grad_(False)

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.snapshot, strict=True):
            p.copy_(saved)

    def measure(self, train_ids: Sequence[int]) -> np.ndarray:
        """delta(t, q) [len(train_ids), Q] in nats; cached ids are not measured again."""
        missing = [t for t in dict.fromkeys(int(t) for t in train_ids) if t not in self.measured]
        unknown = [t for t in missing if t not in self.train]
        if unknown:
            raise ValueError(
                f"tail-patch: training ids {unknown[:10]} are not training examples of "
                f"data.train_files ({len(self.train)} examples)"
            )
        mode = self.cfg.run.progress
        for t in progress(missing, len(missing), "tail-patch", mode, unit="example"):
            self._step_on(self.train[t])
            delta = self.log_probs() - self.baseline
            self.restore()
            self.measured[t] = delta
            self._append_cache(t, delta)
        rows = [self.measured[int(t)] for t in train_ids]
        return np.stack(rows) if rows else np.zeros((0, self.num_queries))

    def check_restored(self) -> None:
        """Raises RuntimeError unless every weight and every query log-prob is bit-identical
        to what it was before the first step."""
        if state_digest(self.model) != self.digest:
            raise RuntimeError("tail-patch: the model's weights differ after restoring them")
        again = self.log_probs()
        if not np.array_equal(again, self.baseline):
            diff = float(np.abs(again - self.baseline).max())
            raise RuntimeError(f"tail-patch: query log-probs changed after restoring (by {diff})")

    # -- the on-disk cache ---------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        cfg = self.cfg
        ev = cfg.evaluate
        return {
            "model": model_fingerprint(self.model, cfg.model.name_or_path),
            "queries": fingerprint(self.queries),
            "train": short_hash([(t, ex.input_ids, ex.labels) for t, ex in self.train.items()]),
            "optimizer": ev.tailpatch_optimizer,
            "lr": ev.tailpatch_lr,
            "steps": ev.tailpatch_steps,
            "params": ev.tailpatch_params,
            "layers": [cfg.extract.layers, cfg.extract.exclude_layers],
            "loss_reduction": cfg.extract.loss_reduction,
            "dtype": cfg.train.dtype,
        }

    def _cache_path(self) -> Path:
        folder = Path(self.cfg.evaluate.tailpatch_cache or evaluate_dir(self.cfg))
        return folder / f"tailpatch-cache-{short_hash(self._identity())}.jsonl"

    def _read_cache(self) -> None:
        if not self.cache_path.is_file():
            return
        for line in self.cache_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: measured again
            if len(row.get("delta", [])) == self.num_queries:
                self.measured[int(row["train_id"])] = np.asarray(row["delta"], dtype=np.float64)
        logger.info(
            "tail-patch: %d examples already measured (%s)", len(self.measured), self.cache_path
        )

    def _append_cache(self, train_id: int, delta: np.ndarray) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a") as fh:
            fh.write(json.dumps({"train_id": train_id, "delta": delta.tolist()}) + "\n")


def select_examples(
    scores: np.ndarray, candidates: np.ndarray, k: int, seed: int, query_id: int
) -> dict[str, list[int]]:
    """A query's top-k, bottom-k and k random training ids among `candidates`.

    Ties in score are broken by the smaller id. The random draw is seeded by (seed,
    query_id), so it is the same for every method compared on the same queries.
    """
    row = scores[candidates]
    top = candidates[np.lexsort((candidates, -row))[:k]]
    bottom = candidates[np.lexsort((candidates, row))[:k]]
    rng = np.random.default_rng([seed, query_id])
    random = rng.choice(candidates, size=min(k, len(candidates)), replace=False)
    return {"top": top.tolist(), "random": random.tolist(), "bottom": bottom.tolist()}


def _selections(
    cfg: Config, patcher: TailPatcher, scores: np.ndarray | None, top_ids
) -> list[dict[str, list[int]]]:
    k, seed = cfg.evaluate.tailpatch_k, cfg.evaluate.seed
    train_ids = np.array(sorted(patcher.train), dtype=np.int64)
    out = []
    for q in range(patcher.num_queries):
        if scores is not None:
            candidates = train_ids[~np.isnan(scores[q, train_ids])]
            if len(candidates) < k:
                raise ValueError(f"tail-patch: query {q} has {len(candidates)} scored examples < k")
            out.append(select_examples(scores[q], candidates, k, seed, q))
        else:
            rng = np.random.default_rng([seed, q])
            random = rng.choice(train_ids, size=k, replace=False).tolist()
            out.append({"top": list(top_ids[q][:k]), "random": random})
    return out


def run_tailpatch(
    cfg: Config,
    scores: np.ndarray | None = None,
    top_ids: Sequence[Sequence[int]] | None = None,
    patcher: TailPatcher | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Tail-patch of a score matrix (or of top-k lists) against random-k and bottom-k.

    Args:
        cfg: the config the scores were computed with (evaluate.tailpatch_* set the test).
        scores: [num_queries, num_train] with columns by example id (NaN: unscored). With
            neither scores nor top_ids, the query stage's saved matrix is read, or, when it
            saved none, its topk.jsonl (then without bottom-k).
        top_ids: per query, train ids best first (used when scores is None).
        patcher: a TailPatcher to reuse (its cache) across several score matrices.
        write: write <evaluate dir>/tailpatch.json.

    Returns:
        A dict with "top", "random" (and "bottom") mean deltas in nats, each
        {"mean", "low", "high", "confidence", "num_samples"}; the paired differences
        "top_minus_random" (and "top_minus_bottom"); "per_query" ids and deltas; settings.
    """
    timer = Timer()
    ev = cfg.evaluate
    if scores is None and top_ids is None:
        try:
            scores = load_scores(cfg)
        except FileNotFoundError:
            logger.warning("tail-patch: no saved score matrix; using topk.jsonl, no bottom-k")
            top_ids = load_topk(cfg)
    patcher = patcher or TailPatcher(cfg)
    num_queries = patcher.num_queries
    if scores is not None and scores.shape[0] < num_queries:
        raise ValueError(f"tail-patch: {num_queries} queries but scores has {scores.shape[0]} rows")
    if top_ids is not None and scores is None and len(top_ids) < num_queries:
        raise ValueError(f"tail-patch: {num_queries} queries but top_ids has {len(top_ids)} lists")
    chosen = _selections(cfg, patcher, scores, top_ids)

    # Measure every distinct example once, for all queries.
    union = sorted({t for sel in chosen for ids in sel.values() for t in ids})
    before = len(patcher.measured)
    deltas = dict(zip(union, patcher.measure(union), strict=True))  # t -> [Q]
    patcher.check_restored()

    groups = {
        name: np.array([[deltas[t][q] for t in chosen[q][name]] for q in range(num_queries)])
        for name in chosen[0]
    }
    pairs = [("top", "random")] + ([("top", "bottom")] if "bottom" in groups else [])
    result: dict[str, Any] = compare_groups(
        groups, pairs, ev.bootstrap_samples, ev.confidence, ev.seed
    )
    result["settings"] = {
        "k": ev.tailpatch_k,
        "num_queries": num_queries,
        "optimizer": ev.tailpatch_optimizer,
        "lr": ev.tailpatch_lr,
        "steps": ev.tailpatch_steps,
        "params": ev.tailpatch_params,
        "dtype": cfg.train.dtype,
        "unit": "nats: log p(response | prompt) after - before",
    }
    result["per_query"] = [
        {
            "query_id": q,
            "prompt": patcher.queries[q].prompt,
            **{f"{name}_ids": chosen[q][name] for name in groups},
            **{f"{name}_delta": groups[name][q].tolist() for name in groups},
        }
        for q in range(num_queries)
    ]
    result["restored_bit_exact"] = True
    result["num_measured"] = len(patcher.measured) - before
    result["seconds"] = timer.seconds
    if write:
        result["output"] = str(write_json(evaluate_dir(cfg) / "tailpatch.json", result))
    _log(result, groups)
    return result


def _log(result: dict[str, Any], groups: dict[str, np.ndarray]) -> None:
    for name in list(groups) + [n for n in result if "_minus_" in n]:
        r = result[name]
        logger.info("tail-patch %-16s %+.4g  [%+.4g, %+.4g]", name, r["mean"], r["low"], r["high"])
    summary(
        "tail-patch",
        queries=result["settings"]["num_queries"],
        k=result["settings"]["k"],
        measured=result["num_measured"],
        seconds=result["seconds"],
    )
