"""Sharded models for extraction and query: FSDP2 or DeepSpeed ZeRO-3 (`run.parallel`).

With `run.parallel: none` every rank holds the whole model and ranks never talk during a
forward pass. A model that does not fit one device is sharded over all ranks instead, and
each module's weights are gathered just before it runs:

    fsdp    torch's FSDP2: `fully_shard` on every decoder block, then on the root, which
            owns the embeddings, the final norm and the LM head (tied or not). Rank 0 reads
            the checkpoint on the CPU; the other ranks build the model on the meta device
            (no memory); each rank then receives its 1/world_size slice of every tensor by
            broadcast from rank 0. Memory: one CPU copy of the weights on rank 0 while
            loading; per device, its slices plus one gathered block at a time and the
            gathered root (FSDP2 keeps the root whole from forward to backward).
    zero3   DeepSpeed ZeRO-3: the model is built under `deepspeed.zero.Init` (transformers
            does this while an `HfDeepSpeedConfig` is alive), so no rank ever holds all
            weights, then wrapped by `deepspeed.initialize` without an optimizer: the
            ZeRO-Inference setup whose module hooks gather weights before each forward and
            again before each backward.

Weights are frozen in both: autograd computes only activation gradients, so no gradient
reduce-scatter runs and no optimizer state exists. The hooks on tracked layers see full
per-rank activations, because a module's weights are whole while it runs.

Every forward pass all-gathers, so all ranks must run the same number of forward and
backward passes in the same order. `lockstep_passes` says how many extra (discarded)
passes a rank with fewer batches runs; `dummy_batch` is what it runs.

Accelerate's FSDP and DeepSpeed plugins are not used: they configure `Accelerator.prepare`,
which this pipeline does not call (and the FSDP plugin does nothing on CPU). Sharding is
chosen by `run.parallel` alone; `warn_launcher_mismatch` points out an accelerate config
that asks for sharding when `run.parallel` does not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorif_dist.config import Config
from lorif_dist.data import Example
from lorif_dist.distributed import Runtime
from lorif_dist.logging_utils import logger
from lorif_dist.modeling import (
    TORCH_DTYPES,
    _check_checkpoint,
    freeze,
    load_model,
    model_class_name,
)

# DeepSpeed engines and transformers' HfDeepSpeedConfig must outlive the models they set up.
_KEEP_ALIVE: list[Any] = []


def load_sharded_model(cfg: Config, runtime: Runtime) -> nn.Module:
    """The frozen model of `cfg.model`, sharded over all ranks as `cfg.run.parallel` says."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"run.parallel={cfg.run.parallel} shards the model over a torch.distributed process "
            "group, but none is running; launch with torchrun, accelerate launch or srun, or "
            "set --run.parallel none"
        )
    if runtime.collective.name != "torch":
        raise ValueError(
            f"run.parallel={cfg.run.parallel} needs run.backend torch or auto, got "
            f"{cfg.run.backend!r}: the sharded model's collectives go through torch.distributed"
        )
    _check_checkpoint(cfg.model.name_or_path)
    if cfg.run.parallel == "fsdp":
        model = load_fsdp_model(cfg, runtime)
    elif cfg.run.parallel == "zero3":
        model = load_zero3_model(cfg, runtime)
    else:
        raise ValueError(f"run.parallel: expected 'fsdp' or 'zero3', got {cfg.run.parallel!r}")
    if runtime.is_main:
        logger.info(
            "model: %s sharded over %d rank(s) with %s",
            model_class_name(model),
            runtime.world_size,
            cfg.run.parallel,
        )
    return model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the model's `_no_split_modules` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no decoder block class in _no_split_modules "
            f"({sorted(names)}); run.parallel fsdp shards one block at a time and cannot find "
            "them: use run.parallel zero3 (per-module) or none"
        )
    return blocks


# ---------------------------------------------------------------------------------------
# FSDP2.


def load_fsdp_model(cfg: Config, runtime: Runtime) -> nn.Module:
    """FSDP2 `fully_shard` per decoder block, then the root; weights from rank 0's copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = cfg.model
    # Rank 0 reads the real weights on the CPU; the others allocate nothing yet.
    if runtime.rank == 0:
        model = load_model(m.name_or_path, m.dtype, m.trust_remote_code, device=None)
        full_state = model.state_dict()  # references to rank 0's CPU tensors, kept until sent
    else:
        model = _meta_model(cfg)
        full_state = {}
    if m.gradient_checkpointing:
        # Before sharding, so recomputation re-enters FSDP's own unshard hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Shard: each block is its own all-gather unit; the root holds the rest (embeddings,
    # final norm, head), so a tied embedding and head share one sharded parameter.
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if runtime.rank != 0:
        model.to_empty(device=runtime.device)

    # Every rank keeps its slice of each tensor, broadcast from rank 0 one tensor at a time.
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    del full_state
    # Non-persistent buffers (rotary frequencies) are not in any state dict: send them too.
    for _, buffer in sorted(model.named_buffers()):
        buffer.copy_(runtime.collective.broadcast(buffer, src=0))
    freeze(model)
    return model


def _meta_model(cfg: Config) -> nn.Module:
    """The model's architecture with parameters on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=TORCH_DTYPES[m.dtype], trust_remote_code=m.trust_remote_code
        )
    freeze(model)
    return model


