"""Importance scores: pure tensor functions, plus small trackers that own their accumulation buffers.

Every tracker reads `param.grad` where the Trainer's `on_pre_optimizer_step` event fires: after the gradients were
summed over accumulation steps, all-reduced across processes and clipped, and before `optimizer.step`. So every process
accumulates the same scores and ends with the same masks, without any communication of its own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "movement_score",
    "magnitude_score",
    "neuron_group_taylor",
    "neuron_group_movement",
    "neuron_group_magnitude",
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


def _neuron_products(w_in, b_in, w_out, g_in, gb_in, g_out) -> torch.Tensor:
    # One FFN neuron j owns row j of the up projection, bias j, and column j of the down projection.
    total = (w_in * g_in).sum(dim=1) + (w_out * g_out).sum(dim=0)
    if b_in is not None and gb_in is not None:
        total = total + b_in * gb_in
    return total


def neuron_group_taylor(w_in, b_in, w_out, g_in, gb_in, g_out) -> torch.Tensor:
    """First-order Taylor importance of every FFN neuron (Molchanov et al. 2019, eq. 8).

    `(sum_s g_s * w_s)^2` over the parameters `s` of the neuron's group: the squared first-order estimate of the loss
    change when the whole group is removed.

    Args:
        w_in / b_in: up-projection weight (I, H) and bias (I,) or None.
        w_out: down-projection weight (H, I).
        g_in / gb_in / g_out: their gradients.

    Returns:
        A tensor (I,) of non-negative importances.
    """
    return _neuron_products(w_in, b_in, w_out, g_in, gb_in, g_out).pow(2)


def neuron_group_movement(w_in, b_in, w_out, g_in, gb_in, g_out) -> torch.Tensor:
    """Movement score of every FFN neuron: `-sum_s W_s * g_s` over its group (Sanh et al. 2020, pooled per neuron)."""
    return -_neuron_products(w_in, b_in, w_out, g_in, gb_in, g_out)


def neuron_group_magnitude(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """L1 norm of every FFN neuron's weights (row of the up projection plus column of the down projection)."""
    return w_in.abs().sum(dim=1) + w_out.abs().sum(dim=0)


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
    """Accumulates one importance per FFN neuron of every layer (Taylor or movement), at every optimizer step.

    Args:
        groups: per layer, `(up_projection, down_projection)` linears.
        method: "taylor" or "movement". ("magnitude" needs no accumulation: see `neuron_group_magnitude`.)
    """

    def __init__(self, groups: list[tuple[nn.Linear, nn.Linear]], method: str = "taylor"):
        if method not in ("taylor", "movement"):
            raise ValueError(f"NeuronScorer accumulates 'taylor' or 'movement' scores, not {method!r}.")
        self.groups = groups
        self.fn = neuron_group_taylor if method == "taylor" else neuron_group_movement
        self.scores = [torch.zeros(up.out_features, device=up.weight.device) for up, _ in groups]
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        for (up, down), s in zip(self.groups, self.scores):
            if up.weight.grad is None or down.weight.grad is None:
                continue
            b, gb = (up.bias, up.bias.grad) if up.bias is not None else (None, None)
            s.add_(
                self.fn(
                    up.weight.float(), b, down.weight.float(), up.weight.grad.float(), gb, down.weight.grad.float()
                )
            )
        self.steps += 1

    def reset(self) -> None:
        for s in self.scores:
            s.zero_()
        self.steps = 0

    def parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read (the bias too, when the up projection has one)."""
        params = [w for up, down in self.groups for w in (up.weight, down.weight)]
        return params + [up.bias for up, _ in self.groups if up.bias is not None]
