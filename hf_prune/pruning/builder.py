"""`build_pruner`: the pruner that a `PruningArguments` asks for, its targets resolved and validated up front."""

from __future__ import annotations

from torch import nn

from ..models import structure
from ..models.adapter import ATTENTION, MLP
from .block_pruner import BlockMaskPruner, BlockTarget, attention_targets
from .head_pruner import HeadMaskPruner
from .hidden_pruner import HiddenMaskPruner
from .masks import Schedule
from .neuron_pruner import NeuronMaskPruner, ffn_layer_sparsities
from .selection import layer_sparsities, resolve_selection
from .unit_pruner import UnitMaskPruner

__all__ = ["build_pruner"]


def build_pruner(
    model: nn.Module, args
) -> BlockMaskPruner | HeadMaskPruner | HiddenMaskPruner | NeuronMaskPruner | UnitMaskPruner:
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
        uniform = bool(getattr(args, "uniform_shapes", False))
        return UnitMaskPruner(model, method, schedule, args.target_speedup, args.speedup_seq_len, uniform=uniform)
    if args.pruning_target == "hidden":
        if entries or exclude:
            raise ValueError(
                "pruning_target='hidden' prunes one mask over the residual stream, shared by every layer; "
                "pruning_targets / pruning_exclude select layers' modules. Remove them."
            )
        return HiddenMaskPruner(model, method, schedule, args.target_sparsity)
    if args.pruning_target == "ffn":
        rule = args.ffn_sparsity_rule
        sparsities = ffn_layer_sparsities(model, rule, args.target_sparsity)
        if entries or exclude:
            selection = resolve_selection(model, entries or [{"preset": "ffn"}], exclude, args.target_sparsity)
            chosen = layer_sparsities(model, selection, MLP)
            sparsities = chosen if entries else [s if c > 0 else 0.0 for s, c in zip(sparsities, chosen)]
        global_ranking = rule == "global" or mode == "global"
        return NeuronMaskPruner(model, method, schedule, sparsities, global_ranking=global_ranking)
    if getattr(args, "attention_granularity", "block") == "head":
        sparsities = [args.target_sparsity] * len(structure.get_layers(model))
        if entries or exclude:
            selection = resolve_selection(model, entries or [{"preset": "attention"}], exclude, args.target_sparsity)
            sparsities = layer_sparsities(model, selection, ATTENTION)
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
