"""Masks of MLP (FFN) neurons from Taylor, movement or magnitude importance, per layer or in one global ranking."""

from __future__ import annotations

import torch
from torch import nn

from ..models import structure
from ..models.adapter import MLP
from ..models.auto import get_adapter
from .base import ScheduledPruner, keep_top_units
from .masks import Schedule
from .scores import NeuronScorer, unit_magnitude
from .units import layer_units, masked_channels, zero_channels

__all__ = ["NeuronMaskPruner", "ffn_layer_sparsities"]


def ffn_layer_sparsities(model: nn.Module, rule: str, target: float) -> list[float]:
    """Per-layer FFN sparsity: "uniform" (`target` everywhere; also the budget of "global") or "heads" (NNI's rule,
    `1 - kept_heads / heads * 0.5`: a layer that lost its heads keeps half its FFN at most)."""
    layers = len(structure.get_layers(model))
    if rule == "heads":
        dense = get_adapter(model).dense_shape(model.config)[1]
        return [1.0 - (kept / dense) * 0.5 for kept in structure.attention_units(model)]
    return [target] * layers


class NeuronMaskPruner(ScheduledPruner):
    """Masks of FFN intermediate neurons, from Taylor, movement or magnitude importance.

    Args:
        model: the model (its MLP units are read from its family's adapter).
        method: "taylor", "movement" or "magnitude".
        schedule: when and how far the masks move.
        layer_sparsities: target fraction of neurons removed, per layer.
        global_ranking: one ranking of all neurons of all layers (budget: the mean of `layer_sparsities`).
    """

    def __init__(
        self, model: nn.Module, method: str, schedule: Schedule, layer_sparsities: list[float], global_ranking=False
    ):
        self.units = layer_units(model, MLP)
        self.method, self.schedule = method, schedule
        self.layer_sparsities, self.global_ranking = layer_sparsities, global_ranking
        self.scorer = NeuronScorer(self.units, method) if method in ("taylor", "movement") else None
        self.masks = [
            torch.ones(lu.count, dtype=torch.bool, device=lu.output_linear.weight.device) for lu in self.units
        ]
        self._masked: list[torch.Tensor] | None = None

    def _scores(self) -> list[torch.Tensor]:
        if self.scorer is not None:
            return [s / max(self.scorer.steps, 1) for s in self.scorer.scores]
        return [unit_magnitude(lu) for lu in self.units]

    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        scores = self._scores()
        self.masks = keep_top_units(scores, self.layer_sparsities, self.masks, fraction, self.global_ranking)
        self._masked = None
        if self.schedule.kind == "iterative" and self.scorer is not None:
            self.scorer.reset()  # each iteration ranks on the importance gathered since the last one
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._masked is None:  # indices computed once per mask change, not with a boolean gather every step
            self._masked = [masked_channels(lu, m) for lu, m in zip(self.units, self.masks)]
        for lu, channels in zip(self.units, self._masked):
            zero_channels(lu, channels, input_bias=True)

    def sparsity(self) -> list[float]:
        return [1.0 - m.float().mean().item() if m.numel() else 0.0 for m in self.masks]

    def describe(self) -> str:
        """Per layer: the FFN width and its target sparsity."""
        ranking = "one global ranking" if self.global_ranking else "per layer"
        lines = [f"{self.method} FFN neuron pruning, {ranking}", "layer | neurons | sparsity", "-" * 26]
        for i, (lu, sp) in enumerate(zip(self.units, self.layer_sparsities)):
            lines.append(f"{i:>5} | {lu.count:>7} | {sp:>8.3f}")
        return "\n".join(lines)

    def pruned_neurons(self) -> dict[int, list[int]]:
        return {i: (~m).nonzero().flatten().tolist() for i, m in enumerate(self.masks) if not bool(m.all())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.{i}": m.to(torch.uint8) for i, m in enumerate(self.masks)}
        if self.scorer is not None:
            state.update({f"score.{i}": s for i, s in enumerate(self.scorer.scores)})
            state["score_steps"] = torch.tensor(self.scorer.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = [state[f"mask.{i}"].to(torch.bool).to(m.device) for i, m in enumerate(self.masks)]
        self._masked = None
        if self.scorer is not None:
            for i, s in enumerate(self.scorer.scores):
                s.copy_(state[f"score.{i}"])
            self.scorer.steps = int(state["score_steps"])
