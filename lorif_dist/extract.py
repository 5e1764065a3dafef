"""Stage 1, extract: per-example projected gradients -> rank-c factors in HDF5 shards.

Work assignment is deterministic: examples are ordered by length (longest first, ties by
id) and dealt round-robin to array tasks, then to ranks, so every (task, rank) gets a
similar number of tokens and can be rerun alone. Each (task, rank) writes only its own shard.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch

from lorif_dist import __version__
from lorif_dist.capture import GradientCapture
from lorif_dist.config import Config
from lorif_dist.data import Example, collate, fingerprint, load_examples, token_budget_batches
from lorif_dist.distributed import Runtime
from lorif_dist.factorize import factorize, start_block
from lorif_dist.fingerprints import data_files_fingerprint, tokenizer_fingerprint
from lorif_dist.integrity import record_extract_run, shard_lock
from lorif_dist.logging_utils import Timer, human_bytes, logger, progress, summary
from lorif_dist.manifest import identity_config, load_manifest, open_or_create, record_shard
from lorif_dist.modeling import (
    TORCH_DTYPES,
    LayerSpec,
    load_model,
    load_tokenizer,
    model_fingerprint,
    per_example_loss,
    select_layers,
)
from lorif_dist.parallel import (
    dummy_batch,
    load_sharded_model,
    lockstep_passes,
    release_after_backward,
    run_discarded_passes,
    warn_launcher_mismatch,
)
from lorif_dist.projection import build_projections, layer_seed, projection_hash
from lorif_dist.storage import (
    FactorBlock,
    ShardCorruptError,
    ShardWriter,
    concat_blocks,
    dense_to_storage,
    file_sha256,
    shard_name,
    shard_path,
    to_storage,
)


class GradientExtractor:
    """A model with hooks on its tracked layers, turning batches into projected gradients.

    Shared by extraction (train side) and query (query side), so both sides use the same
    layers, projections, loss and dtype by construction.
    """

    def __init__(self, cfg: Config, runtime: Runtime, model: Any = None, tokenizer: Any = None):
        self.cfg = cfg
        self.runtime = runtime
        self.acc_dtype = TORCH_DTYPES[cfg.extract.accumulate_dtype]
        if cfg.model.dtype == "float64":
            self.acc_dtype = torch.float64
        self.tokenizer = tokenizer or load_tokenizer(
            cfg.model.name_or_path, cfg.model.trust_remote_code
        )
        if model is None:
            model = self._load_model()
        self.model = model
        self.specs: list[LayerSpec] = select_layers(
            model, cfg.extract.layers, cfg.extract.exclude_layers
        )
        self.projections = {
            name: proj.to(runtime.device)
            for name, proj in build_projections(
                self.specs, cfg.extract.projection_factor, cfg.extract.seed, self.acc_dtype
            ).items()
        }
        # The dense baselines (logra, graddot) store whole projected gradients: no factors.
        self.dense_storage = cfg.extract.method != "lorif"
        self.factor_ranks = {
            name: min(p.d1, p.d2) if cfg.extract.exact_factors else cfg.extract.factor_rank
            for name, p in self.projections.items()
        }
        for proj in [] if self.dense_storage else self.projections.values():
            if self.factor_ranks[proj.spec.name] > min(proj.d1, proj.d2):
                raise ValueError(
                    f"extract.factor_rank={cfg.extract.factor_rank} exceeds min(d1, d2) = "
                    f"{min(proj.d1, proj.d2)} of layer {proj.spec.name!r} "
                    f"(d1={proj.d1}, d2={proj.d2}); lower factor_rank or projection_factor"
                )
        self.capture = GradientCapture(self.model, self.projections, self.acc_dtype)
        self.capture.__enter__()

    def _load_model(self) -> Any:
        cfg = self.cfg
        warn_launcher_mismatch(cfg, self.runtime)
        if cfg.run.parallel != "none":
            return load_sharded_model(cfg, self.runtime)
        model = load_model(
            cfg.model.name_or_path,
            cfg.model.dtype,
            cfg.model.trust_remote_code,
            self.runtime.device,
        )
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model

    def close(self) -> None:
        self.capture.__exit__(None, None, None)

    def batch_gradients(
        self, batch: Sequence[Example]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Per-example losses [B], projected gradients {layer: [B, d1, d2]}, finite mask [B]."""
        pad_id = self.tokenizer.pad_token_id
        enc = collate(batch, pad_id, self.cfg.extract.padding_side)
        enc = {k: v.to(self.runtime.device) for k, v in enc.items()}
        self.capture.begin(enc["attention_mask"])
        with torch.enable_grad():
            losses = per_example_loss(self.model, enc, self.cfg.extract.loss_reduction)
            losses.sum().backward()
        if self.cfg.run.parallel == "zero3":
            release_after_backward(self.model)
        grads = self.capture.collect()
        finite = torch.isfinite(losses.detach())
        for grad in grads.values():
            finite &= torch.isfinite(grad).flatten(1).all(dim=1)
        return losses.detach(), grads, finite

    def factor_block(self, batch: Sequence[Example]) -> FactorBlock:
        """Factors of one batch, on the CPU in stored dtypes; non-finite examples dropped."""
        losses, grads, finite = self.batch_gradients(batch)
        keep = finite.nonzero(as_tuple=True)[0]
        kept_ids = [batch[i].example_id for i in keep.tolist()]
        left, right, scale, dense = self.stored_arrays({n: g[keep] for n, g in grads.items()})
        return FactorBlock(
            example_ids=np.asarray(kept_ids, dtype=np.int64),
            losses=losses[keep].float().cpu().numpy(),
            num_tokens=np.asarray([batch[i].num_tokens for i in keep.tolist()], dtype=np.int32),
            left=left,
            right=right,
            scale=scale,
            skipped_ids=[
                b.example_id for b, ok in zip(batch, finite.tolist(), strict=False) if not ok
            ],
            dense=dense,
        )

    def stored_arrays(self, grads: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict]:
        """Per-example gradients {layer: [n, d1, d2]} -> (left, right, scale, dense) arrays
        as stored: rank-c factors, or the dense rows of the baselines."""
        ex = self.cfg.extract
        left, right, scale, dense = {}, {}, {}, {}
        for name, grad in grads.items():
            if self.dense_storage:
                rows = grad.reshape(grad.shape[0], -1)  # [n, d1 * d2], row-major
                dense[name], scale[name] = dense_to_storage(rows, ex.storage_dtype)
                continue
            rank = self.factor_ranks[name]
            start = start_block(
                grad.shape[2], rank, layer_seed(ex.seed, name, "factor"), grad.dtype
            )
            l_f, s_f, r_f = factorize(grad, rank, ex.factor_method, ex.power_iters, start)
            left[name], scale[name], right[name] = to_storage(l_f, s_f, r_f, ex.storage_dtype)
        return left, right, scale, dense

    def layer_table(self) -> list[dict[str, Any]]:
        return [
            {
                **spec.to_dict(),
                "d1": self.projections[spec.name].d1,
                "d2": self.projections[spec.name].d2,
                "c": None if self.dense_storage else self.factor_ranks[spec.name],
            }
            for spec in self.specs
        ]

    def identity(self, dataset_fingerprint: str) -> dict[str, Any]:
        """What the stored values depend on; an index refuses a run whose identity differs."""
        return {**self._fixed_identity, "dataset_fingerprint": dataset_fingerprint}

    @functools.cached_property
    def _fixed_identity(self) -> dict[str, Any]:
        """The identity apart from the examples, computed once per extractor: it hashes the
        model, tokenizer and data files, which `lorif run` would otherwise hash again for
        the query stage."""
        cfg = self.cfg
        return {
            "config": identity_config(cfg.to_dict()),
            "model": model_fingerprint(self.model, cfg.model.name_or_path),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "dataset_files": data_files_fingerprint(cfg.data.train_files),
            "projection": {
                "seed": cfg.extract.seed,
                "factor": cfg.extract.projection_factor,
                "hash": projection_hash(self.projections),
            },
            "layers": self.layer_table(),
        }


