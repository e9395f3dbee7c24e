"""Whole-head masks (`attention_granularity='head'`): one score per attention head, every masked head removable."""

from __future__ import annotations

import torch

from ..models import structure
from .masks import Schedule
from .pruners import _ScheduledPruner, _unit_masks
from .scores import MovementScorer, magnitude_score

__all__ = ["HeadMaskPruner"]


class HeadMaskPruner(_ScheduledPruner):
    """Whole-head masks: one score per head, summed over its Q/K/V rows and attention-output columns.

    Movement scores pooled per head estimate the loss change of removing the head (Sanh et al. 2020 pooled as in
    Lagunas et al. 2021; the head-level view of Michel et al. 2019). Every masked head can be removed by `prune()`.

    Args:
        model: the model (the attention linears are read from the architecture table).
        method: "movement" or "magnitude".
        schedule: when and how far the masks move.
        layer_sparsities: per layer, the target fraction of heads to remove.
        sparsity_mode: "per_layer" or "global" (one ranking of all heads, the same total number removed).
    """

    def __init__(
        self, model, method: str, schedule: Schedule, layer_sparsities: list[float], sparsity_mode="per_layer"
    ):
        spec = structure.get_spec(model)
        self.size = structure.head_size(model)
        self.method, self.schedule, self.sparsity_mode = method, schedule, sparsity_mode
        self.layers = [
            (i, structure.attention_linears(layer, spec))
            for i, layer in enumerate(structure.get_layers(model))
            if structure.get_module(layer, spec.query).out_features > 0
        ]
        self.layer_sparsities = [layer_sparsities[i] for i, _ in self.layers]
        weights = [lin[r].weight for _, lin in self.layers for r in structure.ATTENTION_ROLES]
        self.scorer = MovementScorer(weights) if method == "movement" else None
        self.masks = [torch.ones(lin["query"].out_features // self.size, dtype=torch.bool) for _, lin in self.layers]
        self._masked: list[torch.Tensor] | None = None
        self.last_fraction = 0.0

    def _head_scores(self) -> list[torch.Tensor]:
        if self.scorer is not None:
            raw = iter(self.scorer.scores)
            per_layer = [[next(raw) for _ in structure.ATTENTION_ROLES] for _ in self.layers]
        else:
            per_layer = [
                [magnitude_score(lin[r].weight.detach().float()) for r in structure.ATTENTION_ROLES]
                for _, lin in self.layers
            ]
        scores = []
        for (q, k, v, o), m in zip(per_layer, self.masks):
            heads = m.numel()
            rows = sum(s.reshape(heads, -1).sum(dim=1) for s in (q, k, v))
            scores.append((rows + o.reshape(o.shape[0], heads, self.size).sum(dim=(0, 2))).cpu())
        return scores

    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        scores = self._head_scores()
        global_ranking = self.sparsity_mode == "global"
        self.masks = _unit_masks(scores, self.layer_sparsities, self.masks, fraction, global_ranking)
        self._masked = None
        self.last_fraction = fraction
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._masked is None:  # row indices computed once per mask change, not on every step
            self._masked = [
                (~m).repeat_interleave(self.size).nonzero().flatten().to(lin["query"].weight.device)
                for (_, lin), m in zip(self.layers, self.masks)
            ]
        for (_, lin), rows in zip(self.layers, self._masked):
            if rows.numel() == 0:
                continue
            for role in ("query", "key", "value"):
                lin[role].weight.index_fill_(0, rows, 0.0)
            lin["attention_output"].weight.index_fill_(1, rows, 0.0)

    def sparsity(self) -> list[float]:
        return [1.0 - m.float().mean().item() for m in self.masks]

    def head_masks(self, model=None) -> dict[int, list[int]]:
        """`{layer: [masked heads]}`: with whole-head masks every masked head can be removed."""
        return {
            i: (~m).nonzero().flatten().tolist() for (i, _), m in zip(self.layers, self.masks) if not bool(m.all())
        }

    def describe(self) -> str:
        lines = [f"{self.method} head pruning, {self.sparsity_mode} sparsity", "layer | heads | sparsity", "-" * 24]
        for (i, _), m, sp in zip(self.layers, self.masks, self.layer_sparsities):
            lines.append(f"{i:>5} | {m.numel():>5} | {sp:>8.3f}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.{i}": m.to(torch.uint8) for (i, _), m in zip(self.layers, self.masks)}
        if self.scorer is not None:
            state.update({f"score.{k}": s for k, s in enumerate(self.scorer.scores)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = [state[f"mask.{i}"].to(torch.bool).cpu() for i, _ in self.layers]
        if self.scorer is not None:
            for k, s in enumerate(self.scorer.scores):
                s.copy_(state[f"score.{k}"])
        self._masked = None
