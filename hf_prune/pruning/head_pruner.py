"""Whole-head masks (`attention_granularity='head'`): one score per attention unit, every masked unit removable."""

from __future__ import annotations

import torch

from ..models.adapter import ATTENTION
from .base import ScheduledPruner, keep_top_units
from .masks import Schedule
from .scores import MovementScorer, magnitude_score
from .units import layer_units, masked_channels, unique_linears, unit_sums, zero_channels

__all__ = ["HeadMaskPruner"]


class HeadMaskPruner(ScheduledPruner):
    """Whole-head masks: one score per attention unit (a head, or a key/value group with its query heads), summed over
    its Q/K/V rows and attention-output columns.

    Movement scores pooled per head estimate the loss change of removing the head (Sanh et al. 2020 pooled as in
    Lagunas et al. 2021; the head-level view of Michel et al. 2019). Every masked head can be removed by `prune()`.

    Args:
        model: the model (its attention units are read from its family's adapter).
        method: "movement" or "magnitude".
        schedule: when and how far the masks move.
        layer_sparsities: per layer, the target fraction of heads to remove.
        sparsity_mode: "per_layer" or "global" (one ranking of all heads, the same total number removed).
    """

    def __init__(
        self, model, method: str, schedule: Schedule, layer_sparsities: list[float], sparsity_mode="per_layer"
    ):
        self.method, self.schedule, self.sparsity_mode = method, schedule, sparsity_mode
        self.layers = [lu for lu in layer_units(model, ATTENTION) if lu.count > 0]
        self.layer_sparsities = [layer_sparsities[lu.layer] for lu in self.layers]
        self.linears = unique_linears(self.layers)
        self.scorer = MovementScorer([linear.weight for linear in self.linears]) if method == "movement" else None
        self.masks = [torch.ones(lu.count, dtype=torch.bool) for lu in self.layers]
        self._masked: list[list[torch.Tensor]] | None = None
        self.last_fraction = 0.0

    def _head_scores(self) -> list[torch.Tensor]:
        if self.scorer is not None:
            by_linear = {id(lin): s for lin, s in zip(self.linears, self.scorer.scores)}
            return [unit_sums(lu, lambda lin: by_linear[id(lin)]).cpu() for lu in self.layers]
        return [unit_sums(lu, lambda lin: magnitude_score(lin.weight.detach().float())).cpu() for lu in self.layers]

    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        scores = self._head_scores()
        global_ranking = self.sparsity_mode == "global"
        self.masks = keep_top_units(scores, self.layer_sparsities, self.masks, fraction, global_ranking)
        self._masked = None
        self.last_fraction = fraction
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._masked is None:  # channel indices computed once per mask change, not on every step
            self._masked = [masked_channels(lu, m) for lu, m in zip(self.layers, self.masks)]
        for lu, channels in zip(self.layers, self._masked):
            zero_channels(lu, channels, input_bias=False)

    def sparsity(self) -> list[float]:
        return [1.0 - m.float().mean().item() for m in self.masks]

    def head_masks(self, model=None) -> dict[int, list[int]]:
        """`{layer: [masked heads]}`: with whole-head masks every masked head can be removed."""
        return {
            lu.layer: (~m).nonzero().flatten().tolist() for lu, m in zip(self.layers, self.masks) if not bool(m.all())
        }

    def describe(self) -> str:
        lines = [f"{self.method} head pruning, {self.sparsity_mode} sparsity", "layer | heads | sparsity", "-" * 24]
        for lu, m, sp in zip(self.layers, self.masks, self.layer_sparsities):
            lines.append(f"{lu.layer:>5} | {m.numel():>5} | {sp:>8.3f}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.{lu.layer}": m.to(torch.uint8) for lu, m in zip(self.layers, self.masks)}
        if self.scorer is not None:
            state.update({f"score.{k}": s for k, s in enumerate(self.scorer.scores)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = [state[f"mask.{lu.layer}"].to(torch.bool).cpu() for lu in self.layers]
        if self.scorer is not None:
            for k, s in enumerate(self.scorer.scores):
                s.copy_(state[f"score.{k}"])
        self._masked = None
