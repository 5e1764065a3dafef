"""Hooks that capture per-example projected gradients of tracked layers (DESIGN step 2).

For one example with layer input X (T x I) and output gradient dY (T x O):

    G~ = (X P_in)^T (dY P_out)        d1 x d2, summed over the example's tokens

The forward hook projects the input first (X P_in, [B, T, d1]) and attaches a gradient
hook to the layer's output; the gradient hook projects dY and contracts over tokens. The
I x O weight gradient is never formed, and since weights are frozen autograd does no
weight-gradient work: only activation gradients flow, starting at the first tracked layer
(its output is made to require grad, so nothing upstream of it is differentiated).

Padding positions are zeroed in X P_in. Prompt positions are kept: the loss is zero there,
but inside the network they receive gradient through attention from response tokens.
A module called several times in one forward pass adds each call's contribution.
With gradient checkpointing, the forward hooks that fire again during the backward
recomputation are ignored, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorif_dist.projection import LayerProjection


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class GradientCapture:
    """Registers hooks on tracked modules; yields per-example G~ per layer for each batch.

    Usage:
        with GradientCapture(model, projections, dtype) as capture:
            capture.begin(attention_mask)
            per_example_loss(model, batch).sum().backward()
            grads = capture.collect()      # {layer: [B, d1, d2]}
    """

    def __init__(
        self,
        model: nn.Module,
        projections: dict[str, LayerProjection],
        accumulate_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.projections = projections
        self.dtype = accumulate_dtype
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None  # [B, T, 1] in accumulate dtype
        self._grads: dict[str, torch.Tensor] = {}

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> GradientCapture:
        modules = dict(self.model.named_modules())
        missing = [name for name in self.projections if name not in modules]
        if missing:
            raise ValueError(f"tracked layers not found in the model: {missing[:10]}")
        for name in self.projections:
            hook = self._make_forward_hook(name)
            self._handles.append(modules[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grads.clear()
        self._mask = None

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Starts a batch; attention_mask is [B, T] with 1 on real tokens."""
        self._grads = {}
        self._mask = attention_mask.to(self.dtype).unsqueeze(-1)

    def collect(self) -> dict[str, torch.Tensor]:
        """Per-layer G~ of the batch, [B, d1, d2]; layers the loss never reached are zero."""
        assert self._mask is not None, "collect() called before begin()"
        num_examples = self._mask.shape[0]
        out = {}
        for name, proj in self.projections.items():
            grad = self._grads.get(name)
            if grad is None:
                grad = self._mask.new_zeros(num_examples, proj.d1, proj.d2)
            out[name] = grad
        self._grads = {}
        self._mask = None  # forward passes outside begin() ... collect() are not captured
        return out

    # -- hooks --------------------------------------------------------------------------

    def _make_forward_hook(self, name: str):
        proj = self.projections[name]

        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self._mask is None or not torch.is_grad_enabled() or _in_backward():
                return None
            x = args[0] if args else None
            if x is None or not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r}: expected a tensor input and output")
            xp = x.detach().to(self.dtype) * self._mask  # [B, T, I], padding zeroed
            if proj.p_in is not None:
                xp = xp @ proj.p_in  # [B, T, d1]
            if not output.requires_grad:
                # The first tracked layer: start the activation-gradient graph here.
                output.requires_grad_(True)
            output.register_hook(self._make_grad_hook(name, xp))
            return output

        return forward_hook

    def _make_grad_hook(self, name: str, xp: torch.Tensor):
        proj = self.projections[name]

        def grad_hook(grad: torch.Tensor) -> None:
            gp = grad.detach().to(self.dtype)  # [B, T, O]
            if proj.p_out is not None:
                gp = gp @ proj.p_out  # [B, T, d2]
            contribution = torch.bmm(xp.transpose(1, 2), gp)  # [B, d1, d2]
            previous = self._grads.get(name)
            self._grads[name] = contribution if previous is None else previous + contribution

        return grad_hook


def tracked_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]
