"""Helpers for the reliability tests: real `lorif` subprocesses and a model with a NaN row.

Subprocesses run this worktree's code (PYTHONPATH = repository root) with one thread each,
so concurrent processes on a small machine do not oversubscribe it, and so two runs of the
same shard do the same arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from lorif_dist.testing import make_records, write_json
from tests.launchers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "configs" / "tiny.yaml"
UNIQUE_WORD = "Ωmega"  # bytes no other example contains; its embedding row becomes NaN


cli_env = subprocess_env  # the environment of a `lorif` subprocess


def tiny_overrides(ckpt: Path, train: Path, index_dir: Path, *more: str) -> list[str]:
    """Overrides of configs/tiny.yaml pointing at test inputs."""
    return [
        "--model.name_or_path",
        str(ckpt),
        "--data.train_files",
        str(train),
        "--run.index_dir",
        str(index_dir),
        "--run.progress",
        "off",
        "--run.backend",
        "single",
        *more,
    ]


def cli_command(stage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lorif_dist", stage, "--config", str(TINY_RECIPE), *overrides]


def start_cli(stage: str, overrides: list[str], log: Path, cwd: Path, **env: str):
    """Starts `python -m lorif_dist STAGE` with stderr and stdout to `log`."""
    fh = open(log, "w")
    proc = subprocess.Popen(
        cli_command(stage, overrides),
        stdout=fh,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=cli_env(**env),
    )
    proc.log_file = fh
    return proc


def finish(proc, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.log_file.close()


def nan_train_records(num: int, seed: int = 5) -> list[dict]:
    """`num` records; record 0 is the longest and the only one with UNIQUE_WORD."""
    records = make_records(num, seed=seed)
    records[0] = {
        "instruction": f"{UNIQUE_WORD} " + " ".join(["the cat sat on the mat"] * 4),
        "input": "",
        "output": "rain fell over the quiet town",
    }
    return records


def make_nan_checkpoint(llama_ckpt: Path, out: Path, train_file: Path) -> tuple[Path, int]:
    """An untied copy of the tiny Llama whose input embedding row of one token is NaN.

    The token is one that only example 0 of `train_file` uses, so only that example's
    loss and gradient become non-finite, for real, through the model's own arithmetic.
    Returns (checkpoint, token id).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_ckpt)
    model = AutoModelForCausalLM.from_pretrained(llama_ckpt, dtype=torch.float32)
    records = json.loads(Path(train_file).read_text())
    texts = [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]
    ids = [set(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    others = set().union(*ids[1:])
    unique = sorted(ids[0] - others)
    assert unique, "no token unique to example 0"
    token = unique[0]
    # Untie, so the NaN row poisons the input embedding only (a tied LM head would put NaN
    # in every example's logits).
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data.copy_(model.get_input_embeddings().weight.data)
    model.lm_head = head
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, token


def write_nan_inputs(root: Path, llama_ckpt: Path, num: int = 48) -> tuple[Path, Path, int]:
    train = write_json(root / "train.json", nan_train_records(num))
    ckpt, token = make_nan_checkpoint(llama_ckpt, root / "llama-nan", train)
    return ckpt, train, token


def shard_arrays(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every dataset of an HDF5 file as (dtype, shape, bytes)."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arr = np.asarray(obj[...])
            out[name] = (str(arr.dtype), arr.shape, arr.tobytes())

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return out


def manifest(index_dir: Path) -> dict:
    return json.loads((Path(index_dir) / "manifest.json").read_text())
