# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned shapes of DeBERTa-v2 / v3 encoders from a config: per-layer attention heads (with their rows of
the relative-position projections), FFN widths, and the residual width."""

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

# attribute names of the projections that compute a head: content query / key / value, and the separate projections
# of the relative embeddings (`share_att_key=False`; only those `pos_att_type` asks for exist)
HEAD_PROJECTIONS = ("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj")


class EmptySelfAttention(nn.Module):
    """Disentangled self-attention of a layer whose heads were all removed.

    It contributes nothing, so the attention block outputs only its output projection's bias (plus the residual)
    before its LayerNorm. The projections of the attention it replaces are kept with zero output features, so that the
    layer's parameters keep their names.

    Args:
        attention: the `DisentangledSelfAttention` (or an `EmptySelfAttention`) it replaces.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        for name in HEAD_PROJECTIONS:
            linear = getattr(attention, name, None)
            if isinstance(linear, nn.Linear):
                setattr(self, name, resized(linear, out_features=0))
        self.num_attention_heads = 0
        self.attention_head_size = getattr(attention, "attention_head_size", 0)
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def head_size(config) -> int:
    """Width of one head: DeBERTa reads `attention_head_size` when the config sets one."""
    return getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, size: int) -> None:
    """Gives one layer's attention `heads` heads: every projection that computes them (the position projections
    included) gets `heads * size` rows, the output projection as many columns."""
    path = layout["self_attention"]
    attn = layer.get_submodule(path)
    width = heads * size
    if heads == 0:
        set_module(layer, path, EmptySelfAttention(attn))
    else:
        for name in HEAD_PROJECTIONS:
            linear = getattr(attn, name, None)
            if isinstance(linear, nn.Linear):
                setattr(attn, name, resized(linear, out_features=width))
        setattr(attn, layout["heads_attr"], heads)
        setattr(attn, layout["all_head_size_attr"], width)
    out = layout["attention_output"]
    set_module(layer, out, resized(layer.get_submodule(out), in_features=width))


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none). Dropped layers need nothing: `num_hidden_layers` is the count kept."""
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        apply_layer_shapes(model, config, layout, set_layer_heads, head_size(config))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