def assign_examples(
    examples: Sequence[Example], task_id: int, num_tasks: int, rank: int, world_size: int
) -> list[Example]:
    """This (task, rank)'s examples: length-sorted, dealt round-robin to tasks then ranks."""
    order = sorted(examples, key=lambda ex: (-ex.num_tokens, ex.example_id))
    return order[task_id::num_tasks][rank::world_size]


def load_train_examples(cfg: Config, tokenizer: Any):
    d = cfg.data
    return load_examples(
        tokenizer,
        d.train_files,
        d.format,
        d.max_length,
        d.chat_template,
        d.system_prompt,
        d.template_vars,
        d.limit,
    )


@dataclass
class ExtractResult:
    num_examples: int
    num_tokens: int
    num_skipped: int
    bytes_written: int
    seconds: float


def run_extract(
    cfg: Config, runtime: Runtime, extractor: GradientExtractor | None = None
) -> ExtractResult:
    """Extracts this process's shard of the index (one array task, one rank)."""
    timer = Timer()
    coll = runtime.collective
    # Prepare: model, data, manifest, this shard's work.
    extractor = extractor or GradientExtractor(cfg, runtime)
    examples, report = load_train_examples(cfg, extractor.tokenizer)
    dataset_info = {
        "num_records": report.num_records,
        "num_examples": len(examples),
        "num_truncated": report.num_truncated,
        "skipped": {str(k): v for k, v in report.skipped.items()},
        "max_length": cfg.data.max_length,
        "loss_reduction": cfg.extract.loss_reduction,
    }
    identity = extractor.identity(fingerprint(examples))
    layout = {"num_tasks": runtime.num_tasks, "world_size": runtime.world_size}
    open_or_create(cfg.run.index_dir, identity, layout, dataset_info, __version__)
    from lorif_dist.manifest import update_section

    if runtime.is_main:
        update_section(cfg.run.index_dir, "config", cfg.to_dict())
        record_extract_run(cfg)
        logger.info(
            "extract: %s, %d examples (%d skipped, %d truncated at %d tokens), %d layers, f=%d, "
            "c=%s, %d task(s) x %d rank(s), index %s",
            cfg.extract.method,
            len(examples),
            len(report.skipped),
            report.num_truncated,
            cfg.data.max_length,
            len(extractor.specs),
            cfg.extract.projection_factor,
            cfg.extract.factor_rank if not extractor.dense_storage else "none (dense rows)",
            runtime.num_tasks,
            runtime.world_size,
            cfg.run.index_dir,
        )
    mine = assign_examples(
        examples, runtime.task_id, runtime.num_tasks, runtime.rank, runtime.world_size
    )
    batches = token_budget_batches(mine, cfg.extract.batch_tokens, cfg.extract.max_batch_size)
    writer = ShardWriter(
        shard_path(cfg.run.index_dir, runtime.task_id, runtime.rank),
        cfg.section_hash("model", "data", "extract"),
        {n: (p.d1, p.d2, extractor.factor_ranks[n]) for n, p in extractor.projections.items()},
        cfg.extract.storage_dtype,
        layout="dense" if extractor.dense_storage else "factors",
    )
    # One process per (task, rank): a second one fails here instead of interleaving parts.
    with shard_lock(writer.path):
        done = len(batches) if writer.complete else writer.resume_point()
        if done:
            logger.info(
                "extract: %s resumes after %d of %d batches",
                shard_name(runtime.task_id, runtime.rank),
                done,
                len(batches),
            )

        # A sharded model gathers weights in every pass, so a rank with fewer batches left
        # (or a finished shard, or no examples) runs discarded passes until the busiest is done.
        num_extra = lockstep_passes(cfg, runtime, len(batches) - done)

        # Local work: batches -> factors -> parts on disk every flush_examples examples.
        stats = _extract_batches(cfg, runtime, extractor, writer, batches, done)
        stats["resumed_batches"] = done

        # Write: join parts into the shard, record it in the manifest. A rank that finished
        # early saves its shard before keeping step with the others, so a crash elsewhere
        # costs it nothing.
        _finish_shard(cfg, runtime, writer, stats)
    if num_extra:
        run_discarded_passes(extractor, dummy_batch(examples), num_extra)
    coll.barrier()

    # Summary across ranks: totals, and the slowest rank's time.
    totals = coll.all_reduce_sum(
        torch.tensor(
            [
                stats["examples"],
                stats["tokens"],
                len(stats["skipped_ids"]),
                stats["bytes"],
                len(mine),
                sum(len(b) for b in batches[:done]),
            ],
            dtype=torch.float64,
        )
    ).tolist()
    seconds = coll.max_float(timer.seconds)
    result = ExtractResult(int(totals[0]), int(totals[1]), int(totals[2]), int(totals[3]), seconds)
    # examples: computed by this run; task_examples: this array task's share of the data,
    # resumed_examples: the part of it earlier runs had already written.
    summary(
        "extract",
        examples=result.num_examples,
        task_examples=int(totals[4]),
        resumed_examples=int(totals[5]),
        tokens=result.num_tokens,
        skipped_nonfinite=result.num_skipped,
        examples_per_s=result.num_examples / max(seconds, 1e-9),
        written=human_bytes(result.bytes_written),
        seconds=seconds,
    )
    return result


