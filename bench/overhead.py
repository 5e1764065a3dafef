"""Extraction overhead: capture + projection + factorization over the floor of the same work.

The floor is what any tool that captures per-example gradients of the tracked layers has to
run: the forward pass and an activation-only backward (weights frozen, the graph starting
at the first tracked layer's output, exactly as extraction starts it) over the same
length-sorted, token-budget batches, with no hooks doing work. Extraction is
`GradientExtractor.factor_block`: the same passes with the capture hooks (X P_in in the
forward hook, dY P_out and the per-example contraction in the gradient hook), then the
rank-c factorization (or the dense rows for logra) and the cast to the stored dtypes.

Timing on a shared machine is noisy, so the two are interleaved batch by batch and each
batch keeps its fastest of `--rounds` repeats; the ratio is the sum of extraction minima
over the sum of floor minima. With one torch thread (the default) the times are the
process's CPU seconds, which other processes on the machine do not inflate; with more
threads, wall seconds. The breakdown separates the capture (forward + backward with hooks)
from the factorization.

    python -m bench.overhead --config configs/demo.yaml --limit 96 [--section.field VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, demo_overrides, write_json
from lorif_dist.config import load_config
from lorif_dist.data import collate, token_budget_batches
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, load_train_examples
from lorif_dist.modeling import per_example_loss


def floor_pass(extractor: GradientExtractor, batch) -> None:
    """Forward + activation-only backward of one batch, the capture hooks idle."""
    enc = collate(batch, extractor.tokenizer.pad_token_id, extractor.cfg.extract.padding_side)
    enc = {k: v.to(extractor.runtime.device) for k, v in enc.items()}
    with torch.enable_grad():
        losses = per_example_loss(extractor.model, enc, extractor.cfg.extract.loss_reduction)
        losses.sum().backward()


def _start_graph_hooks(extractor: GradientExtractor) -> list:
    """What the floor keeps of the capture: the first tracked output requires grad."""

    def hook(module, args, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)
        return output

    modules = dict(extractor.model.named_modules())
    return [modules[s.name].register_forward_hook(hook) for s in extractor.specs]


CLOCK = time.process_time  # set to time.perf_counter with more than one thread


def _timed(fn, *args) -> tuple[float, Any]:
    start = CLOCK()
    out = fn(*args)
    return CLOCK() - start, out


def measure(extractor: GradientExtractor, batches: list, rounds: int) -> dict[str, Any]:
    """Per batch minima over rounds of floor, capture and factorization seconds."""
    num = len(batches)
    floor, capture, factor = (np.full((rounds, num), np.inf) for _ in range(3))
    # Warm-up: allocator, thread pools and lazy inits must not land in the first batch.
    extractor.factor_block(batches[-1])
    for r in range(rounds):
        for i, batch in enumerate(batches):
            # Floor: capture hooks removed, only the graph-starting hook.
            extractor.capture.__exit__(None, None, None)
            hooks = _start_graph_hooks(extractor)
            floor[r, i], _ = _timed(floor_pass, extractor, batch)
            for h in hooks:
                h.remove()
            extractor.capture.__enter__()
            capture[r, i], (_, grads, _) = _timed(extractor.batch_gradients, batch)
            factor[r, i], _ = _timed(extractor.stored_arrays, grads)
    f, c, z = floor.min(0), capture.min(0), factor.min(0)
    return {
        "num_batches": num,
        "num_examples": sum(len(b) for b in batches),
        "num_tokens": int(sum(len(b) * b[0].num_tokens for b in batches)),
        "rounds": rounds,
        "floor_seconds": float(f.sum()),
        "capture_seconds": float(c.sum()),
        "factor_seconds": float(z.sum()),
        "extract_seconds": float((c + z).sum()),
        "ratio": float((c + z).sum() / f.sum()),
        "capture_ratio": float(c.sum() / f.sum()),
        "floor_examples_per_s": float(sum(len(b) for b in batches) / f.sum()),
        "extract_examples_per_s": float(sum(len(b) for b in batches) / (c + z).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--limit", type=int, default=None, help="first N training examples")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="result file stem under bench/results")
    args, rest = parser.parse_known_args(argv)
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    overrides = demo_overrides(args.config) + rest
    if args.limit:
        overrides += ["--data.limit", str(args.limit)]
    cfg = load_config(args.config, overrides)
    extractor = GradientExtractor(cfg, init_runtime(cfg.model.device, "single"))
    examples, _ = load_train_examples(cfg, extractor.tokenizer)
    batches = token_budget_batches(examples, cfg.extract.batch_tokens, cfg.extract.max_batch_size)
    result = measure(extractor, batches, args.rounds)
    result.update(
        config=args.config,
        overrides=rest,
        method=cfg.extract.method,
        f=cfg.extract.projection_factor,
        c=cfg.extract.factor_rank,
        model_dtype=cfg.model.dtype,
        threads=torch.get_num_threads(),
        clock="cpu" if CLOCK is time.process_time else "wall",
    )
    name = args.name or f"overhead-{Path(args.config).stem}"
    write_json(RESULTS / f"{name}.json", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
