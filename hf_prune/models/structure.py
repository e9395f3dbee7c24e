"""Questions about one model's prunable structure, answered through its family's adapter: its layers, the unit
groups of each layer, how many heads and neurons each layer has now, the qualified names of its projections, and
which positions of a batch are real tokens."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import ATTENTION, MLP, UnitGroup
from .auto import get_adapter

__all__ = [
    "get_layers",
    "unit_groups",
    "attention_units",
    "num_heads",
    "ffn_size",
    "head_size",
    "layer_prefixes",
    "layer_of",
    "role_modules",
    "projections",
    "token_mask",
]


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The layers of `model` (a base model or a model with a head)."""
    return get_adapter(model).layers(model)


def unit_groups(model: nn.Module, kind: str) -> list[UnitGroup]:
    """Per layer, the [`UnitGroup`] of `kind` (`"attention"` or `"mlp"`), read from the current shapes."""
    adapter = get_adapter(model)
    return [adapter.unit_group(layer, kind, model.config) for layer in adapter.layers(model)]


def attention_units(model: nn.Module) -> list[int]:
    """Per layer, the attention units it has now (heads, or key/value groups under grouped-query attention)."""
    return [g.count for g in unit_groups(model, ATTENTION)]


def num_heads(model: nn.Module) -> list[int]:
    """Per layer, the query heads it has now."""
    per_unit = get_adapter(model).heads_per_unit(model.config)
    return [n * per_unit for n in attention_units(model)]


def ffn_size(model: nn.Module) -> list[int]:
    """Per layer, the MLP (FFN) neurons it has now."""
    return [g.count for g in unit_groups(model, MLP)]


def head_size(model: nn.Module) -> int:
    """Width of one attention head (the same in every layer)."""
    return get_adapter(model).head_dim(model.config)


def layer_prefixes(model: nn.Module) -> list[str]:
    """Qualified-name prefix of every layer (`"bert.encoder.layer.3."`), as in `model.named_modules()`."""
    return get_adapter(model).name_prefixes(model)[1]


def layer_of(model: nn.Module, name: str) -> int | None:
    """Index of the layer holding the module `name`, or None when it is outside the layers."""
    for i, prefix in enumerate(layer_prefixes(model)):
        if name.startswith(prefix):
            return i
    return None


def role_modules(model: nn.Module, kinds: tuple[str, ...] = (ATTENTION, MLP)) -> dict[str, tuple[int, str]]:
    """`{qualified name: (layer, role)}` of the projections of `kinds` in every layer (roles: the adapter's)."""
    adapter = get_adapter(model)
    out = {}
    for i, prefix in enumerate(layer_prefixes(model)):
        for kind in kinds:
            for role, path in adapter.roles(kind).items():
                out[f"{prefix}{path}"] = (i, role)
    return out


def projections(model: nn.Module, layer_idx: int, kind: str) -> dict[str, nn.Linear]:
    """`{role: Linear}` of one layer's projections of `kind`."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[layer_idx]
    return {role: adapter.linear(layer, path) for role, path in adapter.roles(kind).items()}


def token_mask(model: nn.Module, batch: dict) -> torch.Tensor:
    """Bool `(batch, positions)`: which positions of the layers' hidden states are real tokens of a collated batch:
    its `attention_mask`, else every token of its `input_ids`, else every position of inputs whose length the config
    fixes (a vision transformer's patches and class tokens, [`ArchitectureAdapter.sequence_length`])."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    if batch.get("input_ids") is not None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    length = get_adapter(model).sequence_length(model.config)
    first = next((v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)), None)
    if length is None or first is None:
        raise ValueError(
            f"The batch has no attention_mask or input_ids (its keys: {sorted(batch)}), and the positions of "
            f"{type(model).__name__} are not fixed by its config: pass tokenized inputs."
        )
    return torch.ones(first.shape[0], length, dtype=torch.bool, device=first.device)