def _extract_batches(
    cfg: Config,
    runtime: Runtime,
    extractor: GradientExtractor,
    writer: ShardWriter,
    batches: list[list[Example]],
    done: int,
) -> dict[str, Any]:
    stats: dict[str, Any] = {"examples": 0, "tokens": 0, "bytes": 0, "skipped_ids": []}
    timer = Timer()
    pending: list[FactorBlock] = []
    part_start = done
    todo = range(done, len(batches))
    for index in progress(todo, len(todo), "extract", cfg.run.progress, unit="batch"):
        batch = batches[index]
        block = extractor.factor_block(batch)
        pending.append(block)
        stats["examples"] += block.num_examples
        stats["tokens"] += int(sum(ex.num_tokens for ex in batch))
        stats["skipped_ids"].extend(block.skipped_ids)
        if block.skipped_ids:
            logger.warning(
                "extract: non-finite loss or gradient, skipped examples %s", block.skipped_ids
            )
        # Per batch, at debug level (LORIF_LOG_LEVEL=DEBUG): a killed run's log shows how
        # much work was done after its last part, i.e. what a resume redoes.
        logger.debug("extract: batch %d of %d done (%d examples)", index, len(batches), len(batch))
        if sum(b.num_examples + len(b.skipped_ids) for b in pending) >= cfg.extract.flush_examples:
            stats["bytes"] += writer.write_part(concat_blocks(pending), part_start, index + 1)
            logger.debug("extract: part written, batches [%d, %d)", part_start, index + 1)
            pending, part_start = [], index + 1
    if pending:
        stats["bytes"] += writer.write_part(concat_blocks(pending), part_start, len(batches))
        logger.debug("extract: part written, batches [%d, %d)", part_start, len(batches))
    stats["seconds"] = timer.seconds
    return stats


