"""Shared fixtures: tiny GPT-2 and Llama-style checkpoints, a real BPE tokenizer, data.

Tiny models are random-initialized Hugging Face architectures saved as real checkpoints,
so the tests go through the same loading path as a user's model. The tokenizer is a
byte-level BPE trained here on the test texts (no download); the Llama-style one has a
ChatML template, GPT-2 has none and uses the plain prompt/response format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorif_dist.testing import build_checkpoint, make_records, write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REL_EXACT = 1e-8  # float64 pipeline vs float64 brute force
REL_FLOAT32 = 1e-4  # invariances that go through float32 arithmetic


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build_checkpoint(root, kind) for kind in ("gpt2", "llama")}


@pytest.fixture
def data_files(tmp_path) -> dict[str, Path]:
    train = make_records(14, seed=1)
    train.append({"instruction": "", "input": "", "output": "   "})  # empty response
    messages = {
        "messages": [
            {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "on the mat"},
            {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "rain fell over the quiet town"},
        ]
    }
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps(messages) + "\n")
    return {
        "train": write_json(tmp_path / "train.json", train),
        "chat": jsonl,
        "queries": write_json(tmp_path / "queries.json", make_records(3, seed=7)),
    }


@pytest.fixture(autouse=True)
def _no_process_group():
    """Tears down a torch process group a test left behind."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exact_overrides(index_dir: Path, ckpt: Path, train: list[Path], queries: Path) -> list[str]:
    """Settings under which the pipeline is exact: float64 end to end, exact factors, and a
    curvature rank (16) above rank(G) <= 15 training examples."""
    return [
        "--model.name_or_path",
        str(ckpt),
        "--model.dtype",
        "float64",
        "--model.device",
        "cpu",
        "--data.train_files",
        ",".join(str(p) for p in train),
        "--data.max_length",
        "72",
        "--extract.projection_factor",
        "1",
        "--extract.exact_factors",
        "true",
        "--extract.accumulate_dtype",
        "float64",
        "--extract.storage_dtype",
        "float64",
        "--extract.factor_method",
        "svd",
        "--curvature.rank",
        "16",
        "--curvature.oversample",
        "0",
        "--curvature.power_iters",
        "0",
        "--curvature.damping_rule",
        "absolute",
        "--curvature.damping",
        "0.5",
        "--curvature.compute_dtype",
        "float64",
        "--query.files",
        str(queries),
        "--query.save_scores",
        "true",
        "--query.top_k",
        "5",
        "--run.index_dir",
        str(index_dir),
        "--run.progress",
        "off",
        "--run.backend",
        "single",
    ]
