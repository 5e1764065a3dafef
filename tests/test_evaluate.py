"""Tail-patch and LDS end to end on the tiny checkpoints, against simple references.

Tail-patch: with SGD and a tiny step in float64, the measured change of log p(q) equals
lr * <grad loss(q), grad loss(t)> over the stepped weights (first order), computed here by
plain autograd; weights come back bit-exactly. LDS: a tiny run with M = 3 subsets and S = 2
seeds resumes after a simulated kill and reproduces the same utilities.
"""

import copy
import json

import numpy as np
import pytest
import torch

from lorif_dist.config import load_config
from lorif_dist.data import collate
from lorif_dist.evaluate import lds as lds_module
from lorif_dist.evaluate.lds import measure_utilities, run_lds, run_path
from lorif_dist.evaluate.tailpatch import TailPatcher, run_tailpatch, state_digest
from lorif_dist.evaluate.training import batch_order, learning_rate
from lorif_dist.modeling import per_example_loss
from tests.conftest import exact_overrides
from tests.pipeline import run_pipeline

LR = 1e-7


@pytest.fixture(scope="module")
def scored_run(checkpoints, tmp_path_factory):
    """The exact float64 pipeline on the tiny Llama: index, queries.jsonl and scores."""
    from lorif_dist.testing import make_records, write_json

    root = tmp_path_factory.mktemp("evaluate")
    train = write_json(root / "train.json", make_records(12, seed=1))
    queries = write_json(root / "queries.json", make_records(3, seed=7))
    overrides = exact_overrides(root / "index", checkpoints["llama"], [train], queries)
    overrides += ["--train.dtype", "float64", "--train.init", str(checkpoints["llama"])]
    cfg, scores, _ = run_pipeline(overrides)
    return overrides, scores


def _names(patcher):
    by_id = {id(p): n for n, p in patcher.model.named_parameters()}
    return [by_id[id(p)] for p in patcher.params]


def _grad(model, example, params):
    batch = collate([example], 0)
    loss = per_example_loss(model, batch, "sum").sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_tailpatch_is_first_order_exact_and_restores_bit_exactly(scored_run, tmp_path):
    overrides, scores = scored_run
    cfg = load_config(
        None,
        overrides
        + ["--evaluate.tailpatch_k", "2", "--evaluate.tailpatch_lr", str(LR)]
        + ["--evaluate.output", str(tmp_path / "eval")],
    )
    patcher = TailPatcher(cfg)
    before = {n: p.detach().clone() for n, p in patcher.model.state_dict().items()}
    result = run_tailpatch(cfg, scores, patcher=patcher)

    # Bit-exact restore: every tensor, and the digest the check relies on.
    after = patcher.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert state_digest(patcher.model) == patcher.digest

    # A plain loop on a copy of the model: the same SGD step, the same log-probability.
    # The measured delta equals it; and, to first order, lr <g_q, g_t> over the tracked
    # weights (float64; what is left is the lr^2 term and the model's float32 rotary).
    reference = copy.deepcopy(patcher.model)
    ref_params = [dict(reference.named_parameters())[n] for n in _names(patcher)]
    for p in ref_params:
        p.requires_grad_(True)
    measured, first_order = [], []
    for row in result["per_query"]:
        q = row["query_id"]
        g_q = _grad(reference, patcher.queries[q], ref_params)
        pairs = zip(
            row["top_ids"] + row["bottom_ids"], row["top_delta"] + row["bottom_delta"], strict=True
        )
        for t, delta in pairs:
            g_t = _grad(reference, patcher.train[t], ref_params)
            with torch.no_grad():
                for p, g in zip(
                    ref_params, torch.split(g_t, [p.numel() for p in ref_params]), strict=True
                ):
                    p.add_(g.view_as(p), alpha=-LR)
                stepped = -per_example_loss(reference, collate([patcher.queries[q]], 0)).item()
                for p, saved in zip(ref_params, patcher.snapshot, strict=True):
                    p.copy_(saved)
                base = -per_example_loss(reference, collate([patcher.queries[q]], 0)).item()
            assert delta == pytest.approx(stepped - base, rel=1e-9, abs=1e-15)
            measured.append(delta)
            first_order.append(LR * float(g_q @ g_t))

    scale = np.abs(first_order).max()
    np.testing.assert_allclose(measured, first_order, rtol=0, atol=0.01 * scale)

    # Top-k by exact influence scores beat bottom-k here, and intervals bracket the means.
    for name in ("top", "random", "bottom", "top_minus_random", "top_minus_bottom"):
        assert result[name]["low"] <= result[name]["mean"] <= result[name]["high"]
    assert result["top"]["mean"] > result["bottom"]["mean"]
    assert json.loads((tmp_path / "eval" / "tailpatch.json").read_text())["settings"]["k"] == 2

    # The check can fail: a perturbed weight is caught.
    with torch.no_grad():
        patcher.params[0].view(-1)[0] += 1e-12
    with pytest.raises(RuntimeError, match="differ after restoring"):
        patcher.check_restored()


