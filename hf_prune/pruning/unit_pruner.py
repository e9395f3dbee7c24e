"""Joint, gradual pruning of whole heads and FFN neurons under one FLOPs budget (`pruning_target='heads_and_ffn'`).

One importance per unit, comparable across kinds: the gradient of the loss with respect to a mask that scales the
unit's output. Scaling head `h` by `m` scales its columns of the attention output projection, and scaling neuron `j`
its column of the down projection, so `dL/dm = sum_{w in those columns} w * dL/dw`, read from the gradients the
Trainer already has. 'taylor' accumulates its square each optimizer step (the empirical Fisher information of the
masks, Molchanov et al. 2019; Kwon et al. 2022), 'movement' its negative (the first-order loss change of removing the
unit, Sanh et al. 2020). At each schedule step the FLOPs budget shrinks along the cubic schedule towards
`1 / target_speedup` of the dense model's, and `pruning.allocation.allocate_units` decides which heads and neurons fit.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..models.adapter import ATTENTION, MLP
from ..models.auto import get_adapter
from ..models.costs import unit_costs
from .allocation import allocate_uniform_units, allocate_units
from .base import ScheduledPruner
from .masks import Schedule
from .units import layer_units, masked_channels, zero_channels

__all__ = ["UnitMaskPruner", "unit_mask_gradients"]


def unit_mask_gradients(w_out: torch.Tensor, g_out: torch.Tensor, unit_width: int) -> torch.Tensor:
    """`dL/dm` of each unit whose output enters `w_out` (out, units * unit_width) through `unit_width` columns: the
    sum of `w * g` over those columns."""
    products = (w_out.float() * g_out.float()).sum(dim=0)
    return products.view(-1, unit_width).sum(dim=1)


class UnitMaskPruner(ScheduledPruner):
    """Masks of whole heads and FFN neurons of every layer, moved on one FLOPs budget.

    Args:
        model: the model (its units are read from its family's adapter).
        method: "taylor" (squared mask gradients) or "movement" (negated mask gradients).
        schedule: a cubic schedule: how far towards the target the budget has moved at each step.
        target_speedup: dense FLOPs / pruned FLOPs at the end.
        seq_len: sequence length of the FLOPs cost model.
        uniform: keep the same number of attention units and of MLP neurons in every layer
            ([`hf_prune.pruning.allocation.allocate_uniform_units`], head counts the family's config accepts).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        schedule: Schedule,
        target_speedup: float,
        seq_len: int = 128,
        uniform: bool = False,
    ):
        if method not in ("taylor", "movement"):
            raise ValueError(f"pruning_target='heads_and_ffn' scores units by 'taylor' or 'movement', not {method!r}.")
        self.method, self.schedule, self.target_speedup = method, schedule, float(target_speedup)
        # the same shapes in every layer, of the head counts the family's config accepts
        self.uniform = partial(get_adapter(model).accepts_uniform, model.config) if uniform else None
        self.layers = list(zip(layer_units(model, ATTENTION), layer_units(model, MLP)))
        self.costs = unit_costs(model, seq_len)
        self.costs_target = self.costs.total / self.target_speedup - self.costs.base
        if self.costs_target < 0:
            raise ValueError(
                f"target_speedup={target_speedup} is out of reach: removing every head and neuron gives "
                f"{self.costs.max_speedup:.2f}x at seq_len={seq_len}."
            )
        device = next(model.parameters()).device
        self.head_masks_ = [torch.ones(h, dtype=torch.bool, device=device) for h in self.costs.heads]
        self.neuron_masks = [torch.ones(n, dtype=torch.bool, device=device) for n in self.costs.neurons]
        self.head_scores = [torch.zeros(h, device=device) for h in self.costs.heads]
        self.neuron_scores = [torch.zeros(n, device=device) for n in self.costs.neurons]
        self.steps = 0
        self.last_fraction = 0.0
        self._rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    # --------------------------------------------------------------------------------------------- scores
    @torch.no_grad()
    def accumulate(self) -> None:
        for i, (attn, mlp) in enumerate(self.layers):
            for lu, scores in ((attn, self.head_scores[i]), (mlp, self.neuron_scores[i])):
                lin = lu.output_linear
                if lin.weight.grad is None or lin.weight.shape[1] == 0:
                    continue
                g = unit_mask_gradients(lin.weight, lin.weight.grad, lu.group.output.width)
                scores.add_(g.pow(2) if self.method == "taylor" else -g)
        self.steps += 1

    def scored_parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read: every attention output and MLP output projection."""
        return [lu.output_linear.weight for pair in self.layers for lu in pair]

    # --------------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        """Keeps the most important units that fit in the budget `fraction` of the way to the target."""
        total = self.costs.total
        flops = total * (1.0 - fraction * (1.0 - 1.0 / self.target_speedup))
        budget = flops - self.costs.base
        slack = 0.01 * flops  # end within 1% under the budget: the speedup overshoots by at most about 1%
        if self.uniform is not None:
            self.head_masks_, self.neuron_masks = allocate_uniform_units(
                self.head_scores, self.neuron_scores, self.costs, budget, self.uniform, slack,
                self.head_masks_, self.neuron_masks,
            )  # fmt: skip
        else:
            self.head_masks_, self.neuron_masks = allocate_units(
                self.head_scores, self.neuron_scores, self.costs, budget, self.head_masks_, self.neuron_masks, slack
            )
        device = self.head_scores[0].device if self.head_scores else "cpu"
        self.head_masks_ = [m.to(device) for m in self.head_masks_]
        self.neuron_masks = [m.to(device) for m in self.neuron_masks]
        self._rows = None
        self.last_fraction = fraction
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._rows is None:  # indices computed once per mask change, not on every step
            self._rows = [
                (masked_channels(attn, h), masked_channels(mlp, n))
                for (attn, mlp), h, n in zip(self.layers, self.head_masks_, self.neuron_masks)
            ]
        for (attn, mlp), (head_channels, neuron_channels) in zip(self.layers, self._rows):
            zero_channels(attn, head_channels, input_bias=True)
            zero_channels(mlp, neuron_channels, input_bias=True)

    def expected_flops(self) -> float:
        """FLOPs of the model once the masked units are removed."""
        return self.costs.flops([int(m.sum()) for m in self.head_masks_], [int(m.sum()) for m in self.neuron_masks])

    def sparsity(self) -> list[float]:
        return [1.0 - self.expected_flops() / self.costs.total]

    def head_masks(self, model=None) -> dict[int, list[int]]:
        """`{layer: [masked heads]}`."""
        return {i: (~m).nonzero().flatten().tolist() for i, m in enumerate(self.head_masks_) if not bool(m.all())}

    def pruned_neurons(self) -> dict[int, list[int]]:
        return {i: (~m).nonzero().flatten().tolist() for i, m in enumerate(self.neuron_masks) if not bool(m.all())}

    def describe(self) -> str:
        c = self.costs
        return (
            f"{self.method} pruning of heads and FFN neurons to {self.target_speedup:.2f}x FLOPs at seq_len "
            f"{c.seq_len}: {sum(c.heads)} heads of {c.head[0]:.3g} FLOPs, {sum(c.neurons)} neurons of "
            f"{c.neuron[0]:.3g} FLOPs, {c.base:.3g} FLOPs elsewhere ({c.total:.3g} in all)"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.head.{i}": m.to(torch.uint8) for i, m in enumerate(self.head_masks_)}
        state.update({f"mask.neuron.{i}": m.to(torch.uint8) for i, m in enumerate(self.neuron_masks)})
        state.update({f"score.head.{i}": s for i, s in enumerate(self.head_scores)})
        state.update({f"score.neuron.{i}": s for i, s in enumerate(self.neuron_scores)})
        state["score_steps"] = torch.tensor(self.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.head_masks_ = [state[f"mask.head.{i}"].bool().to(m.device) for i, m in enumerate(self.head_masks_)]
        self.neuron_masks = [state[f"mask.neuron.{i}"].bool().to(m.device) for i, m in enumerate(self.neuron_masks)]
        for i, s in enumerate(self.head_scores):
            s.copy_(state[f"score.head.{i}"])
        for i, s in enumerate(self.neuron_scores):
            s.copy_(state[f"score.neuron.{i}"])
        self.steps = int(state["score_steps"])
        self._rows = None
