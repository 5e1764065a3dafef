"""The training recipe of LDS retraining (and of the tiny LDS recipe's attributed model).

A recipe (config section `train`) is: start from the checkpoint `train.init`, take
`train.steps` optimizer steps on batches of `train.batch_size` examples drawn without
replacement from the training subset (a fresh permutation each epoch, seeded), with the
loss averaged over the batch's response tokens (the usual SFT loss), AdamW or SGD, linear
warmup then a constant or cosine learning rate. The examples are tokenized and masked by
data.py exactly as extraction does, and the loss is modeling.per_example_loss.

Given the same init, examples, recipe and seed, training is deterministic on a CPU, so a
killed LDS run that retrains an unfinished subset reproduces what it would have got.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lorif_dist.config import TrainConfig
from lorif_dist.data import IGNORE_INDEX, Example, collate, token_budget_batches
from lorif_dist.logging_utils import logger
from lorif_dist.modeling import per_example_loss


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Positions [steps, batch_size] into the example list: epochs of seeded permutations.

    Batches run across epoch boundaries, so every example is seen equally often (up to one).
    """
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    epochs = [rng.permutation(num_examples) for _ in range(-(-need // num_examples))]
    return np.concatenate(epochs)[:need].reshape(steps, batch_size)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_model(
    model: nn.Module,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_token_id: int,
    seed: int,
    device: torch.device | str = "cpu",
    log_every: int = 0,
) -> list[float]:
    """Trains `model` in place on `examples` by the recipe; returns the loss of every step.

    Every parameter is trained. The per-step loss is the mean over the batch's response
    tokens, the usual SFT objective. With log_every > 0, logs the mean loss that often.
    """
    if not examples:
        raise ValueError("train_model: no training examples given")
    torch.manual_seed(seed)  # dropout, where a model has any
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(params, cfg)
    order = batch_order(len(examples), cfg.batch_size, cfg.steps, seed)
    model.train()
    losses = []
    for step, positions in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = collate([examples[i] for i in positions], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        num_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = per_example_loss(model, batch, "sum").sum() / max(num_targets, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            logger.info(
                "train: step %d/%d loss %.4f", step + 1, cfg.steps, sum(recent) / len(recent)
            )
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def example_losses(
    model: nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    reduction: str = "sum",
    batch_tokens: int = 8192,
    max_batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Per-example losses [n] in the order given (sum: minus the response's log-probability).

    Computed in float64 on the way out; batching and padding do not change the values
    beyond floating-point summation order (per_example_loss masks padding).
    """
    position = {id(ex): i for i, ex in enumerate(examples)}
    out = np.zeros(len(examples), dtype=np.float64)
    was_training = model.training
    model.eval()
    for batch in token_budget_batches(list(examples), batch_tokens, max_batch_size):
        enc = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
        losses = per_example_loss(model, enc, reduction).double().cpu().numpy()
        for ex, value in zip(batch, losses, strict=True):
            out[position[id(ex)]] = value
    model.train(was_training)
    return out
