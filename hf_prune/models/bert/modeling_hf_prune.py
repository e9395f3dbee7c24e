# Self-contained: this file is copied next to every exported model as its remote-code modeling file, so it imports
# nothing but torch and transformers. It rebuilds the per-layer shapes recorded in config.json before the weights are
# loaded, so `from_pretrained` loads a pruned model without random init or size-mismatch warnings.
"""Rebuilding pruned shapes from a config: per-layer attention heads and FFN widths, and the residual width."""

from __future__ import annotations

import torch
from torch import nn

LAYOUT_KEY = "hf_prune_layout"
HEADS_KEY = "layer_num_attention_heads"
FFN_KEY = "layer_intermediate_sizes"
# `{"size": kept residual width, role: [qualified module names]}` (written by hf_prune.models.hidden)
HIDDEN_KEY = "hf_prune_hidden"


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


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A new Linear of the wanted shape on the same device / dtype (weights are loaded afterwards)."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    if (in_features, out_features) == (linear.in_features, linear.out_features):
        return linear
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_size: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn_path = layout["self_attention"]
    attn = layer.get_submodule(attn_path)
    width = heads * head_size
    names = tuple(layout[r].rpartition(".")[2] for r in ("query", "key", "value"))
    if heads == 0:
        if not isinstance(attn, EmptySelfAttention):
            hidden = layer.get_submodule(layout["query"]).in_features
            _set_module(layer, attn_path, EmptySelfAttention(hidden, names, head_size))
    else:
        for role in ("query", "key", "value"):
            _set_module(layer, layout[role], _resized(layer.get_submodule(layout[role]), out_features=width))
        setattr(attn, layout["heads_attr"], heads)
        setattr(attn, layout["all_head_size_attr"], width)
    out_path = layout["attention_output"]
    _set_module(layer, out_path, _resized(layer.get_submodule(out_path), in_features=width))


def set_layer_ffn(layer: nn.Module, layout: dict, width: int) -> None:
    """Gives one layer's FFN `width` intermediate neurons."""
    _set_module(layer, layout["ffn_in"], _resized(layer.get_submodule(layout["ffn_in"]), out_features=width))
    _set_module(layer, layout["ffn_out"], _resized(layer.get_submodule(layout["ffn_out"]), in_features=width))


def apply_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules on the residual stream at the kept width recorded in `config` (no-op if none)."""
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
        new = nn.LayerNorm(size, eps=old.eps, elementwise_affine=affine, bias=old.bias is not None,
                           device=old.weight.device if affine else None, dtype=old.weight.dtype if affine else None)
        _set_module(model, name, new)
    for name in hidden.get("readers", []):
        _set_module(model, name, _resized(model.get_submodule(name), in_features=size))
    for name in list(hidden.get("writers", [])) + list(hidden.get("sources", [])):
        _set_module(model, name, _resized(model.get_submodule(name), out_features=size))
    return model


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None)
    heads = getattr(config, HEADS_KEY, None)
    ffn = getattr(config, FFN_KEY, None)
    if not layout or (heads is None and ffn is None):
        return apply_hidden_width(model, config)
    base = getattr(model, "base_model", model)
    layers = base.get_submodule(layout["layers"])
    head_size = config.hidden_size // getattr(config, layout["config_heads"])
    for i, layer in enumerate(layers):
        if heads is not None and heads[i] != getattr(config, layout["config_heads"]):
            set_layer_heads(layer, layout, int(heads[i]), head_size)
        if ffn is not None and ffn[i] != getattr(config, layout["config_ffn"]):
            set_layer_ffn(layer, layout, int(ffn[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