def _finish_shard(
    cfg: Config, runtime: Runtime, writer: ShardWriter, stats: dict[str, Any]
) -> None:
    """Joins the parts into the shard (unless done before) and records it in the manifest.

    A process killed between publishing a shard and recording it leaves a complete shard
    the manifest does not list; the rerun records it then. A finished shard found on a
    rerun is hashed and compared with its manifest entry before it is trusted again.
    """
    name = shard_name(runtime.task_id, runtime.rank)
    if writer.complete:
        if writer.parts_dir.is_dir():  # killed after the rename, before the clean-up
            shutil.rmtree(writer.parts_dir)
        entry = load_manifest(cfg.run.index_dir)["shards"].get(name)
        sha = file_sha256(writer.path)
        if entry is not None:
            if entry["sha256"] != sha or entry["bytes"] != writer.path.stat().st_size:
                raise ShardCorruptError(
                    f"shard {writer.path} no longer matches its manifest entry (SHA-256 {sha}, "
                    f"recorded {entry['sha256']}); delete it and rerun this command"
                )
            return
        logger.warning("extract: %s was finished but not recorded; recording it now", name)
    else:
        _, sha = writer.finalize()
    with h5py.File(writer.path, "r") as h5:
        num_stored = int(h5["example_id"].shape[0])
        skipped = h5["skipped_example_id"][...].tolist()  # from every part, resumed or not
    record_shard(
        cfg.run.index_dir,
        name,
        {
            "num_examples": num_stored,
            "bytes": writer.path.stat().st_size,
            "sha256": sha,
            "skipped_nonfinite": skipped,
            # This run's share of the work, for throughput (`lorif plan --from-index`).
            "examples_computed": stats["examples"] + len(stats["skipped_ids"]),
            "tokens_computed": stats["tokens"],
            "seconds": stats["seconds"],
        },
    )
