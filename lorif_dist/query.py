"""Stage 3, query: precondition each query once, score every training example, merge top-k.

    h_q = (G^T G + lambda I)^-1 g_q        per layer, split Woodbury form (rsvd.py)
    I(q, t) = sum over layers <h_q, L_t diag(s_t) R_t^T>

Indexes of the baselines (extract.method logra / graddot, baselines.py) take the dense path
with h_q = H^-1 g_q from the exact dense inverse, or h_q = g_q. Scores are then divided as
query.normalize says (normalize.py). Two scoring paths give the same scores when queries
are factored exactly:

    dense     h_q is dense (D per layer); each block of train factors is densified and
              dotted with it: c D + D flops per (query, example) pair.
    factored  queries are factored at rank c_q; with cached coordinates C_t = V^T g_t,
              <h_q, g_t> = (g_q.g_t - C_q.C_t) / lambda + C_q diag(1/(lambda + s^2)) C_t,
              where g_q.g_t comes from the factors: c_q c (d1 + d2) + r flops per pair.
              The small dot products are taken in float64, which keeps the difference of
              the first term accurate.

Distribution: the query side (model, generation, preconditioning) runs once, on rank 0
(or on every rank when the model is sharded), and the preconditioned queries are
broadcast. Each rank scores the shards it owns (shard i -> rank i mod world_size), keeps a
top-k per query, and rank 0 merges the gathered top-k lists.

Outputs, under query.output (default <index>/query):
    queries.jsonl         one line per query: query_id, prompt, response
    topk.jsonl            one line per (query, rank): query_id, rank (1 = most positive),
                          train_id, score, train prompt and response, query prompt
    scores/task-TTTT/rank-RRRRR.h5 (with query.save_scores)
                          example_id (n,) and scores (num_queries, n): rows are queries,
                          columns follow example_id; `load_score_matrix` joins them into
                          (num_queries, num_train) with columns by example id
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lorif_dist.baselines import index_method, precondition_dense
from lorif_dist.config import Config
from lorif_dist.curvature import coords_path, load_curvature
from lorif_dist.data import (
    Example,
    read_records,
    to_messages,
    token_budget_batches,
    tokenize_records,
)
from lorif_dist.distributed import Runtime
from lorif_dist.extract import GradientExtractor
from lorif_dist.factorize import densify, factorize, start_block
from lorif_dist.integrity import open_shards
from lorif_dist.logging_utils import Timer, logger, progress, summary
from lorif_dist.manifest import check_identity, load_manifest, require_complete
from lorif_dist.modeling import TORCH_DTYPES
from lorif_dist.normalize import largest_hub, normalize_scores, train_statistic
from lorif_dist.projection import layer_seed
from lorif_dist.rsvd import woodbury_precondition
from lorif_dist.safe_io import replace_h5
from lorif_dist.storage import ShardReader


@dataclass
class PreparedQueries:
    """Everything a rank needs to score: per layer, dense h_q or the factored pieces."""

    num_queries: int
    dense: dict[str, torch.Tensor]  # layer -> h [Q, D]          (dense path)
    factors: dict[str, tuple]  # layer -> (L, s, R, C_q, w, lambda)  (factored path)
    path: str
    # I(q, q) = sum over layers g_q^T H^-1 g_q of the query gradient each path scores with.
    self_influence: torch.Tensor | None = None  # [Q] float64


# ---------------------------------------------------------------------------------------
# The query side.


def generate_responses(
    extractor: GradientExtractor, prompts: list[str], max_new_tokens: int
) -> list[dict]:
    """Greedy responses of the model itself, as chat records."""
    tok, model, cfg = extractor.tokenizer, extractor.model, extractor.cfg
    # A sharded model gathers weights in every decoding step: ranks keep stepping until all
    # are done, so one that meets EOS early does not leave the others waiting.
    sharded = cfg.run.parallel != "none" and extractor.runtime.world_size > 1
    records = []
    for prompt in prompts:
        messages = prompt_messages(cfg, prompt)
        if cfg.data.chat_template and tok.chat_template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = (tok.bos_token or "") + prompt + "\n"
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
            extractor.runtime.device
        )
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                synced_gpus=sharded,
            )
        response = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        records.append({"messages": messages + [{"role": "assistant", "content": response}]})
    return records


def prompt_messages(cfg: Config, prompt: str) -> list[dict]:
    """The chat messages of a query prompt before its answer (system prompt included)."""
    record = {"instruction": prompt, "output": ""}
    return to_messages(record, "alpaca", cfg.data.system_prompt, {})[:-1]


def file_query_records(cfg: Config) -> list[dict]:
    """query.files as chat records, read in data.format (system prompt and template
    variables applied), so that they tokenize like the generated answers."""
    if not cfg.query.files:
        return []
    d = cfg.data
    return [
        {"messages": to_messages(record, d.format, d.system_prompt, d.template_vars)}
        for record in read_records(cfg.query.files, field="query.files")
    ]


def answer_records(cfg: Config, generated: list[dict]) -> list[dict]:
    """Generated answers (the chat records of `generate_responses`), template variables
    applied like the file queries'."""
    tv = cfg.data.template_vars
    return [{"messages": to_messages(record, "messages", None, tv)} for record in generated]


