# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned shapes of Llama-family decoders from a config: per-layer key/value groups and MLP widths, and
the residual width."""

from __future__ import annotations

import torch
from torch import nn

from ..remote_common import apply_hidden_width, resized

KV_HEADS_KEY = "layer_num_key_value_heads"
MLP_KEY = "layer_intermediate_sizes"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class EmptyAttention(nn.Module):
    """Self-attention of a layer that kept no key/value group.

    It adds only the output projection's bias (the residual stream passes through). It still writes keys and values of
    zero heads into the KV cache, so the cache keeps the sequence length that the next layers and the generation
    loop read from it. The projections (with zero features) and any norms of the attention it replaces are kept, so
    the layer's parameters keep their names.

    Args:
        attention: the attention module it replaces (its children are kept).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.layer_idx = getattr(attention, "layer_idx", None)
        self.head_dim = attention.head_dim
        for name, child in attention.named_children():
            setattr(self, name, child)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, resized(getattr(self, name), out_features=0))
        self.o_proj = resized(self.o_proj, in_features=0)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, length = hidden_states.shape[:2]
        if cache is not None and self.layer_idx is not None:
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(batch, length, 0)), None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def set_layer_kv_heads(layer: nn.Module, config, kv_heads: int) -> None:
    """Gives one layer's attention `kv_heads` key/value groups, each with its query heads."""
    attn, size = layer.self_attn, head_dim(config)
    group = config.num_attention_heads // config.num_key_value_heads
    if kv_heads == 0:
        if not isinstance(attn, EmptyAttention):
            layer.self_attn = EmptyAttention(attn)
        return
    attn.q_proj = resized(attn.q_proj, out_features=kv_heads * group * size)
    attn.k_proj = resized(attn.k_proj, out_features=kv_heads * size)
    attn.v_proj = resized(attn.v_proj, out_features=kv_heads * size)
    attn.o_proj = resized(attn.o_proj, in_features=kv_heads * group * size)


def set_layer_mlp(layer: nn.Module, width: int) -> None:
    """Gives one layer's gated MLP `width` neurons."""
    mlp = layer.mlp
    mlp.gate_proj = resized(mlp.gate_proj, out_features=width)
    mlp.up_proj = resized(mlp.up_proj, out_features=width)
    mlp.down_proj = resized(mlp.down_proj, in_features=width)


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer key/value groups and MLP widths recorded in `config`, then the
    residual width where the config records one that its `hidden_size` could not hold."""
    kv = getattr(config, KV_HEADS_KEY, None)
    widths = getattr(config, MLP_KEY, None)
    base = getattr(model, "base_model", model)
    for i, layer in enumerate(base.layers if kv is not None or widths is not None else []):
        if kv is not None and kv[i] != config.num_key_value_heads:
            set_layer_kv_heads(layer, config, int(kv[i]))
        if widths is not None and widths[i] != config.intermediate_size:
            set_layer_mlp(layer, int(widths[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
