# Self-contained: this file is copied next to every exported model as its remote-code modeling file, so it imports
# nothing but torch and transformers. It rebuilds the per-layer shapes recorded in config.json before the weights are
# loaded, so `from_pretrained` loads a pruned model without random init or size-mismatch warnings.
"""Rebuilding pruned shapes of Vision Transformers (ViT, DeiT) from a config: per-layer attention heads and MLP
widths, the layer count (the config's own `num_hidden_layers`) and the residual width."""

from __future__ import annotations

import torch
from torch import nn

LAYOUT_KEY = "hf_prune_layout"
HEADS_KEY = "layer_num_attention_heads"
FFN_KEY = "layer_intermediate_sizes"
# `{"size": kept residual width, role: [qualified module or parameter names]}` (written by hf_prune.models.hidden)
HIDDEN_KEY = "hf_prune_hidden"

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


def resized_conv(conv: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A new Conv2d (the patch projection) with `out_channels` output channels, otherwise alike."""
    if conv.out_channels == out_channels:
        return conv
    return nn.Conv2d(
        conv.in_channels, out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_dim: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn = layer.get_submodule(layout["attention"])
    if heads == 0:
        if not isinstance(attn, EmptyAttention):
            _set_module(layer, layout["attention"], EmptyAttention(attn))
        return
    width = heads * head_dim
    for role in ("query", "key", "value"):
        _set_module(layer, layout[role], resized(layer.get_submodule(layout[role]), out_features=width))
    out = layout["attention_output"]
    _set_module(layer, out, resized(layer.get_submodule(out), in_features=width))
    attn.num_attention_heads = heads


def set_layer_ffn(layer: nn.Module, layout: dict, width: int) -> None:
    """Gives one layer's MLP `width` intermediate neurons."""
    _set_module(layer, layout["ffn_in"], resized(layer.get_submodule(layout["ffn_in"]), out_features=width))
    _set_module(layer, layout["ffn_out"], resized(layer.get_submodule(layout["ffn_out"]), in_features=width))


def apply_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules and parameters on the residual stream at the kept width recorded in `config` (no-op if
    none): LayerNorms, the Linears that read or write the stream, the patch projection's output channels, and the
    class / distillation / mask tokens and position embeddings (their last axis)."""
    hidden = getattr(config, HIDDEN_KEY, None)
    if not hidden:
        return model
    size = int(hidden["size"])
    for name in hidden.get("norms", []):
        old = model.get_submodule(name)
        affine = old.weight is not None
        new = nn.LayerNorm(size, eps=old.eps, elementwise_affine=affine, bias=old.bias is not None,
                           device=old.weight.device if affine else None, dtype=old.weight.dtype if affine else None)
        _set_module(model, name, new)
    for name in hidden.get("readers", []):
        _set_module(model, name, resized(model.get_submodule(name), in_features=size))
    for name in list(hidden.get("writers", [])) + list(hidden.get("sources", [])):
        old = model.get_submodule(name)
        new = resized_conv(old, size) if isinstance(old, nn.Conv2d) else resized(old, out_features=size)
        _set_module(model, name, new)
    for name in hidden.get("parameters", []):
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, leaf)
        new = torch.empty(*old.shape[:-1], size, device=old.device, dtype=old.dtype)
        setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    return model


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and MLP widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None) or VIT_LAYOUT
    heads = getattr(config, HEADS_KEY, None)
    ffn = getattr(config, FFN_KEY, None)
    if heads is not None or ffn is not None:
        base = getattr(model, "base_model", model)
        dense_heads = getattr(config, layout["config_heads"])
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // dense_heads
        for i, layer in enumerate(base.get_submodule(layout["layers"])):
            if heads is not None and heads[i] != dense_heads:
                set_layer_heads(layer, layout, int(heads[i]), head_dim)
            if ffn is not None and ffn[i] != getattr(config, layout["config_ffn"]):
                set_layer_ffn(layer, layout, int(ffn[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