def tokenize_queries(cfg: Config, tokenizer: Any, records: list[dict]) -> tuple[list, Any]:
    """Query chat records (`file_query_records`, `answer_records`) -> examples."""
    d = cfg.data
    # System prompt and template variables are in the messages already.
    return tokenize_records(tokenizer, records, "messages", d.max_length, d.chat_template, None, {})


def load_queries(cfg: Config, extractor: GradientExtractor) -> list[Example]:
    """Query examples: from query.files, then prompts answered by the model (in that order)."""
    records = file_query_records(cfg)
    if cfg.query.prompts:
        generated = generate_responses(extractor, cfg.query.prompts, cfg.query.max_new_tokens)
        if cfg.run.parallel != "none":
            # Every rank generated (each step all-gathers); rank 0's text is the one used, so
            # all ranks cut the same batches even if their decodes differed in a last bit.
            generated = extractor.runtime.collective.broadcast_object(generated, src=0)
        records += answer_records(cfg, generated)
    if not records:
        raise ValueError("no queries: set query.files and/or query.prompts")
    examples, report = tokenize_queries(cfg, extractor.tokenizer, records)
    if report.skipped:
        logger.warning("query: skipped queries %s", report.skipped)
    return examples


def query_gradients(
    extractor: GradientExtractor, queries: list[Example]
) -> dict[str, torch.Tensor]:
    """Dense projected gradients of the queries, {layer: [Q, d1, d2]} in query order."""
    ex = extractor.cfg.extract
    position = {q.example_id: i for i, q in enumerate(queries)}
    out: dict[str, torch.Tensor] = {}
    for batch in token_budget_batches(queries, ex.batch_tokens, ex.max_batch_size):
        losses, grads, finite = extractor.batch_gradients(batch)
        if not bool(finite.all()):
            bad = [b.example_id for b, ok in zip(batch, finite.tolist(), strict=False) if not ok]
            raise ValueError(f"queries {bad} have a non-finite loss or gradient")
        rows = torch.tensor([position[b.example_id] for b in batch])
        for name, grad in grads.items():
            if name not in out:
                out[name] = torch.zeros((len(queries),) + grad.shape[1:], dtype=grad.dtype)
            out[name][rows] = grad.cpu()
    return out


def choose_path(cfg: Config, manifest: dict[str, Any]) -> str:
    path = cfg.query.path
    if index_method(manifest) != "lorif":
        if path == "factored":
            raise ValueError(
                f"query.path=factored needs a lorif index; this one was built with "
                f"extract.method={index_method(manifest)!r}: use query.path dense or auto"
            )
        return "dense"
    curvature = manifest.get("curvature", {})
    return lorif_query_path(
        path,
        bool(curvature.get("coordinates_cached")),
        [(s["d1"], s["d2"], s["c"]) for s in manifest["identity"]["layers"]],
        curvature.get("config", {}).get("rank", 0),
        cfg.query.factor_rank,
    )


