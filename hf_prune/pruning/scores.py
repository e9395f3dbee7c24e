"""Importance scores: pure tensor functions, plus small trackers that own their accumulation buffers.

Every tracker reads `param.grad` where the Trainer's `on_pre_optimizer_step` event fires: after the gradients were
summed over accumulation steps, all-reduced across processes and clipped, and before `optimizer.step`. So every process
accumulates the same scores and ends with the same masks, without any communication of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .units import LayerUnits, unique_linears, unit_sums

__all__ = [
    "movement_score",
    "magnitude_score",
    "unit_products",
    "taylor_importance",
    "movement_importance",
    "unit_magnitude",
    "MovementScorer",
    "NeuronScorer",
    "gradients_usable",
]


def movement_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order movement score `-W * dL/dW` (Sanh et al. 2020, eq. 4 accumulated): positive when the optimizer
    moves the weight away from zero, negative when it shrinks it."""
    return -(weight * grad)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W|: magnitude pruning, the zeroth-order baseline (Han et al. 2015)."""
    return weight.abs()


def unit_products(lu: LayerUnits) -> torch.Tensor:
    """Per unit, `sum_s W_s * dL/dW_s` over every weight the unit owns (rows of its input projections and their bias,
    columns of its output projection): the first-order change of the loss when the whole unit is scaled away."""
    total = unit_sums(lu, lambda lin: lin.weight.float() * lin.weight.grad.float())
    for s, linear in zip(lu.group.inputs, lu.linears):
        if linear.bias is not None and linear.bias.grad is not None:
            total = total + s.per_unit(linear.bias.float() * linear.bias.grad.float(), lu.count)
    return total


def taylor_importance(products: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of a group of weights (Molchanov et al. 2019, eq. 8): `(sum_s g_s * w_s)^2`,
    the squared first-order estimate of the loss change when the whole group is removed."""
    return products.pow(2)


def movement_importance(products: torch.Tensor) -> torch.Tensor:
    """Movement score of a group of weights: `-sum_s W_s * g_s` (Sanh et al. 2020, pooled per unit)."""
    return -products


def unit_magnitude(lu: LayerUnits) -> torch.Tensor:
    """Per unit, the L1 norm of the weights it owns (its rows of the input projections, its output columns)."""
    return unit_sums(lu, lambda lin: lin.weight.detach().float().abs())


def gradients_usable(scored: list[nn.Parameter], params: list[nn.Parameter]) -> bool:
    """Whether this optimizer step's gradients may enter the scores.

    Under fp16 with a gradient scaler, a step whose gradients overflowed is skipped by the optimizer (the scaler's
    test: any non-finite gradient), but the gradients are still there when the scores read them; one such step would
    leave inf / NaN scores for the rest of the run. Scores therefore accumulate exactly the steps the optimizer takes.

    Args:
        scored: the weights whose gradients the scores read.
        params: every parameter the optimizer updates.

    Returns:
        False when a gradient of `params` is not finite (the step is skipped), else True.

    Raises:
        RuntimeError: when no gradient reached a scored weight: the scores would stay zero and the masks would remove
            the first blocks in index order. Sharded training (FSDP, DeepSpeed ZeRO) and frozen weights do this.
    """
    missing = [p for p in scored if p.grad is None and p.numel() > 0]
    if missing:
        frozen = sum(not p.requires_grad for p in missing)
        raise RuntimeError(
            f"No gradient reached {len(missing)} of the {len(scored)} weights the pruning scores read ({frozen} of "
            "them frozen): the scores would stay empty. Unfreeze the pruned weights, and train on one process or with "
            "DDP (torchrun / accelerate launch); FSDP and DeepSpeed ZeRO shard the gradients and are not supported."
        )
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class MovementScorer:
    """Accumulates `-W * dL/dW` of a list of weights, one buffer per weight, at every optimizer step.

    Args:
        weights: the parameters to score (e.g. the Q/K/V/O weights).
    """

    def __init__(self, weights: list[nn.Parameter]):
        self.weights = weights
        self.scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]

    @torch.no_grad()
    def accumulate(self) -> None:
        for w, s in zip(self.weights, self.scores):
            if w.grad is not None:
                s.addcmul_(w.detach().float(), w.grad.detach().float(), value=-1.0)

    def reset(self) -> None:
        for s in self.scores:
            s.zero_()

    def parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read."""
        return list(self.weights)


class NeuronScorer:
    """Accumulates one importance per unit (Taylor or movement) of every layer, at every optimizer step.

    Args:
        units: per layer, its units bound to their Linears (see `pruning.units.layer_units`).
        method: "taylor" or "movement". ("magnitude" needs no accumulation: see `unit_magnitude`.)
    """

    def __init__(self, units: list[LayerUnits], method: str = "taylor"):
        if method not in ("taylor", "movement"):
            raise ValueError(f"NeuronScorer accumulates 'taylor' or 'movement' scores, not {method!r}.")
        self.units = units
        self.fn = taylor_importance if method == "taylor" else movement_importance
        self.scores = [torch.zeros(lu.count, device=lu.output_linear.weight.device) for lu in units]
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        for lu, s in zip(self.units, self.scores):
            if any(linear.weight.grad is None for linear in lu.linears):
                continue
            s.add_(self.fn(unit_products(lu)))
        self.steps += 1

    def reset(self) -> None:
        for s in self.scores:
            s.zero_()
        self.steps = 0

    def parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read (the biases of the input projections too)."""
        linears = unique_linears(self.units)
        params = [linear.weight for linear in linears]
        inputs = {id(lin) for lu in self.units for lin in lu.linears[:-1]}
        return params + [lin.bias for lin in linears if id(lin) in inputs and lin.bias is not None]