# ---------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3.

ZERO3_DEFAULTS: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
    },
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 1 << 30,
    "wall_clock_breakdown": False,
}


def zero3_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config: run.deepspeed_config (or accelerate's file) or the defaults,
    with the fields this pipeline needs forced: stage 3, the model's dtype, no optimizer."""
    path = cfg.run.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"run.deepspeed_config={path!r} does not exist")
        ds = json.loads(Path(path).read_text())
    else:
        ds = json.loads(json.dumps(ZERO3_DEFAULTS))
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        logger.warning("DeepSpeed config %s: stage %s replaced by 3", path, zero.get("stage"))
    zero["stage"] = 3
    for key in ("optimizer", "scheduler"):
        if ds.pop(key, None) is not None:
            logger.warning("DeepSpeed config %s: %r ignored, weights are frozen", path, key)
    # Batch sizes only feed DeepSpeed's bookkeeping ("auto" is accelerate's placeholder).
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x world
    dtype = cfg.model.dtype
    if dtype == "float64":
        raise ValueError(
            "run.parallel=zero3 supports model.dtype float32, bfloat16 or float16 (DeepSpeed "
            "partitions no float64 parameters); got float64"
        )
    # zero.Init casts parameters to the dtype enabled here: it must match model.dtype.
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bfloat16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == "float16"}
    return ds


def load_zero3_model(cfg: Config, runtime: Runtime) -> nn.Module:
    """The model built partitioned under `deepspeed.zero.Init`, hooked by ZeRO-Inference."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    m = cfg.model
    # DeepSpeed joins the process group already running (gloo on CPU, NCCL on GPU).
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    ds_config = zero3_config(cfg)
    # While this object lives, from_pretrained builds under deepspeed.zero.Init and loads
    # each tensor straight into its partitions.
    hf_ds = HfDeepSpeedConfig(ds_config)
    model = load_model(m.name_or_path, m.dtype, m.trust_remote_code, device=None)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # No optimizer: DeepSpeed sets up parameter hooks only (DeepSpeedZeRoOffload).
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    _KEEP_ALIVE.append((engine, hf_ds))
    model = engine.module
    freeze(model)
    return model


def release_after_backward(model: nn.Module) -> None:
    """Frees weights ZeRO-3 gathered for a backward that stopped early.

    Backward starts at the first tracked layer, so the modules below it never run their
    post-backward hook; without this their gathered weights would stay resident.
    """
    for engine, _ in _KEEP_ALIVE:
        if engine.module is model:
            offload = getattr(engine, "optimizer", None)
            if hasattr(offload, "release_backward_leftovers"):
                offload.release_backward_leftovers()


# ---------------------------------------------------------------------------------------
# Lockstep.


def lockstep_passes(cfg: Config, runtime: Runtime, num_passes: int) -> int:
    """Extra passes this rank runs so every rank runs as many as the busiest (0 unsharded)."""
    if cfg.run.parallel == "none" or runtime.world_size == 1:
        return 0
    return max(runtime.collective.all_gather_object(int(num_passes))) - num_passes


def run_discarded_passes(extractor: Any, batch: list[Example], num_passes: int) -> None:
    """Forward and backward passes whose results are dropped (lockstep with other ranks)."""
    for _ in range(num_passes):
        extractor.batch_gradients(batch)


def dummy_batch(examples: Sequence[Example]) -> list[Example]:
    """A one-example batch every rank has (the shortest example), for discarded passes."""
    return [min(examples, key=lambda ex: (ex.num_tokens, ex.example_id))]


def warn_launcher_mismatch(cfg: Config, runtime: Runtime) -> None:
    """Warns (once, on rank 0) when accelerate was told to shard but run.parallel was not."""
    wants = None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        wants = "fsdp"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        wants = "zero3"
    if wants and cfg.run.parallel != wants and runtime.is_main:
        logger.warning(
            "accelerate config asks for %s sharding, but run.parallel=%s decides here "
            "(accelerate's plugins are not used); pass --run.parallel %s to shard",
            wants,
            cfg.run.parallel,
            wants,
        )
