"""Model loading, layer selection and the per-example loss.

Tracked layers are `nn.Linear` and Hugging Face GPT-2 `Conv1D` modules whose name matches a
pattern. Both are described in one orientation: an input width I and an output width O
with y = x W_IO (+ b), so a per-example gradient is X^T dY (I x O) for either kind; a
Linear's weight is (O, I), a Conv1D's is (I, O).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorif_dist.data import IGNORE_INDEX

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: module name, kind and widths (y = x W, W is in_features x out_features)."""

    name: str
    kind: str  # "linear" or "conv1d"
    in_features: int
    out_features: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # very old or very new transformers without Conv1D
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def module_widths(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        # A ZeRO-3 partitioned weight is empty here; `ds_shape` keeps its full shape.
        shape = getattr(module.weight, "ds_shape", module.weight.shape)
        return int(shape[0]), int(shape[1])
    return int(module.in_features), int(module.out_features)


def select_layers(model: nn.Module, pattern: str, exclude: str | None = None) -> list[LayerSpec]:
    """Tracked layers in module order: linear-like modules whose name matches `pattern`.

    The output embedding (LM head) is never tracked: its gradient is the vocabulary-sized
    one that influence methods leave out, and tied embeddings would alias the input table.
    """
    try:
        include_re = re.compile(pattern)
        exclude_re = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ValueError(f"extract.layers / extract.exclude_layers: invalid regex: {e}") from e
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates: list[str] = []
    specs: list[LayerSpec] = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or module is head:
            continue
        candidates.append(name)
        if not include_re.search(name) or (exclude_re and exclude_re.search(name)):
            continue
        in_features, out_features = module_widths(module, kind)
        specs.append(LayerSpec(name, kind, in_features, out_features))
    if not specs:
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise ValueError(
            f"extract.layers={pattern!r} (exclude {exclude!r}) matches no linear layer of "
            f"{type(model).__name__}; its {len(candidates)} linear layers are: {shown}"
        )
    return specs


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    _check_checkpoint(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_checkpoint(name_or_path: str) -> None:
    path = Path(name_or_path)
    if not name_or_path:
        raise ValueError("model.name_or_path is empty: set it to a local checkpoint directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a checkpoint directory (no "
            "config.json there); models are read from local disk, never downloaded. For the "
            "demo model run `lorif demo --prepare-only` first."
        )


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: torch.device | None = None,
) -> nn.Module:
    """Loads a causal LM with every parameter frozen (only activation gradients flow)."""
    from transformers import AutoModelForCausalLM

    _check_checkpoint(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    freeze(model)
    if device is not None:
        model.to(device)
    return model


def freeze(model: nn.Module) -> None:
    """Frozen weights: autograd builds no weight-gradient work, and no reduce-scatter runs."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def model_fingerprint(model: nn.Module, name_or_path: str | None = None) -> dict[str, Any]:
    """Identifies the model by its architecture config and a checksum of its weights files.

    Hashing every weight of a 70B model would take minutes, so each weights file contributes
    its size and the SHA-256 of its first and last MiB; in-memory models hash their tensors.
    """
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"):
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    files = []
    if name_or_path and Path(name_or_path).is_dir():
        files = sorted(
            p for p in Path(name_or_path).iterdir() if p.suffix in (".safetensors", ".bin")
        )
    if files:
        for p in files:
            size = p.stat().st_size
            with p.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read(1 << 20)
            h.update(f"{p.name}:{size}".encode() + head + tail)
    else:
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu", torch.float64).contiguous()
            h.update(name.encode() + t.numpy().tobytes()[:65536])
    return {"class": model_class_name(model), "hash": h.hexdigest()[:16]}


def model_class_name(model: nn.Module) -> str:
    """The model's own class name; FSDP2 swaps in a subclass named FSDP<name>."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls.__name__
    while issubclass(cls, FSDPModule) and cls is not FSDPModule:
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls.__name__


# ---------------------------------------------------------------------------------------
# Loss.


def per_example_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: str = "sum",
    response_logits_only: bool = True,
) -> torch.Tensor:
    """Per-example language-modelling loss over response tokens, shape [B].

    With `response_logits_only`, logits are computed only at positions whose next token
    carries a label: on SFT data prompts are a large share of tokens, and the LM head is the
    widest matmul of a small model. The positions are picked by a pre-hook on the LM head
    inside the model's own forward, so wrappers that gather weights around the root
    module's forward (FSDP2's root, DeepSpeed ZeRO-3) see one ordinary forward call, and a
    model's own logit post-processing (e.g. soft-capping) still applies.
    """
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    targets = batch["labels"][:, 1:]  # token t+1 is predicted at position t
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    head = model.get_output_embeddings() if response_logits_only else None
    handle = None
    if head is not None:
        full_shape = tuple(batch["input_ids"].shape)
        fired = []

        def keep_labelled(module: nn.Module, args: tuple) -> tuple | None:
            hidden = args[0]  # [B, T, H] when the head sees every position
            if fired or hidden.dim() != 3 or tuple(hidden.shape[:2]) != full_shape:
                return None
            fired.append(True)
            return (hidden[:, :-1][rows, cols],) + tuple(args[1:])  # [n, H]

        handle = head.register_forward_pre_hook(keep_labelled)
    try:
        logits = model(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    if logits.dim() == 3:  # [B, T, V]: the head was not called on all positions as a module
        logits = logits[:, :-1][rows, cols]  # [n, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a 50k+ vocabulary needs fp32 accumulation
    token_loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    num_examples = batch["input_ids"].shape[0]
    loss = torch.zeros(num_examples, dtype=token_loss.dtype, device=token_loss.device)
    loss = loss.index_add(0, rows, token_loss)
    if reduction == "mean":
        counts = torch.bincount(rows, minlength=num_examples).clamp(min=1)
        loss = loss / counts
    return loss
