"""Configuration: one dataclass per stage, loaded from YAML and `--section.field` overrides.

Every field is validated when the config is built; all problems are collected and raised
once, each naming the field as a user writes it (`extract.factor_rank`), the allowed range
and the value given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float16", "bfloat16", "float32", "float64")
METHODS = ("lorif", "logra", "graddot")
NORMALIZATIONS = ("none", "unit", "cosine")


class ConfigError(ValueError):
    """One or more config fields are invalid; the message lists every problem."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


@dataclass
class ModelConfig:
    """Which causal LM to attribute, and how to run it."""

    # A local Hugging Face checkpoint directory (config.json + weights).
    name_or_path: str = ""
    # Compute dtype of the model's forward and backward passes.
    dtype: str = "float32"
    # "cpu", "cuda", or "auto" (cuda:<local_rank> when CUDA is available).
    device: str = "auto"
    trust_remote_code: bool = False
    # Recompute activations in backward to save memory (non-reentrant checkpointing).
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Training examples: Alpaca (instruction/input/output) or chat `messages` records."""

    # json, jsonl or parquet files; example ids run over them in the order given.
    train_files: list[str] = field(default_factory=list)
    # "auto" detects per file from its first record.
    format: str = "auto"
    max_length: int = 512
    # Use the tokenizer's chat template when it has one (plain "prompt\nresponse" otherwise).
    chat_template: bool = True
    system_prompt: str | None = None
    # Replace "{{key}}" in every text field with the value (e.g. identity data sets).
    template_vars: dict[str, str] = field(default_factory=dict)
    # Keep only the first `limit` examples (None: all).
    limit: int | None = None


@dataclass
class ExtractConfig:
    """Per-example projected gradients and their rank-c factors."""

    # "lorif": rank-c factors, low-rank curvature (Woodbury). Baselines on the same capture
    # and projection: "logra" stores dense projected gradients and inverts the exact damped
    # G^T G (D x D per layer); "graddot" stores them densely and uses no curvature (H = I).
    method: str = "lorif"
    # Regex searched in module names; only nn.Linear / Conv1D modules are considered.
    layers: str = r"(attn|attention|mlp)\.[^.]+$"
    # Regex of module names to leave out even if `layers` matches (None: none).
    exclude_layers: str | None = None
    projection_factor: int = 8
    # Base seed for the random projections; each layer's seed derives from it and its name.
    seed: int = 0
    factor_rank: int = 1
    # Store every layer at rank min(d1, d2) instead: exact factors, for validation.
    exact_factors: bool = False
    # "auto" picks the cheaper of an exact SVD and block power iteration.
    factor_method: str = "auto"
    power_iters: int = 4
    # Per-example loss: "sum" or "mean" over response tokens.
    loss_reduction: str = "sum"
    # Token budget of a batch (padded length x batch size) and a cap on examples per batch.
    batch_tokens: int = 8192
    max_batch_size: int = 64
    padding_side: str = "right"
    # Dtype of projections and accumulated per-example gradients (float64 for exact tests).
    accumulate_dtype: str = "float32"
    # Stored factor dtype: float16 factors are unit-norm columns beside a float32 scale.
    storage_dtype: str = "float16"
    # Write to disk (and update the resume point) every this many examples.
    flush_examples: int = 256


@dataclass
class CurvatureConfig:
    """Randomized SVD of each layer's G^T G and its damping."""

    rank: int = 64
    oversample: int = 16
    power_iters: int = 2
    # "relative": lambda = damping * trace(G^T G) / D (the mean eigenvalue);
    # "absolute": lambda = damping.
    damping_rule: str = "relative"
    damping: float = 0.1
    # Examples per densified block while streaming factors.
    batch_examples: int = 512
    compute_dtype: str = "float32"
    # Cache V^T g_t per training example so the factored query path costs O(c^2 (d1+d2) + r).
    cache_coordinates: bool = True


