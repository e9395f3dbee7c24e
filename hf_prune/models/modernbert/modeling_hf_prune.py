# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned ModernBERT shapes from a config: per-layer attention heads (one fused `Wqkv`), gated MLP widths,
the attention norm of a first layer that was not the dense model's first, and the residual width."""

from __future__ import annotations

import torch
from torch import nn

from ..remote_common import FFN_KEY, HEADS_KEY, apply_hidden_width, resized

# per layer, whether its attention input is normalised: the dense model's layer 0 has an Identity there (the
# embeddings' norm stands in), so once it is dropped the new first layer keeps the LayerNorm it was built with
ATTN_NORMS_KEY = "layer_attn_norms"


def check_layout(attention: nn.Module) -> None:
    """Raises unless the attention reads its head count from the shape of its `Wqkv` output (transformers >= 5.1).

    transformers 5.0's ModernBERT reshapes with `num_heads` taken from the config and picks local attention from the
    layer index, so neither fewer heads in one layer nor dropped layers would compute what the pruned model did.
    """
    if hasattr(attention, "num_heads") or hasattr(attention, "local_attention"):
        raise ValueError(
            "This ModernBERT attention takes its head count from the config and its local window from the layer "
            "index (transformers 5.0), so pruned heads or dropped layers cannot be rebuilt. Upgrade transformers: "
            "pip install -U 'transformers>=5.1,<6'."
        )


class EmptyAttention(nn.Module):
    """Attention of a layer whose heads were all removed.

    It adds only the output projection's bias (the residual stream passes through). The fused projection (with zero
    output features) and the output projection (with zero input features) are kept, so the layer's parameters keep
    their names.

    Args:
        attention: the `ModernBertAttention` it replaces.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.layer_idx = getattr(attention, "layer_idx", None)
        self.head_dim = attention.head_dim
        self.sliding_window = getattr(attention, "sliding_window", None)
        self.Wqkv = resized(attention.Wqkv, out_features=0)
        self.Wo = resized(attention.Wo, in_features=0)
        self.out_drop = attention.out_drop

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.out_drop(self.Wo(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))), None


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def set_layer_heads(layer: nn.Module, config, heads: int) -> None:
    """Gives one layer's attention `heads` heads: `Wqkv` rows [Q | K | V] of `heads` heads each, `Wo` columns."""
    attn, size = layer.attn, head_dim(config)
    if heads == 0:
        if not isinstance(attn, EmptyAttention):
            layer.attn = EmptyAttention(attn)
        return
    attn.Wqkv = resized(attn.Wqkv, out_features=3 * heads * size)
    attn.Wo = resized(attn.Wo, in_features=heads * size)


def set_layer_mlp(layer: nn.Module, width: int) -> None:
    """Gives one layer's gated MLP `width` neurons: `Wi` rows [input half | gate half], `Wo` columns."""
    mlp = layer.mlp
    mlp.Wi = resized(mlp.Wi, out_features=2 * width)
    mlp.Wo = resized(mlp.Wo, in_features=width)


def set_attn_norm(layer: nn.Module, config, norm: bool) -> None:
    """Gives one layer a LayerNorm on its attention input (`norm`) or none (an Identity, as the dense layer 0)."""
    if norm and isinstance(layer.attn_norm, nn.Identity):
        like = layer.mlp_norm.weight
        layer.attn_norm = nn.LayerNorm(
            config.hidden_size, eps=config.norm_eps, bias=config.norm_bias, device=like.device, dtype=like.dtype
        )
    elif not norm and not isinstance(layer.attn_norm, nn.Identity):
        layer.attn_norm = nn.Identity()


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts, MLP widths and attention norms recorded in `config`,
    then the residual width (no-op if none). The layer count and each layer's attention type come from the family's
    own `num_hidden_layers` and `layer_types`."""
    heads = getattr(config, HEADS_KEY, None)
    ffn = getattr(config, FFN_KEY, None)
    norms = getattr(config, ATTN_NORMS_KEY, None)
    base = getattr(model, "base_model", model)
    if heads is not None or ffn is not None or norms is not None:
        check_layout(base.layers[0].attn)
    for i, layer in enumerate(base.layers):
        if norms is not None:
            set_attn_norm(layer, config, bool(norms[i]))
        if heads is not None and heads[i] != config.num_attention_heads:
            set_layer_heads(layer, config, int(heads[i]))
        if ffn is not None and ffn[i] != config.intermediate_size:
            set_layer_mlp(layer, int(ffn[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