def lorif_query_path(
    path: str,
    cached: bool,
    layers: list[tuple[int, int, int]],
    rank: int,
    factor_rank: int | None,
) -> str:
    """The scoring path of a LoRIF index: query.path, or under "auto" the one with fewer
    multiplies per (query, example) pair (`lorif plan` predicts with the same rule).

    layers are (d1, d2, c); rank is the curvature rank r; factor_rank the query's (None: c).
    """
    if path == "factored" and not cached:
        raise ValueError(
            "query.path=factored needs cached curvature coordinates; rerun `lorif curvature` "
            "with curvature.cache_coordinates=true"
        )
    if path != "auto":
        return path
    if not cached:
        return "dense"
    dense_cost = sum(d1 * d2 for d1, d2, _ in layers)
    factored_cost = sum((factor_rank or c) * c * (d1 + d2) + rank for d1, d2, c in layers)
    return "factored" if factored_cost < dense_cost else "dense"


def precondition(
    cfg: Config,
    grads: dict[str, torch.Tensor],
    path: str,
    dtype: torch.dtype,
    method: str = "lorif",
) -> PreparedQueries:
    """h_q per layer (dense path) or the factored query pieces (factored path)."""
    dense, factors = {}, {}
    num_queries = next(iter(grads.values())).shape[0]
    self_influence = torch.zeros(num_queries, dtype=torch.float64)
    ex = cfg.extract
    for name, grad in grads.items():
        flat = grad.reshape(num_queries, -1).to(dtype)  # g_q [Q, D]
        if method != "lorif":
            dense[name] = precondition_dense(method, cfg.run.index_dir, name, flat, dtype)
            self_influence += (flat * dense[name]).sum(dim=1).double()
            continue
        default_rank = min(grad.shape[1], grad.shape[2]) if ex.exact_factors else ex.factor_rank
        rank_q = cfg.query.factor_rank or default_rank
        vectors, singular, lam = load_curvature(cfg.run.index_dir, name, dtype)
        if path == "dense":
            dense[name] = woodbury_precondition(flat, vectors, singular, lam)
            self_influence += (flat * dense[name]).sum(dim=1).double()
            continue
        start = start_block(grad.shape[2], rank_q, layer_seed(ex.seed, name, "factor"), grad.dtype)
        left, scale, right = factorize(grad, rank_q, ex.factor_method, ex.power_iters, start)
        factored = densify(left, scale, right).to(dtype)  # the rank-c_q query gradient
        coords = factored @ vectors  # C_q [Q, r]
        h_factored = woodbury_precondition(factored, vectors, singular, lam)
        self_influence += (factored * h_factored).sum(dim=1).double()
        weights = 1.0 / (lam + singular.double() ** 2)
        factors[name] = (
            left.double(),
            scale.double(),
            right.double(),
            coords.double(),
            weights,
            lam,
        )
    return PreparedQueries(num_queries, dense, factors, path, self_influence)


# ---------------------------------------------------------------------------------------
# Scoring a shard.