@dataclass
class QueryConfig:
    """Queries to explain and how to score them."""

    # Query files (same formats as data.train_files) ...
    files: list[str] = field(default_factory=list)
    # ... and/or prompts whose responses the model generates greedily.
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    top_k: int = 10
    # "dense": exact split-Woodbury preconditioned queries dotted with densified factors.
    # "factored": queries factored at rank `factor_rank`, cached train coordinates;
    # "auto": factored when coordinates are cached and it is cheaper.
    path: str = "dense"
    factor_rank: int | None = None
    # Score normalization: "none" (g_q^T H^-1 g_t); "unit": training gradients scaled to unit
    # norm (over all tracked layers); "cosine": the cosine in the metric H^-1, i.e.
    # I(q, t) / sqrt(I(q, q) I(t, t)).
    normalize: str = "none"
    # Also write the full (num_queries x num_train) score matrix.
    save_scores: bool = False
    batch_examples: int = 512
    output: str | None = None


@dataclass
class RunConfig:
    """Where the index lives and how the job is split."""

    index_dir: str = "runs/index"
    # "none": every rank holds the whole model; "fsdp": FSDP2 per decoder block;
    # "zero3": DeepSpeed ZeRO-3 (see lorif_dist/parallel.py and the README's "Launching").
    parallel: str = "none"
    # DeepSpeed JSON for parallel zero3 (default: accelerate's, else built-in settings).
    deepspeed_config: str | None = None
    # Array task split (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when not given).
    task_id: int | None = None
    num_tasks: int | None = None
    # "auto": progress bars only on an interactive terminal; "on"; "off".
    progress: str = "auto"
    # Curvature and query read and reduce over ranks with this collectives backend.
    backend: str = "auto"


@dataclass
class TrainConfig:
    """A training recipe: LDS retrains `init` on each data subset with it (and the tiny
    LDS recipe builds its attributed model with it from the full training set)."""

    # Checkpoint every retraining starts from (a pre-SFT base model, or a fixed random init).
    init: str = ""
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    # "adamw" or "sgd" (plain, no momentum).
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    # Linear warmup, then "constant" or "cosine" decay to zero at `steps`.
    warmup_steps: int = 0
    schedule: str = "constant"
    # Seed of the batch order; seed s of an LDS run uses seed + s.
    seed: int = 0
    # Training and evaluation dtype (float32: small updates vanish in bfloat16 weights).
    dtype: str = "float32"