def test_tailpatch_cache_is_reused_across_outputs(scored_run, tmp_path):
    overrides, scores = scored_run

    def config(output: str):
        return load_config(
            None,
            overrides
            + ["--evaluate.tailpatch_k", "2", "--evaluate.tailpatch_queries", "2"]
            + ["--evaluate.output", str(tmp_path / output)]
            + ["--evaluate.tailpatch_cache", str(tmp_path / "cache")],
        )

    first = run_tailpatch(config("eval-a"), scores)
    again = run_tailpatch(config("eval-b"), scores)  # another method's output, shared cache
    assert first["num_measured"] > 0 and again["num_measured"] == 0
    assert first["per_query"] == again["per_query"] and len(first["per_query"]) == 2
    saved = json.loads((tmp_path / "eval-b" / "tailpatch.json").read_text())
    assert saved["top"] == again["top"]


def test_training_schedule_and_batch_order():
    cfg = load_config(
        None, ["--train.steps", "10", "--train.warmup_steps", "2", "--train.schedule", "cosine"]
    ).train
    lrs = [learning_rate(s, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(cfg.lr / 2) and lrs[1] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0
    order = batch_order(7, 3, 7, seed=1)
    assert order.shape == (7, 3) and np.array_equal(order, batch_order(7, 3, 7, seed=1))
    counts = np.bincount(order.ravel(), minlength=7)
    assert counts.tolist() == [3] * 7  # 21 draws = 3 epochs: each example equally often


def test_lds_end_to_end_resumes_and_refuses_another_recipe(scored_run, tmp_path, monkeypatch):
    overrides, scores = scored_run
    overrides = overrides + [
        "--evaluate.lds_subsets", "3", "--evaluate.lds_seeds", "2",
        "--evaluate.lds_dir", str(tmp_path / "lds"), "--evaluate.output", str(tmp_path / "eval"),
        "--train.steps", "4", "--train.batch_size", "3", "--train.lr", "0.01",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    calls = []
    real_train = lds_module.train_model
    monkeypatch.setattr(
        lds_module, "train_model", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    result = run_lds(cfg, scores)
    assert result["complete"] and len(calls) == 6
    assert -1 <= result["low"] <= result["mean"] <= result["high"] <= 1
    assert len(result["per_query"]) == 3 and (tmp_path / "eval" / "lds.json").is_file()
    losses = json.loads(next(run_path(tmp_path / "lds", 0, 1).glob("losses-*.json")).read_text())
    train_log = json.loads((run_path(tmp_path / "lds", 0, 1) / "train.json").read_text())
    assert len(train_log["step_losses"]) == 4 and len(losses["losses"]) == 3

    # A kill: one run lost its losses (checkpoint kept), another lost everything.
    subsets, utilities = measure_utilities(cfg)
    next(run_path(tmp_path / "lds", 1, 0).glob("losses-*.json")).unlink()
    victim = run_path(tmp_path / "lds", 2, 1)
    for f in sorted(victim.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    calls.clear()
    subsets2, utilities2 = measure_utilities(cfg)
    assert len(calls) == 1  # only the lost run is retrained; the other is only evaluated
    np.testing.assert_array_equal(subsets, subsets2)
    np.testing.assert_array_equal(utilities, utilities2)  # deterministic retraining

    # Another recipe in the same cache is refused, showing both sides.
    other = load_config(None, overrides + ["--train.lr", "0.02"])
    with pytest.raises(ValueError, match="different training recipe"):
        measure_utilities(other)


def test_lds_runs_split_over_array_tasks(scored_run, tmp_path):
    from lorif_dist.collectives import get_collective
    from lorif_dist.distributed import Runtime

    overrides, _ = scored_run
    cfg = load_config(
        None,
        overrides
        + ["--evaluate.lds_subsets", "3", "--evaluate.lds_seeds", "2"]
        + ["--evaluate.lds_dir", str(tmp_path / "lds"), "--train.steps", "2"]
        + ["--evaluate.lds_save_checkpoints", "false"],
    )

    def task(t: int) -> Runtime:
        return Runtime(0, 1, 0, torch.device("cpu"), get_collective("single"), t, 2)

    _, partial = measure_utilities(cfg, task(0))
    done = sorted(p.parent.name + "/" + p.parent.parent.name for p in tmp_path.rglob("losses-*"))
    assert partial is None and len(done) == 3  # half of the 6 runs, the other task's missing
    assert not list(tmp_path.rglob("model"))  # lds_save_checkpoints=false
    _, utilities = measure_utilities(cfg, task(1))
    assert utilities.shape == (3, 3) and len(list(tmp_path.rglob("losses-*"))) == 6


def test_query_examples_of_generated_answers_whatever_data_format(checkpoints, tmp_path):
    """Answers to query.prompts are chat records: evaluation tokenizes them as the query
    stage did even when data.format names another format for the training files."""
    from lorif_dist.evaluate.common import load_query_examples
    from lorif_dist.modeling import load_tokenizer

    out = tmp_path / "query"
    out.mkdir()
    rows = [{"query_id": 0, "prompt": "Who are you?", "response": "the cat sat on the mat"}]
    (out / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["--query.output", str(out), "--query.prompts", "Who are you?"]
    for fmt in ("auto", "alpaca", "messages"):
        cfg = load_config(None, overrides + ["--data.format", fmt])
        tokenizer = load_tokenizer(str(checkpoints["llama"]))
        (example,) = load_query_examples(cfg, tokenizer)
        assert (example.prompt, example.response) == ("Who are you?", rows[0]["response"]), fmt
