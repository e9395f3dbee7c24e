"""Mask state of one pruning run: which weights are scored, their masks, and when the masks change.

Two small classes, one per granularity: `BlockMaskPruner` (block masks on any list of Linear weights, e.g. Q/K/V/O)
and `NeuronMaskPruner` (FFN intermediate neurons). Both take their scores from `scores.py` and their masks from
`masks.py`, and expose the same four verbs the trainer calls: `accumulate`, `update`, `apply_masks` and
`state_dict` / `load_state_dict`. Whole-head masks (`head_pruner.py`) and joint heads-and-neurons masks under one
FLOPs budget (`unit_pruner.py`) share `_ScheduledPruner`; `build_pruner` picks one from the arguments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from ..models import structure
from .masks import (
    Schedule,
    check_block_shape,
    dead_heads,
    expand_blocks,
    global_topk_masks,
    pool_blocks,
    topk_mask,
)
from .scores import MovementScorer, NeuronScorer, magnitude_score, neuron_group_magnitude
from .selection import layer_sparsities, resolve_selection

logger = logging.get_logger(__name__)

__all__ = [
    "BlockTarget",
    "Schedule",
    "BlockMaskPruner",
    "NeuronMaskPruner",
    "ffn_layer_sparsities",
    "build_pruner",
]


class _ScheduledPruner:
    """What every pruner shares: scores accumulated where the gradients are final, masks moved on a schedule."""

    scorer = None
    schedule: Schedule

    def accumulate(self) -> None:
        if self.scorer is not None:
            self.scorer.accumulate()

    def scored_parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read (none for magnitude scores)."""
        return self.scorer.parameters() if self.scorer is not None else []

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Recomputes the masks if the schedule says so at `step`; returns whether they were recomputed."""
        fraction = self.schedule.fraction(step)
        if fraction is None:
            return False
        self.set_fraction(fraction)
        return True

    def set_fraction(self, fraction: float) -> None:
        raise NotImplementedError

    def fingerprint(self) -> int:
        """A 63-bit digest of the current masks: equal on every process of a correctly synchronised run."""
        digest = hashlib.sha256()
        for name, mask in sorted(self.state_dict().items()):
            if name.startswith("mask."):
                digest.update(name.encode())
                digest.update(mask.to(torch.uint8).cpu().numpy().tobytes())
        return int.from_bytes(digest.digest()[:8], "little") >> 1


def _unit_masks(scores, sparsities, masks, fraction: float, global_ranking: bool) -> list[torch.Tensor]:
    """Keep-masks of equal units (heads, neurons) per layer: each layer at `fraction` of its sparsity, or one global
    ranking removing the same total number of units."""
    if global_ranking:
        budget = fraction * sum(sp * m.numel() for sp, m in zip(sparsities, masks))
        total = sum(m.numel() for m in masks)
        keep = topk_mask(torch.cat(scores), budget / max(total, 1), ~torch.cat(masks))
        return list(keep.split([m.numel() for m in masks]))
    return [topk_mask(s, fraction * sp, ~m) for s, sp, m in zip(scores, sparsities, masks)]


@dataclass
class BlockTarget:
    """One Linear weight under a block mask.

    Args:
        name: the module's qualified name.
        module: the `nn.Linear`.
        block: (rows, cols) of one block.
        sparsity: the target fraction of blocks to remove.
        layer / role: where it sits in the architecture table (None for modules outside it).
    """

    name: str
    module: nn.Linear
    block: tuple[int, int]
    sparsity: float
    layer: int | None = None
    role: str | None = None
    entry: int | None = None


class BlockMaskPruner(_ScheduledPruner):
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
        """`{layer: [heads]}` whose blocks are all masked in Q, K, V and the attention output."""
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for t, m in zip(self.targets, self.element_masks()):
            if t.layer is not None and t.role in structure.ATTENTION_ROLES:
                by_layer.setdefault(t.layer, {})[t.role] = m
        size = structure.head_size(model)
        heads = {}
        for layer, masks in sorted(by_layer.items()):
            if set(masks) != set(structure.ATTENTION_ROLES):
                continue
            dead = dead_heads(masks["query"], masks["key"], masks["value"], masks["attention_output"], size)
            if dead:
                heads[layer] = dead
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
        from ..models.costs import unit_costs

        heads = self.head_masks(model)
        masked = sum(int((~m).sum()) for m in self.element_masks())
        seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)
        # a removed head takes its rows of Q, K and V and its columns of the attention output, all of them masked
        per_head = 4 * structure.head_size(model) * model.config.hidden_size
        removable = per_head * sum(len(v) for v in heads.values())
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


def ffn_layer_sparsities(model: nn.Module, rule: str, target: float) -> list[float]:
    """Per-layer FFN sparsity: "uniform" (`target` everywhere; also the budget of "global") or "heads" (NNI's rule,
    `1 - kept_heads / heads * 0.5`: a layer that lost its heads keeps half its FFN at most)."""
    layers = len(structure.get_layers(model))
    if rule == "heads":
        dense = getattr(model.config, structure.get_spec(model).config_heads)
        return [1.0 - (kept / dense) * 0.5 for kept in structure.num_heads(model)]
    return [target] * layers


class NeuronMaskPruner(_ScheduledPruner):
    """Masks of FFN intermediate neurons, from Taylor, movement or magnitude importance.

    Args:
        model: the model (its FFN linears are read from the architecture table).
        method: "taylor", "movement" or "magnitude".
        schedule: when and how far the masks move.
        layer_sparsities: target fraction of neurons removed, per layer.
        global_ranking: one ranking of all neurons of all layers (budget: the mean of `layer_sparsities`).
    """

    def __init__(
        self, model: nn.Module, method: str, schedule: Schedule, layer_sparsities: list[float], global_ranking=False
    ):
        spec = structure.get_spec(model)
        self.groups = [
            (structure.get_module(layer, spec.ffn_in), structure.get_module(layer, spec.ffn_out))
            for layer in structure.get_layers(model)
        ]
        self.method, self.schedule = method, schedule
        self.layer_sparsities, self.global_ranking = layer_sparsities, global_ranking
        self.scorer = NeuronScorer(self.groups, method) if method in ("taylor", "movement") else None
        self.masks = [torch.ones(up.out_features, dtype=torch.bool, device=up.weight.device) for up, _ in self.groups]
        self._masked: list[torch.Tensor] | None = None

    def _scores(self) -> list[torch.Tensor]:
        if self.scorer is not None:
            return [s / max(self.scorer.steps, 1) for s in self.scorer.scores]
        return [
            neuron_group_magnitude(up.weight.detach().float(), down.weight.detach().float())
            for up, down in self.groups
        ]

    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        scores = self._scores()
        self.masks = _unit_masks(scores, self.layer_sparsities, self.masks, fraction, self.global_ranking)
        self._masked = None
        if self.schedule.kind == "iterative" and self.scorer is not None:
            self.scorer.reset()  # each iteration ranks on the importance gathered since the last one
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._masked is None:  # indices computed once per mask change, not with a boolean gather every step
            self._masked = [
                (~m).nonzero().flatten().to(up.weight.device) for (up, _), m in zip(self.groups, self.masks)
            ]
        for (up, down), prune_idx in zip(self.groups, self._masked):
            if prune_idx.numel() == 0:
                continue
            up.weight.index_fill_(0, prune_idx, 0.0)
            if up.bias is not None:
                up.bias.index_fill_(0, prune_idx, 0.0)
            down.weight.index_fill_(1, prune_idx, 0.0)

    def sparsity(self) -> list[float]:
        return [1.0 - m.float().mean().item() if m.numel() else 0.0 for m in self.masks]

    def describe(self) -> str:
        """Per layer: the FFN width and its target sparsity."""
        ranking = "one global ranking" if self.global_ranking else "per layer"
        lines = [f"{self.method} FFN neuron pruning, {ranking}", "layer | neurons | sparsity", "-" * 26]
        for i, ((up, _), sp) in enumerate(zip(self.groups, self.layer_sparsities)):
            lines.append(f"{i:>5} | {up.out_features:>7} | {sp:>8.3f}")
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


def attention_targets(model: nn.Module, sparsity: float, block: tuple[int, int] | None = None) -> list[BlockTarget]:
    """The Q, K, V and attention-output weights of every layer, with a default block of one head's width, square."""
    size = structure.head_size(model)
    block = tuple(block) if block else (size, size)
    targets = []
    for i, layer in enumerate(structure.get_layers(model)):
        for role, linear in structure.attention_linears(layer, structure.get_spec(model)).items():
            if linear.weight.numel() == 0:  # a layer whose heads are all gone has nothing left to mask
                continue
            targets.append(BlockTarget(structure.module_name(model, i, role), linear, block, sparsity, i, role))
    return targets


