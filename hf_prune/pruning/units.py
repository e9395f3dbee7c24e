"""Unit groups bound to one model's Linear modules: what the pruners score, mask and zero, for any family.

A [`LayerUnits`] is one layer's [`UnitGroup`] with the Linear of each of its slices; the functions here score units
by summing a weight-shaped tensor over each unit's channels, and zero the channels of masked units. A fused
projection appears in several slices: its weight is scored once (`unique_linears`) and read by each slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import structure
from ..models.adapter import UnitGroup
from ..models.auto import get_adapter

__all__ = ["LayerUnits", "layer_units", "unique_linears", "unit_sums", "masked_channels", "zero_channels"]


@dataclass
class LayerUnits:
    """One layer's units of one kind, bound to the model's modules.

    Args:
        layer: the layer index.
        group: the units and the channels each owns.
        linears: the Linear of each slice of `group.slices`, in order.
    """

    layer: int
    group: UnitGroup
    linears: list[nn.Linear]

    @property
    def count(self) -> int:
        return self.group.count

    @property
    def output_linear(self) -> nn.Linear:
        return self.linears[-1]


def layer_units(model: nn.Module, kind: str) -> list[LayerUnits]:
    """Per layer, its units of `kind` (`"attention"` or `"mlp"`) with their Linears."""
    adapter = get_adapter(model)
    out = []
    for i, (layer, group) in enumerate(zip(adapter.layers(model), structure.unit_groups(model, kind))):
        out.append(LayerUnits(i, group, [adapter.linear(layer, s.path) for s in group.slices]))
    return out


def unique_linears(units: list[LayerUnits]) -> list[nn.Linear]:
    """The distinct Linears of `units`, in order (a fused projection once)."""
    seen, out = set(), []
    for lu in units:
        for linear in lu.linears:
            if id(linear) not in seen:
                seen.add(id(linear))
                out.append(linear)
    return out


def unit_sums(lu: LayerUnits, tensor_of) -> torch.Tensor:
    """Per unit, the sum over its channels of `tensor_of(linear)` (a weight-shaped tensor) in every slice."""
    inputs = sum(s.per_unit(tensor_of(lin), lu.count) for s, lin in zip(lu.group.inputs, lu.linears))
    return inputs + lu.group.output.per_unit(tensor_of(lu.output_linear), lu.count)


def masked_channels(lu: LayerUnits, keep: torch.Tensor) -> list[torch.Tensor]:
    """Per slice, the channel indices of the units `keep` (a bool mask of the layer's units) masks."""
    device = lu.output_linear.weight.device
    return [((~keep).repeat_interleave(s.width).nonzero().flatten() + s.offset).to(device) for s in lu.group.slices]


def zero_channels(lu: LayerUnits, channels: list[torch.Tensor], input_bias: bool = True) -> None:
    """Zeroes the given channels of every slice (rows of the input projections, with their bias when `input_bias`;
    columns of the output projection)."""
    for s, linear, idx in zip(lu.group.slices, lu.linears, channels):
        if idx.numel() == 0:
            continue
        linear.weight.index_fill_(s.dim, idx, 0.0)
        if s.dim == 0 and input_bias and linear.bias is not None:
            linear.bias.index_fill_(0, idx, 0.0)
