# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned shapes from a config: per-layer attention heads and FFN widths, and the residual width."""

from __future__ import annotations

import torch
from torch import nn

from ..remote_common import (
    LAYOUT_KEY,
    apply_hidden_width,
    apply_layer_shapes,
    resized,
    set_module,
)


class EmptySelfAttention(nn.Module):
    """Self-attention of a layer whose heads were all removed.

    It contributes nothing, so the attention block outputs only its output projection's bias (plus the residual).
    The Q/K/V projections are kept with zero output features so that the layer's parameters keep their names.

    Args:
        hidden_size: the model's hidden size.
        names: attribute names of the Q, K and V projections.
        head_size: width of one head (kept for introspection).
    """

    def __init__(self, hidden_size: int, names: tuple[str, ...] = ("query", "key", "value"), head_size: int = 0):
        super().__init__()
        self.projection_names = tuple(names)
        for name in names:
            setattr(self, name, nn.Linear(hidden_size, 0))
        self.num_attention_heads = 0
        self.attention_head_size = head_size
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_size: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn_path = layout["self_attention"]
    attn = layer.get_submodule(attn_path)
    width = heads * head_size
    names = tuple(layout[r].rpartition(".")[2] for r in ("query", "key", "value"))
    if heads == 0:
        if not isinstance(attn, EmptySelfAttention):
            hidden = layer.get_submodule(layout["query"]).in_features
            set_module(layer, attn_path, EmptySelfAttention(hidden, names, head_size))
    else:
        for role in ("query", "key", "value"):
            set_module(layer, layout[role], resized(layer.get_submodule(layout[role]), out_features=width))
        setattr(attn, layout["heads_attr"], heads)
        setattr(attn, layout["all_head_size_attr"], width)
    out_path = layout["attention_output"]
    set_module(layer, out_path, resized(layer.get_submodule(out_path), in_features=width))


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        head_size = config.hidden_size // getattr(config, layout["config_heads"])
        apply_layer_shapes(model, config, layout, set_layer_heads, head_size)
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