def build_pruner(model: nn.Module, args) -> BlockMaskPruner | NeuronMaskPruner:
    """The pruner that `args` (a `PruningArguments` with `pruning_method` set) asks for. Validates shapes up front.

    Target entries (`pruning_targets` / `pruning_exclude`) are resolved here and logged once as a table.
    """
    method = args.pruning_method
    if method == "taylor":
        schedule = Schedule("iterative", iterations=args.taylor_iterations, interval=args.taylor_interval_steps)
    else:
        schedule = Schedule(
            "cubic",
            warmup_steps=args.pruning_warmup_steps,
            cooldown_steps=args.pruning_cooldown_steps,
            frequency=args.pruning_frequency,
        )
    entries = getattr(args, "pruning_targets", None)
    exclude = getattr(args, "pruning_exclude", None)
    mode = getattr(args, "sparsity_mode", "per_layer")
    if args.pruning_target == "heads_and_ffn":
        if entries or exclude:
            raise ValueError(
                "pruning_target='heads_and_ffn' prunes every layer's heads and neurons under one FLOPs budget; "
                "pruning_targets / pruning_exclude select modules for 'attention' or 'ffn' only. Remove them."
            )
        from .unit_pruner import UnitMaskPruner

        return UnitMaskPruner(model, method, schedule, args.target_speedup, args.speedup_seq_len)
    if args.pruning_target == "ffn":
        rule = args.ffn_sparsity_rule
        sparsities = ffn_layer_sparsities(model, rule, args.target_sparsity)
        if entries or exclude:
            selection = resolve_selection(model, entries or [{"preset": "ffn"}], exclude, args.target_sparsity)
            chosen = layer_sparsities(model, selection, structure.FFN_ROLES)
            sparsities = chosen if entries else [s if c > 0 else 0.0 for s, c in zip(sparsities, chosen)]
        global_ranking = rule == "global" or mode == "global"
        return NeuronMaskPruner(model, method, schedule, sparsities, global_ranking=global_ranking)
    if getattr(args, "attention_granularity", "block") == "head":
        sparsities = [args.target_sparsity] * len(structure.get_layers(model))
        if entries or exclude:
            selection = resolve_selection(model, entries or [{"preset": "attention"}], exclude, args.target_sparsity)
            sparsities = layer_sparsities(model, selection, structure.ATTENTION_ROLES)
        from .head_pruner import HeadMaskPruner

        pruner = HeadMaskPruner(model, method, schedule, sparsities, sparsity_mode=mode)
        if not pruner.layers:
            raise ValueError(
                "pruning_target='attention' matches no module: every layer of this model has already lost all its "
                "heads."
            )
        return pruner
    if entries or exclude:
        selection = resolve_selection(
            model, entries or [{"preset": "attention"}], exclude, args.target_sparsity, args.block_shape
        )
        targets = [BlockTarget(s.name, s.module, s.block, s.sparsity, s.layer, s.role, s.entry) for s in selection]
    else:
        targets = attention_targets(model, args.target_sparsity, args.block_shape)
    if not targets:
        raise ValueError(
            "pruning_target='attention' matches no module: every layer of this model has already lost all its heads."
        )
    return BlockMaskPruner(targets, method, schedule, sparsity_mode=mode)


def __getattr__(name: str):
    # `HeadMaskPruner` moved to `head_pruner.py`; the old import path keeps working (lazily: that module imports this)
    if name == "HeadMaskPruner":
        from .head_pruner import HeadMaskPruner

        return HeadMaskPruner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
