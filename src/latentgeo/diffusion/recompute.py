"""Gradient checkpointing for one input: ``recompute(fn, x)`` is ``fn(x)`` whose forward
records no graph, recomputed in the backward pass (Chen et al. 2016, "Training deep nets with
sublinear memory cost"; the same idea as ``torch.utils.checkpoint``).

Why not ``torch.utils.checkpoint(..., use_reentrant=False)``: that version runs the forward
with autograd on and only swaps the saved tensors for placeholders, so every step still leaves
its whole graph of small autograd nodes alive until the backward pass. On the CPU those nodes
land on glibc's heap between the step's large activation buffers; once the buffers are freed,
the holes are split by nodes that stay, the next step's buffers do not fit, and the heap grows
with every step although the live tensors do not (bundled model, batch 16, one optimisation
iteration: +416 MiB of resident memory at 50 steps against +124 MiB at 5, while the live tensor
peak was 63 against 60 MiB; with this function +103 against +87 MiB;
``benchmarks/bench_optimize.py``, docs/optimize.md). Here the forward runs under
``torch.no_grad`` (nothing of the step outlives it but its input and its outputs) and the
backward recomputes it with autograd on and differentiates with ``torch.autograd.grad`` with
respect to ``x`` only, so it also works under an outer ``torch.autograd.grad`` (the reentrant
``torch.utils.checkpoint`` does not).

The price of differentiating with respect to ``x`` only: a tensor that ``fn`` uses and that
requires gradients (trainable weights, a learnt embedding) would get none. That case is
refused in the backward pass (a ValueError naming how many such tensors there are), never
silently dropped; frozen weights (``requires_grad=False``, as every backend loads them) are
fine. ``fn`` must be deterministic (the samplers and decoders are: DDIM eta = 0, flow Euler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class _Recompute(torch.autograd.Function):
    """forward: fn(x) without a graph, x saved; backward: fn(x) again with a graph, then
    the vector-Jacobian product with respect to x."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor) -> Outputs:
        ctx.fn = fn
        ctx.set_materialize_grads(False)  # unused outputs (x0_hat of a middle step): None
        ctx.save_for_backward(x)
        return fn(x)  # autograd.Function.forward runs under no_grad

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, torch.Tensor | None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            out = ctx.fn(xd)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if not pairs:
            return None, None
        _refuse_other_leaves([o for o, _ in pairs], xd)
        (gx,) = torch.autograd.grad([o for o, _ in pairs], xd, [g for _, g in pairs],
                                    allow_unused=True)
        return None, gx


def _refuse_other_leaves(outputs: list[torch.Tensor], x: torch.Tensor) -> None:
    """ValueError if the recomputed graph reaches a tensor requiring gradients other than x."""
    seen: set[int] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    others = 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and variable is not x:
            others += 1
        stack.extend(n for n, _ in node.next_functions)
    if others:
        raise ValueError(f"checkpointed function uses {others} other tensor(s) that require "
                         "gradients; checkpointing differentiates with respect to its input "
                         "only: freeze them (requires_grad_(False)) or pass checkpoint=False")


def recompute(fn: Callable[[torch.Tensor], Outputs], x: torch.Tensor) -> Outputs:
    """``fn(x)`` (a tensor or a tuple of tensors) with gradient checkpointing when autograd
    records and ``x`` requires gradients; plain ``fn(x)`` otherwise (so gradients to anything
    else ``fn`` uses still flow when ``x`` does not need one)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Recompute.apply(fn, x)
    return fn(x)