def score_shard(
    prepared: PreparedQueries,
    reader: ShardReader,
    coords_file: Path | None,
    block_rows: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Scores [Q, n] of every query against every example of one shard."""
    n = reader.num_examples
    scores = torch.zeros(prepared.num_queries, n, dtype=torch.float64)
    coords_h5 = h5py.File(coords_file, "r") if coords_file is not None else None
    try:
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            for name in prepared.dense or prepared.factors:
                if prepared.path == "dense":
                    block = reader.read_dense(name, start, stop, dtype)  # [n_b, D]
                    scores[:, start:stop] += (prepared.dense[name] @ block.T).double()
                    continue
                lq, sq, rq, cq, weights, lam = prepared.factors[name]
                lt, st, rt = reader.read(name, start, stop, torch.float64)
                ct = torch.from_numpy(coords_h5[name][start:stop]).double()  # [n_b, r]
                ll = torch.einsum("qik,nil->qnkl", lq, lt)
                rr = torch.einsum("qjk,njl->qnkl", rq, rt)
                dots = torch.einsum("qk,nl,qnkl->qn", sq, st, ll * rr)  # g_q . g_t
                scores[:, start:stop] += (dots - cq @ ct.T) / lam + (cq * weights) @ ct.T
    finally:
        if coords_h5 is not None:
            coords_h5.close()
    return scores


# ---------------------------------------------------------------------------------------
# The stage.


def output_dir(cfg: Config) -> Path:
    return query_output_dir(cfg.query.output, cfg.run.index_dir)


def query_output_dir(output: str | None, index_dir: str | Path) -> Path:
    """Where the query stage writes: query.output, else <index>/query."""
    return Path(output) if output else Path(index_dir) / "query"


def run_query(
    cfg: Config, runtime: Runtime, extractor: GradientExtractor | None = None
) -> dict[str, Any]:
    timer = Timer()
    coll = runtime.collective
    index_dir = cfg.run.index_dir
    dtype = TORCH_DTYPES[cfg.curvature.compute_dtype]
    manifest = load_manifest(index_dir)
    shards = require_complete(index_dir, manifest)
    if "curvature" not in manifest:
        raise FileNotFoundError(
            f"the index at {index_dir} has no curvature; run `lorif curvature` first"
        )
    path = choose_path(cfg, manifest)
    method = index_method(manifest)
    out_dir = output_dir(cfg)

    # Query side on rank 0 (every rank when the model is sharded), then broadcast.
    prepared, queries = None, None
    gradient_seconds = 0.0  # model, queries and their gradients, apart from scoring
    if runtime.is_main or cfg.run.parallel != "none":
        extractor = extractor or GradientExtractor(cfg, runtime)
        found = {k: v for k, v in manifest["identity"].items() if k != "dataset_fingerprint"}
        expected = {k: v for k, v in extractor.identity("").items() if k != "dataset_fingerprint"}
        check_identity(index_dir, found, expected, "model, projection or config than this query")
        queries = load_queries(cfg, extractor)
        grads = query_gradients(extractor, queries)
        gradient_seconds = timer.seconds
        prepared = precondition(cfg, grads, path, dtype, method)
    # Sharded runs computed it on every rank; rank 0's copy is the one all ranks score with.
    prepared = coll.broadcast_object(prepared, src=0)
    logger.info(
        "query: %s, %d queries, %s path, normalize %s, %d shards over %d rank(s)",
        method,
        prepared.num_queries,
        path,
        cfg.query.normalize,
        len(shards),
        runtime.world_size,
    )

    # Local work: score my shards, keep a top-k per query (and the scores if asked).
    mine = shards[runtime.rank :: runtime.world_size]
    k = cfg.query.top_k
    local_ids = np.zeros((prepared.num_queries, 0), np.int64)
    local_scores = np.zeros((prepared.num_queries, 0), np.float64)
    num_scored = 0
    # Size, structure and shapes up front; Fletcher-32 on every read; no whole-file hash
    # (it would double this stage's I/O, see integrity.py).
    readers = open_shards(index_dir, manifest, mine, False, coll)
    owned = zip(mine, readers, strict=True)
    for name, reader in progress(owned, len(mine), "query", cfg.run.progress, unit="shard"):
        with reader:  # closed once scored
            coords = coords_path(index_dir, name)  # V^T g_t, when curvature cached them
            factored = coords if path == "factored" else None
            scores = score_shard(prepared, reader, factored, cfg.query.batch_examples, dtype)
            scores = scores.numpy()
            if cfg.query.normalize != "none":
                train_stat = train_statistic(
                    cfg.query.normalize,
                    method,
                    reader,
                    list(prepared.dense or prepared.factors),
                    index_dir,
                    coords if method == "lorif" and coords.is_file() else None,
                    cfg.query.batch_examples,
                    dtype,
                )
                query_self = prepared.self_influence.numpy()
                scores = normalize_scores(scores, cfg.query.normalize, query_self, train_stat)
            ids = reader.example_ids
        num_scored += len(ids)
        if cfg.query.save_scores:
            _save_score_shard(out_dir / "scores" / f"{name}.h5", ids, scores)
        all_ids = np.concatenate([local_ids, np.tile(ids, (prepared.num_queries, 1))], axis=1)
        all_scores = np.concatenate([local_scores, scores], axis=1)
        local_ids, local_scores = _topk_rows(all_ids, all_scores, k)

    # Merge: gather every rank's top-k on rank 0.
    gathered = coll.gather_object((local_ids, local_scores), dst=0)
    seconds = coll.max_float(timer.seconds)
    # Preconditioning, scoring and merging, apart from the query gradients.
    score_seconds = coll.max_float(timer.seconds - gradient_seconds)
    result: dict[str, Any] = {"path": path, "seconds": seconds, "score_seconds": score_seconds}
    if runtime.is_main:
        top_ids, top_scores = _topk_rows(
            np.concatenate([g[0] for g in gathered], axis=1),
            np.concatenate([g[1] for g in gathered], axis=1),
            k,
        )
        result["topk"] = _write_results(cfg, manifest, out_dir, queries, top_ids, top_scores)
        result["output_dir"] = str(out_dir)
        result["largest_hub"] = largest_hub(top_ids)
    total_scored = int(coll.all_reduce_sum(torch.tensor([num_scored], dtype=torch.float64)).item())
    summary(
        "query",
        queries=prepared.num_queries,
        train_examples=total_scored,
        path=path,
        normalize=cfg.query.normalize,
        largest_hub=result.get("largest_hub", (0, -1))[0],
        seconds=seconds,
        output=str(out_dir),
    )
    return result


def _topk_rows(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k where each row has its own ids ([Q, n] ids and scores)."""
    k = min(k, scores.shape[1])
    out_ids = np.empty((scores.shape[0], k), np.int64)
    out_scores = np.empty((scores.shape[0], k), np.float64)
    for q in range(scores.shape[0]):
        order = np.lexsort((ids[q], -scores[q]))[:k]
        out_ids[q], out_scores[q] = ids[q, order], scores[q, order]
    return out_ids, out_scores


def _save_score_shard(path: Path, ids: np.ndarray, scores: np.ndarray) -> None:
    with replace_h5(path, "score shard") as h5:
        h5.create_dataset("example_id", data=ids)
        h5.create_dataset("scores", data=scores)  # [num_queries, n]: rows are queries
        h5.attrs["orientation"] = "queries x train"


def load_score_matrix(out_dir: str | Path, num_train: int) -> np.ndarray:
    """The full score matrix [num_queries, num_train], columns by example id (NaN: not scored)."""
    files = sorted((Path(out_dir) / "scores").rglob("*.h5"))
    if not files:
        raise FileNotFoundError(
            f"no score shards under {out_dir}/scores; run query with query.save_scores=true"
        )
    matrix = None
    for f in files:
        with h5py.File(f, "r") as h5:
            ids, scores = h5["example_id"][...], h5["scores"][...]
        if matrix is None:
            matrix = np.full((scores.shape[0], num_train), np.nan)
        matrix[:, ids] = scores
    return matrix


def _train_texts(manifest: dict[str, Any], ids: set[int]) -> dict[int, tuple[str, str]]:
    """Prompt and response texts of some training examples, from the index's data files."""
    data = manifest["config"]["data"]
    try:
        records = read_records(data["train_files"], data.get("limit"))
    except (FileNotFoundError, ValueError) as e:
        logger.warning("query: training texts unavailable (%s); writing ids and scores only", e)
        return {}
    out = {}
    for i in ids:
        messages = to_messages(
            records[i], data["format"], data["system_prompt"], data["template_vars"]
        )
        prompt = "\n".join(m["content"] for m in messages[:-1] if m["role"] != "system")
        out[i] = (prompt, messages[-1]["content"])
    return out


def _write_results(
    cfg, manifest, out_dir: Path, queries: list[Example], top_ids, top_scores
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = _train_texts(manifest, set(top_ids.flatten().tolist()))
    rows = []
    for qi, query in enumerate(queries):
        for j in range(top_ids.shape[1]):
            tid = int(top_ids[qi, j])
            prompt, response = texts.get(tid, ("", ""))
            rows.append(
                {
                    "query_id": qi,
                    "rank": j + 1,
                    "train_id": tid,
                    "score": float(top_scores[qi, j]),
                    "train_prompt": prompt,
                    "train_response": response,
                    "query_prompt": query.prompt,
                    "query_response": query.response,
                }
            )
    with open(out_dir / "queries.jsonl", "w") as fh:
        for qi, query in enumerate(queries):
            fh.write(
                json.dumps({"query_id": qi, "prompt": query.prompt, "response": query.response})
                + "\n"
            )
    with open(out_dir / "topk.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return rows
