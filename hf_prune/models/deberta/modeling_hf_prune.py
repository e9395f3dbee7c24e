# Self-contained: this file is copied next to every exported model as its remote-code modeling file, so it imports
# nothing but torch and transformers. It rebuilds the per-layer shapes recorded in config.json before the weights are
# loaded, so `from_pretrained` loads a pruned model without random init or size-mismatch warnings.
"""Rebuilding pruned shapes of DeBERTa-v2 / v3 encoders from a config: per-layer attention heads (with their rows of
the relative-position projections), FFN widths, and the residual width."""

from __future__ import annotations

import torch
from torch import nn

LAYOUT_KEY = "hf_prune_layout"
HEADS_KEY = "layer_num_attention_heads"
FFN_KEY = "layer_intermediate_sizes"
# `{"size": kept residual width, role: [qualified module names]}` (written by hf_prune.models.hidden)
HIDDEN_KEY = "hf_prune_hidden"
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


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A new Linear of the wanted shape on the same device / dtype (weights are loaded afterwards)."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    if (in_features, out_features) == (linear.in_features, linear.out_features):
        return linear
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )


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
        _set_module(layer, path, EmptySelfAttention(attn))
    else:
        for name in HEAD_PROJECTIONS:
            linear = getattr(attn, name, None)
            if isinstance(linear, nn.Linear):
                setattr(attn, name, resized(linear, out_features=width))
        setattr(attn, layout["heads_attr"], heads)
        setattr(attn, layout["all_head_size_attr"], width)
    out = layout["attention_output"]
    _set_module(layer, out, resized(layer.get_submodule(out), in_features=width))


def set_layer_ffn(layer: nn.Module, layout: dict, width: int) -> None:
    """Gives one layer's FFN `width` intermediate neurons."""
    _set_module(layer, layout["ffn_in"], resized(layer.get_submodule(layout["ffn_in"]), out_features=width))
    _set_module(layer, layout["ffn_out"], resized(layer.get_submodule(layout["ffn_out"]), in_features=width))


def apply_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules on the residual stream (the relative embeddings and their LayerNorm included) at the kept
    width recorded in `config` (no-op if none)."""
    hidden = getattr(config, HIDDEN_KEY, None)
    if not hidden:
        return model
    size = int(hidden["size"])
    for name in hidden.get("embeddings", []):
        old = model.get_submodule(name)
        new = nn.Embedding(old.num_embeddings, size, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)  # fmt: skip
        _set_module(model, name, new)
    for name in hidden.get("norms", []):
        old = model.get_submodule(name)
        affine = old.weight is not None
        new = nn.LayerNorm(
            size,
            eps=old.eps,
            elementwise_affine=affine,
            bias=old.bias is not None,
            device=old.weight.device if affine else None,
            dtype=old.weight.dtype if affine else None,
        )
        _set_module(model, name, new)
    for name in hidden.get("readers", []):
        _set_module(model, name, resized(model.get_submodule(name), in_features=size))
    for name in list(hidden.get("writers", [])) + list(hidden.get("sources", [])):
        _set_module(model, name, resized(model.get_submodule(name), out_features=size))
    return model


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none). Dropped layers need nothing: `num_hidden_layers` is the count kept."""
    layout = getattr(config, LAYOUT_KEY, None)
    heads = getattr(config, HEADS_KEY, None)
    ffn = getattr(config, FFN_KEY, None)
    if not layout or (heads is None and ffn is None):
        return apply_hidden_width(model, config)
    base = getattr(model, "base_model", model)
    size = head_size(config)
    for i, layer in enumerate(base.get_submodule(layout["layers"])):
        if heads is not None and heads[i] != config.num_attention_heads:
            set_layer_heads(layer, layout, int(heads[i]), size)
        if ffn is not None and ffn[i] != config.intermediate_size:
            set_layer_ffn(layer, layout, int(ffn[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
