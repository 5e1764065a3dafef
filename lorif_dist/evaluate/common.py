"""What both evaluations read: the score matrix, the top-k lists and the query examples.

The queries are rebuilt exactly as the query stage tokenized them, so their losses and
log-probabilities are taken over the same tokens the scores were computed from: records
of query.files first, then each generated prompt as a chat (optional system prompt, user
prompt, the model's response as written to queries.jsonl). The rebuilt prompt and
response texts are checked against queries.jsonl.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from lorif_dist.config import Config
from lorif_dist.data import Example
from lorif_dist.manifest import load_manifest
from lorif_dist.safe_io import write_text_atomic


def scores_dir(cfg: Config) -> Path:
    """Where the score matrix and top-k lists are read (default: the query stage's output)."""
    if cfg.evaluate.scores:
        return Path(cfg.evaluate.scores)
    from lorif_dist.query import output_dir

    return output_dir(cfg)


def evaluate_dir(cfg: Config) -> Path:
    return Path(cfg.evaluate.output or Path(cfg.run.index_dir) / "evaluate")


def load_scores(cfg: Config) -> np.ndarray:
    """The full score matrix [num_queries, num_train], columns by example id (NaN: unscored)."""
    from lorif_dist.query import load_score_matrix

    manifest = load_manifest(cfg.run.index_dir)
    return load_score_matrix(scores_dir(cfg), manifest["dataset"]["num_records"])


def load_topk(cfg: Config) -> list[list[int]]:
    """Per query, the train ids of topk.jsonl in rank order."""
    path = scores_dir(cfg) / "topk.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `lorif query` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        out.setdefault(int(row["query_id"]), []).append((int(row["rank"]), int(row["train_id"])))
    return [[tid for _, tid in sorted(out[q])] for q in sorted(out)]


def load_query_examples(cfg: Config, tokenizer: Any) -> list[Example]:
    """The query stage's queries, tokenized as it did; ids 0..Q-1 are the query ids."""
    path = scores_dir(cfg) / "queries.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `lorif query` first")
    from lorif_dist.query import (
        answer_records,
        file_query_records,
        prompt_messages,
        tokenize_queries,
    )

    def tokenized(records: list[dict]) -> list[Example]:
        return tokenize_queries(cfg, tokenizer, records)[0] if records else []

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # The query stage's own records: its file queries, then its answers to the prompts.
    from_files = tokenized(file_query_records(cfg))
    generated = [
        {
            "messages": prompt_messages(cfg, row["prompt"])
            + [{"role": "assistant", "content": row["response"]}]
        }
        for row in rows[len(from_files) :]
    ]
    examples = from_files + tokenized(answer_records(cfg, generated))
    if len(examples) != len(rows):
        raise ValueError(
            f"{path} lists {len(rows)} queries but query.files and query.prompts give "
            f"{len(examples)}; evaluate with the config the query stage ran with"
        )
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        if ex.prompt != row["prompt"] or ex.response != row["response"]:
            raise ValueError(
                f"query {i} of {path} ({row['prompt'][:60]!r}) does not match the config's "
                f"queries ({ex.prompt[:60]!r}); evaluate with the config the query stage ran with"
            )
        ex.example_id = i
    return examples


def short_hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> Path:
    """Writes JSON atomically (a reader never sees half a file)."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=float) + "\n", "evaluation result")
    return path