@dataclass
class EvaluateConfig:
    """Attribution quality: tail-patch and the linear datamodeling score (LDS)."""

    # Where results go (default <index>/evaluate) and where the score matrix is read from
    # (default the query stage's output: query.output or <index>/query).
    output: str | None = None
    scores: str | None = None
    # Tail-patch: one optimizer step on each of a query's top-k, bottom-k and k random
    # training examples; the change in the query's log-probability of its response.
    tailpatch_k: int = 5
    # "sgd" (default): a step along the example's own gradient, the quantity influence
    # approximates; "adam": a fresh Adam's first step, lr * g / (|g| + eps), ~ lr * sign(g).
    tailpatch_optimizer: str = "sgd"
    tailpatch_lr: float = 1e-5
    tailpatch_steps: int = 1
    # "tracked": update only the tracked layers (what the scores model); "all": every weight.
    tailpatch_params: str = "tracked"
    # Use only the first N queries (None: all).
    tailpatch_queries: int | None = None
    # Where each training example's measured effect is cached (default: evaluate.output's
    # folder); methods compared on the same model and queries can share one.
    tailpatch_cache: str | None = None
    # LDS: M subsets of fraction alpha, S retraining seeds each, by the `train` recipe.
    lds_subsets: int = 32
    lds_fraction: float = 0.5
    lds_seeds: int = 1
    # Retrained checkpoints and measured query losses are cached here (default <index>/lds);
    # indexes built from the same model and data can share it.
    lds_dir: str | None = None
    lds_save_checkpoints: bool = True
    # Bootstrap resamples and confidence level of every interval; seed of all random draws.
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        problems = _check(self)
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (what an artifact depends on)."""
        payload = {name: asdict(getattr(self, name)) for name in sections}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _choice(problems: list[str], name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _at_least(problems: list[str], name: str, value: Any, low: float) -> None:
    if not isinstance(value, (int, float)) or value < low:
        problems.append(f"{name}: expected a number >= {low}, got {value!r}")


def _positive(problems: list[str], name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        problems.append(f"{name}: expected a number > 0, got {value!r}")


def _check(cfg: Config) -> list[str]:
    p: list[str] = []
    m, d, e, c, q, r = cfg.model, cfg.data, cfg.extract, cfg.curvature, cfg.query, cfg.run
    _choice(p, "model.dtype", m.dtype, DTYPES)
    if m.device not in ("auto", "cpu", "cuda") and not str(m.device).startswith("cuda:"):
        p.append(f"model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {m.device!r}")
    _choice(p, "data.format", d.format, ("auto", "alpaca", "messages"))
    _at_least(p, "data.max_length", d.max_length, 2)
    if d.limit is not None:
        _at_least(p, "data.limit", d.limit, 1)
    _choice(p, "extract.method", e.method, METHODS)
    _at_least(p, "extract.projection_factor", e.projection_factor, 1)
    _at_least(p, "extract.factor_rank", e.factor_rank, 1)
    _choice(p, "extract.factor_method", e.factor_method, ("auto", "svd", "power"))
    _at_least(p, "extract.power_iters", e.power_iters, 1)
    _choice(p, "extract.loss_reduction", e.loss_reduction, ("sum", "mean"))
    _at_least(p, "extract.batch_tokens", e.batch_tokens, 1)
    _at_least(p, "extract.max_batch_size", e.max_batch_size, 1)
    _choice(p, "extract.padding_side", e.padding_side, ("left", "right"))
    _choice(p, "extract.accumulate_dtype", e.accumulate_dtype, ("float32", "float64"))
    _choice(p, "extract.storage_dtype", e.storage_dtype, ("float16", "float32", "float64"))
    _at_least(p, "extract.flush_examples", e.flush_examples, 1)
    _at_least(p, "curvature.rank", c.rank, 1)
    _at_least(p, "curvature.oversample", c.oversample, 0)
    _at_least(p, "curvature.power_iters", c.power_iters, 0)
    _choice(p, "curvature.damping_rule", c.damping_rule, ("relative", "absolute"))
    _positive(p, "curvature.damping", c.damping)
    _at_least(p, "curvature.batch_examples", c.batch_examples, 1)
    _choice(p, "curvature.compute_dtype", c.compute_dtype, ("float32", "float64"))
    _at_least(p, "query.top_k", q.top_k, 1)
    _at_least(p, "query.max_new_tokens", q.max_new_tokens, 1)
    _choice(p, "query.path", q.path, ("auto", "dense", "factored"))
    if e.method != "lorif" and q.path == "factored":
        p.append(
            f"query.path: 'factored' needs extract.method 'lorif' (the factored path scores "
            f"from rank-c factors); extract.method={e.method!r} stores dense gradients, so use "
            "query.path 'dense' or 'auto'"
        )
    _choice(p, "query.normalize", q.normalize, NORMALIZATIONS)
    if q.factor_rank is not None:
        _at_least(p, "query.factor_rank", q.factor_rank, 1)
    _at_least(p, "query.batch_examples", q.batch_examples, 1)
    _choice(p, "run.parallel", r.parallel, ("none", "fsdp", "zero3"))
    _choice(p, "run.progress", r.progress, ("auto", "on", "off"))
    _choice(p, "run.backend", r.backend, ("auto", "torch", "mpi", "single"))
    if r.num_tasks is not None:
        _at_least(p, "run.num_tasks", r.num_tasks, 1)
    if r.task_id is not None:
        _at_least(p, "run.task_id", r.task_id, 0)
        if r.num_tasks is not None and r.task_id >= r.num_tasks:
            p.append(f"run.task_id: expected < run.num_tasks ({r.num_tasks}), got {r.task_id}")
    _check_train_evaluate(p, cfg.train, cfg.evaluate)
    return p


def _check_train_evaluate(p: list[str], t: TrainConfig, ev: EvaluateConfig) -> None:
    _at_least(p, "train.steps", t.steps, 1)
    _positive(p, "train.lr", t.lr)
    _at_least(p, "train.batch_size", t.batch_size, 1)
    _choice(p, "train.optimizer", t.optimizer, ("adamw", "sgd"))
    _at_least(p, "train.weight_decay", t.weight_decay, 0)
    _at_least(p, "train.warmup_steps", t.warmup_steps, 0)
    _choice(p, "train.schedule", t.schedule, ("constant", "cosine"))
    _choice(p, "train.dtype", t.dtype, ("float32", "float64"))
    _at_least(p, "evaluate.tailpatch_k", ev.tailpatch_k, 1)
    _choice(p, "evaluate.tailpatch_optimizer", ev.tailpatch_optimizer, ("sgd", "adam"))
    _positive(p, "evaluate.tailpatch_lr", ev.tailpatch_lr)
    _at_least(p, "evaluate.tailpatch_steps", ev.tailpatch_steps, 1)
    _choice(p, "evaluate.tailpatch_params", ev.tailpatch_params, ("tracked", "all"))
    if ev.tailpatch_queries is not None:
        _at_least(p, "evaluate.tailpatch_queries", ev.tailpatch_queries, 1)
    _at_least(p, "evaluate.lds_subsets", ev.lds_subsets, 2)
    if not isinstance(ev.lds_fraction, (int, float)) or not 0 < ev.lds_fraction < 1:
        p.append(f"evaluate.lds_fraction: expected a number in (0, 1), got {ev.lds_fraction!r}")
    _at_least(p, "evaluate.lds_seeds", ev.lds_seeds, 1)
    _at_least(p, "evaluate.bootstrap_samples", ev.bootstrap_samples, 10)
    if not isinstance(ev.confidence, (int, float)) or not 0 < ev.confidence < 1:
        p.append(f"evaluate.confidence: expected a number in (0, 1), got {ev.confidence!r}")


# ---------------------------------------------------------------------------------------
# Loading: YAML file, then overrides, then validation.


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turns a CLI string (or YAML scalar) into the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from e
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from e
    if hint is str:
        return str(value)
    return value


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def build_config(raw: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Builds a validated Config from nested dicts; unknown keys are errors."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    section_types = _section_types()
    for key in raw:
        if key not in section_types:
            problems.append(f"{key}: unknown section; expected one of {list(section_types)}")
    for name, cls in section_types.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping of fields, got {values!r}")
            continue
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                problems.append(f"{name}.{key}: unknown field; expected one of {sorted(hints)}")
                continue
            try:
                kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
            except ConfigError as e:
                problems.extend(e.problems)
        try:
            sections[name] = cls(**kwargs)
        except TypeError as e:
            problems.append(f"{name}: {e}")
    try:
        cfg = Config(**sections)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: Config, base_dir: Path) -> None:
    """Expands ~ and $VARS in paths; relative data paths stay relative to the caller's cwd."""

    def fix(p: str) -> str:
        return os.path.expandvars(os.path.expanduser(p)) if p else p

    cfg.model.name_or_path = fix(cfg.model.name_or_path)
    cfg.data.train_files = [fix(p) for p in cfg.data.train_files]
    cfg.query.files = [fix(p) for p in cfg.query.files]
    cfg.run.index_dir = fix(cfg.run.index_dir)
    if cfg.run.deepspeed_config:
        cfg.run.deepspeed_config = fix(cfg.run.deepspeed_config)
    if cfg.query.output:
        cfg.query.output = fix(cfg.query.output)
    cfg.train.init = fix(cfg.train.init)
    for name in ("output", "scores", "lds_dir", "tailpatch_cache"):
        if getattr(cfg.evaluate, name):
            setattr(cfg.evaluate, name, fix(getattr(cfg.evaluate, name)))


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parses ["--extract.factor_rank", "2", "--run.index_dir=x"] into nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or "." not in item:
            raise ConfigError(
                f"unexpected argument {item!r}: overrides look like --section.field VALUE "
                "(for example --extract.projection_factor 16)"
            )
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"{item}: missing a value")
            value = items[i + 1]
            i += 2
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML recipe (or the defaults) and applies `--section.field VALUE` overrides."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"config file {str(path)!r} not found; pass a YAML recipe such as configs/tiny.yaml"
            )
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section].update(values)
    return build_config(raw, base)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of cfg with some fields of some sections changed (validated again)."""
    new = {name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(cfg, **new)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
