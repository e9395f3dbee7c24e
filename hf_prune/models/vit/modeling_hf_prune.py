# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned shapes of Vision Transformers (ViT, DeiT) from a config: per-layer attention heads and MLP
widths, the layer count (the config's own `num_hidden_layers`) and the residual width."""

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

# Paths relative to `model.base_model` (layers) and to one layer (the rest), as transformers 5 lays out ViT and DeiT.
VIT_LAYOUT = {
    "layers": "layers",
    "attention": "attention",
    "query": "attention.q_proj",
    "key": "attention.k_proj",
    "value": "attention.v_proj",
    "attention_output": "attention.o_proj",
    "norm_before": "layernorm_before",
    "norm_after": "layernorm_after",
    "ffn_in": "mlp.fc1",
    "ffn_out": "mlp.fc2",
    "config_heads": "num_attention_heads",
    "config_ffn": "intermediate_size",
    "config_layers": "num_hidden_layers",
}


class EmptyAttention(nn.Module):
    """Self-attention of a layer whose heads were all removed.

    ViT's attention infers the head count from the projections' width, which fails at zero width, so this module
    stands in: it adds only the output projection's bias to the residual stream. The projections of the attention it
    replaces are kept (with zero heads' width), so the layer's parameters keep their names.

    Args:
        attention: the attention module it replaces (its child projections are kept).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.head_dim = attention.head_dim
        self.num_attention_heads = 0
        for name, child in attention.named_children():
            setattr(self, name, child)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, resized(getattr(self, name), out_features=0))
        self.o_proj = resized(self.o_proj, in_features=0)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_dim: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn = layer.get_submodule(layout["attention"])
    if heads == 0:
        if not isinstance(attn, EmptyAttention):
            set_module(layer, layout["attention"], EmptyAttention(attn))
        return
    width = heads * head_dim
    for role in ("query", "key", "value"):
        set_module(layer, layout[role], resized(layer.get_submodule(layout[role]), out_features=width))
    out = layout["attention_output"]
    set_module(layer, out, resized(layer.get_submodule(out), in_features=width))
    attn.num_attention_heads = heads


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and MLP widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None) or VIT_LAYOUT
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // getattr(config, layout["config_heads"])
    apply_layer_shapes(model, config, layout, set_layer_heads, head_dim)
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
