"""Block masks on any list of Linear weights (movement or magnitude scores), and which whole attention units
their masks empty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import structure
from ..models.adapter import ATTENTION
from ..models.costs import unit_costs
from .base import ScheduledPruner
from .masks import Schedule, check_block_shape, expand_blocks, global_topk_masks, pool_blocks, topk_mask
from .scores import MovementScorer, magnitude_score
from .units import layer_units

__all__ = ["BlockTarget", "BlockMaskPruner", "attention_targets"]


@dataclass
class BlockTarget:
    """One Linear weight under a block mask.

    Args:
        name: the module's qualified name.
        module: the `nn.Linear`.
        block: (rows, cols) of one block.
        sparsity: the target fraction of blocks to remove.
        layer / role: its layer and its role in the family's adapter (None for modules outside the layers).
    """

    name: str
    module: nn.Linear
    block: tuple[int, int]
    sparsity: float
    layer: int | None = None
    role: str | None = None
    entry: int | None = None


class BlockMaskPruner(ScheduledPruner):
    """Block masks on Linear weights, raised on a schedule from movement or magnitude scores.

    Args:
        targets: the weights to prune.
        method: "movement" (accumulated `-W * dL/dW`) or "magnitude" (|W| at update time).
        schedule: when and how far the masks move.
        sparsity_mode: "per_layer" (every target reaches its sparsity) or "global" (one ranking of all blocks).
    """

    def __init__(self, targets: list[BlockTarget], method: str, schedule: Schedule, sparsity_mode: str = "per_layer"):
        for t in targets:
            check_block_shape(tuple(t.module.weight.shape), t.block, t.name)
        self.targets, self.method, self.schedule, self.sparsity_mode = targets, method, schedule, sparsity_mode
        weights = [t.module.weight for t in targets]
        self.scorer = MovementScorer(weights) if method == "movement" else None
        self.block_masks = [
            torch.ones(w.shape[0] // t.block[0], w.shape[1] // t.block[1], dtype=torch.bool, device=w.device)
            for w, t in zip(weights, targets)
        ]
        self._elem_masks: list[torch.Tensor] | None = None
        self._masked: list[bool] | None = None
        self.last_fraction = 0.0

    def _block_scores(self) -> list[torch.Tensor]:
        if self.scorer is not None:
            raw = self.scorer.scores
        else:
            raw = [magnitude_score(t.module.weight.detach().float()) for t in self.targets]
        return [pool_blocks(s, t.block) for s, t in zip(raw, self.targets)]

    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        """Masks every target at `fraction` of its target sparsity."""
        scores = self._block_scores()
        if self.sparsity_mode == "global":
            sizes = [t.block[0] * t.block[1] for t in self.targets]
            budget = fraction * sum(t.sparsity * t.module.weight.numel() for t in self.targets)
            self.block_masks = global_topk_masks(scores, sizes, budget, [~m for m in self.block_masks])
        else:
            self.block_masks = [
                topk_mask(s, fraction * t.sparsity, ~m) for s, t, m in zip(scores, self.targets, self.block_masks)
            ]
        self._elem_masks, self._masked = None, None
        self.last_fraction = fraction
        self.apply_masks()

    def element_masks(self) -> list[torch.Tensor]:
        if self._elem_masks is None:
            self._elem_masks = [expand_blocks(m, t.block) for m, t in zip(self.block_masks, self.targets)]
        return self._elem_masks

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes every masked weight (after the optimizer step, so Adam moments or weight decay cannot revive it)."""
        if self._masked is None:  # computed once per mask change: no device sync on every step
            self._masked = [not bool(m.all()) for m in self.block_masks]
        for t, m, masked in zip(self.targets, self.element_masks(), self._masked):
            if masked:
                t.module.weight.masked_fill_(~m, 0.0)

    def sparsity(self) -> list[float]:
        return [1.0 - m.float().mean().item() for m in self.block_masks]

    def describe(self) -> str:
        """The resolved selection as a table: module, target entry, sparsity, block."""
        width = max(len("module"), *(len(t.name) for t in self.targets))
        lines = [
            f"{self.method} block pruning, {self.sparsity_mode} sparsity",
            f"{'module':<{width}} | entry | sparsity | block",
            "-" * (width + 33),
        ]
        for t in self.targets:
            entry = "-" if t.entry is None else t.entry
            lines.append(f"{t.name:<{width}} | {entry:>5} | {t.sparsity:>8.3f} | {t.block[0]}x{t.block[1]}")
        return "\n".join(lines)

    def head_masks(self, model: nn.Module) -> dict[int, list[int]]:
        """`{layer: [attention units]}` whose channels are all masked in every projection they span (Q, K, V rows and
        attention-output columns): the units `prune()` can remove."""
        masks = {id(t.module): m for t, m in zip(self.targets, self.element_masks())}
        heads = {}
        for lu in layer_units(model, ATTENTION):
            if lu.count == 0 or not all(id(linear) in masks for linear in lu.linears):
                continue
            alive = torch.zeros(lu.count, dtype=torch.bool, device=masks[id(lu.output_linear)].device)
            for s, linear in zip(lu.group.slices, lu.linears):
                alive |= s.per_unit(masks[id(linear)].to(torch.int32), lu.count) > 0
            dead = [h for h in range(lu.count) if not alive[h]]
            if dead:
                heads[lu.layer] = dead
        return heads

    @torch.no_grad()
    def removal_forecast(self, model: nn.Module, seq_len: int = 128) -> dict:
        """What `prune()` will physically remove of the masked weights, and the FLOPs ratio that gives.

        Block masks speed nothing up by themselves: `prune()` removes only heads masked in all of Q, K, V and the
        attention output; every other masked block (inside heads that stay, or in FFN and other linears) is released.

        Returns:
            `masked_weights`, `removable_weights` (in the heads `prune()` removes), `removable_share` and
            `expected_flops_ratio` (dense / after `prune()`, at `seq_len` tokens, or the model's longest input).
        """
        heads = self.head_masks(model)
        masked = sum(int((~m).sum()) for m in self.element_masks())
        seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)
        # a removed unit takes its channels of every projection it spans (Q, K, V rows, attention-output columns), all
        # of them masked
        removable = 0
        for lu in layer_units(model, ATTENTION):
            per_unit = sum(s.parameters_per_unit(lin) for s, lin in zip(lu.group.slices, lu.linears))
            removable += per_unit * len(heads.get(lu.layer, []))
        costs = unit_costs(model, seq_len)
        after = [n - len(heads.get(i, [])) for i, n in enumerate(costs.heads)]
        return {
            "masked_weights": masked,
            "removable_weights": removable,
            "removable_share": removable / masked if masked else 1.0,
            "expected_flops_ratio": costs.total / costs.flops(heads=after),
            "heads_removed": sum(len(v) for v in heads.values()),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.{t.name}": m.to(torch.uint8) for t, m in zip(self.targets, self.block_masks)}
        if self.scorer is not None:
            state.update({f"score.{t.name}": s for t, s in zip(self.targets, self.scorer.scores)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.targets):
            self.block_masks[i] = state[f"mask.{t.name}"].to(torch.bool).to(self.block_masks[i].device)
            if self.scorer is not None:
                self.scorer.scores[i].copy_(state[f"score.{t.name}"])
        self._elem_masks, self._masked = None, None


def attention_targets(model: nn.Module, sparsity: float, block: tuple[int, int] | None = None) -> list[BlockTarget]:
    """The attention projections of every layer, with a default block of one head's width, square."""
    size = structure.head_size(model)
    block = tuple(block) if block else (size, size)
    targets = []
    for name, (layer, role) in structure.role_modules(model, (ATTENTION,)).items():
        linear = model.get_submodule(name)
        if linear.weight.numel() == 0:  # a layer whose heads are all gone has nothing left to mask
            continue
        targets.append(BlockTarget(name, linear, block, sparsity, layer, role))
    return targets
