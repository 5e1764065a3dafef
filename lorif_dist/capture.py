"""Hooks that capture per-example projected gradients of tracked layers (DESIGN step 2).

For one example with layer input X (T x I) and output gradient dY (T x O):

    G~ = (X P_in)^T (dY P_out)        d1 x d2, summed over the example's tokens

The forward hook attaches a gradient hook to the layer's output; the I x O weight gradient
is never formed, and since weights are frozen autograd does no weight-gradient work: only
activation gradients flow, starting at the first tracked layer (its output is made to
require grad, so nothing upstream of it is differentiated). The product is evaluated in
the cheapest of three orders for the batch's padded length T (per example, multiplies):

    project   (X P_in)^T (dY P_out)      T I d1 + T O d2 + T d1 d2     square layers
    in_first  ((X P_in)^T dY) P_out      T I d1 + T d1 O + d1 O d2     wide outputs (MLP up)
    out_first P_in^T (X^T (dY P_out))    T O d2 + T I d2 + I d1 d2     wide inputs (MLP down)

On a Llama MLP with f = 8 and T = 256 the last two cut the projection work of the up and
down projections by a third. They are the same sums, regrouped: float64 results agree to
rounding, float32 ones to float32 rounding. out_first keeps the layer input (in the model's
dtype) until the backward reaches the layer, the others keep X P_in.

Padding positions are zeroed (in X P_in, or in dY P_out for out_first; either side zeroes
the token's term). Prompt positions are kept: the loss is zero there,
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

ORDERS = ("project", "in_first", "out_first")


def contraction_order(tokens: int, i: int, o: int, d1: int, d2: int) -> str:
    """The cheapest evaluation order of G~ for T = tokens (see the module docstring)."""
    costs = {
        "project": tokens * (i * d1 + o * d2 + d1 * d2),
        "in_first": tokens * (i * d1 + d1 * o) + d1 * o * d2,
        "out_first": tokens * (o * d2 + i * d2) + i * d1 * d2,
    }
    return min(ORDERS, key=costs.__getitem__)  # ties: the first, "project"


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
        order: str = "auto",
    ) -> None:
        if order not in ("auto",) + ORDERS:
            raise ValueError(f"order: expected 'auto' or one of {ORDERS}, got {order!r}")
        self.model = model
        self.projections = projections
        self.dtype = accumulate_dtype
        self.order = order  # "auto": by contraction_order, per layer and batch
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None  # [B, T, 1] in accumulate dtype
        self._padded = False  # whether the batch has padding positions at all
        # The last layer input converted to the accumulate dtype: layers fed the same tensor
        # (q/k/v projections, gate/up) convert it once.
        self._input: tuple[torch.Tensor, torch.Tensor] | None = None
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
        self._input = None
        self._mask = attention_mask.to(self.dtype).unsqueeze(-1)
        self._padded = bool((attention_mask == 0).any())  # one host sync per batch

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
        self._input = None
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
            order = self._order_for(proj, x.shape[1])
            if order == "out_first":
                kept = x.detach()  # [B, T, I], converted when the backward gets here
            else:
                kept = self._converted_input(x)  # [B, T, I] in the accumulate dtype
                if proj.p_in is not None:
                    kept = kept @ proj.p_in  # [B, T, d1]
                if self._padded or proj.p_in is None:
                    # Zero padding rows after projecting: d1 instead of I multiplies per
                    # token; row t of (X P) * m is m_t (x_t P), the numbers of (X * m) P.
                    kept = kept * self._mask
            if not output.requires_grad:
                # The first tracked layer: start the activation-gradient graph here.
                output.requires_grad_(True)
            output.register_hook(self._make_grad_hook(name, kept, order))
            return output

        return forward_hook

    def _order_for(self, proj: LayerProjection, tokens: int) -> str:
        if proj.p_in is None or proj.p_out is None:
            return "project"  # f = 1: nothing to regroup
        if self.order != "auto":
            return self.order
        return contraction_order(
            tokens, proj.spec.in_features, proj.spec.out_features, proj.d1, proj.d2
        )

    def _converted_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is None or self._input[0] is not x:
            self._input = (x, x.detach().to(self.dtype))
        return self._input[1]

    def _make_grad_hook(self, name: str, kept: torch.Tensor, order: str):
        proj = self.projections[name]

        def grad_hook(grad: torch.Tensor) -> None:
            gp = grad.detach().to(self.dtype)  # [B, T, O]
            if order == "in_first":
                # kept = X P_in [B, T, d1]: contract over tokens at full width O, then project.
                contribution = torch.bmm(kept.transpose(1, 2), gp) @ proj.p_out  # [B, d1, d2]
            elif order == "out_first":
                # kept = X [B, T, I]: project dY, contract at full width I, then project.
                gp = gp @ proj.p_out  # [B, T, d2]
                if self._padded:
                    gp = gp * self._mask
                xt = kept.to(self.dtype).transpose(1, 2)  # [B, I, T]
                contribution = proj.p_in.T @ torch.bmm(xt, gp)  # [d1, I] @ [B, I, d2]
            else:
                if proj.p_out is not None:
                    gp = gp @ proj.p_out  # [B, T, d2]
                contribution = torch.bmm(kept.transpose(1, 2), gp)  # [B, d1, d2]
            previous = self._grads.get(name)
            self._grads[name] = contribution if previous is None else previous + contribution

        return grad_hook


def tracked_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]
