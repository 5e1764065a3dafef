"""Brute-force float64 references: per-example weight gradients by plain autograd, one
example at a time, projected densely, and the influence formula with a dense inverse."""

from __future__ import annotations

import torch

from lorif_dist.data import IGNORE_INDEX, Example
from lorif_dist.modeling import LayerSpec
from lorif_dist.projection import LayerProjection


def example_loss(model, example: Example, reduction: str = "sum") -> torch.Tensor:
    """Loss of one unpadded example through the model's ordinary forward (all logits)."""
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor(example.labels[1:])
    logits = model(input_ids=ids).logits[0, :-1]
    keep = labels != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    return loss / keep.sum() if reduction == "mean" else loss


def weight_gradients(model, specs: list[LayerSpec], example: Example, reduction: str = "sum"):
    """{layer: dL/dW in (in_features x out_features) orientation} for one example."""
    modules = dict(model.named_modules())
    weights = [modules[s.name].weight for s in specs]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(example_loss(model, example, reduction), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    # nn.Linear stores W as (out, in); GPT-2's Conv1D as (in, out).
    return {s.name: (g.T if s.kind == "linear" else g) for s, g in zip(specs, grads, strict=False)}


def projected_gradients(
    model, specs, projections: dict[str, LayerProjection], examples, reduction="sum"
):
    """{layer: [n, d1 * d2]} of P_in^T dW P_out, flattened row-major."""
    out: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    for ex in examples:
        for name, grad in weight_gradients(model, specs, ex, reduction).items():
            proj = projections[name]
            g = grad.double()
            if proj.p_in is not None:
                g = proj.p_in.double().T @ g @ proj.p_out.double()
            out[name].append(g.flatten())
    return {name: torch.stack(rows) for name, rows in out.items()}


def brute_force_scores(
    train: dict[str, torch.Tensor],
    queries: dict[str, torch.Tensor],
    damping: float | dict[str, float],
    targets: dict[str, torch.Tensor] | None = None,
):
    """sum over layers of g_q^T (G^T G + lambda I)^-1 g_t, dense, [num_queries, num_train].

    `damping` is one lambda for every layer, or a lambda per layer name. G is always the
    training gradients; the g_t scored against are `targets` when given (e.g. the queries
    themselves, for I(q, q)), [num_queries, num_targets]."""
    total = None
    for name, g_train in train.items():
        lam = damping[name] if isinstance(damping, dict) else damping
        gram = g_train.T @ g_train + lam * torch.eye(g_train.shape[1], dtype=torch.float64)
        h = torch.linalg.solve(gram, queries[name].T).T  # [Q, D]
        scores = h @ (g_train if targets is None else targets[name]).T
        total = scores if total is None else total + scores
    return total
