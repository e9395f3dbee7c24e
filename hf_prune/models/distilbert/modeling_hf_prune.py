# Self-contained: this file is copied next to every exported model as its remote-code modeling file, so it imports
# nothing but torch and transformers. It rebuilds the per-layer shapes recorded in config.json before the weights are
# loaded, so `from_pretrained` loads a pruned model without random init or size-mismatch warnings.
"""Rebuilding pruned DistilBERT shapes from a config: per-layer attention heads and FFN widths, and the residual
width."""

from __future__ import annotations

import torch
from torch import nn

LAYOUT_KEY = "hf_prune_layout"
HEADS_KEY = "layer_num_attention_heads"
FFN_KEY = "layer_intermediate_sizes"
# `{"size": kept residual width, role: [qualified module names]}` (written by hf_prune.models.hidden)
HIDDEN_KEY = "hf_prune_hidden"

# Paths relative to `model.base_model` (layers) and to one layer (the rest), with the attribute and config names of
# the head count, FFN width and layer count. Written into the `config.json` of every export (LAYOUT_KEY).
DISTILBERT_LAYOUT = {
    "layers": "transformer.layer",
    "self_attention": "attention",
    "query": "attention.q_lin",
    "key": "attention.k_lin",
    "value": "attention.v_lin",
    "attention_output": "attention.out_lin",
    "ffn_in": "ffn.lin1",
    "ffn_out": "ffn.lin2",
    "heads_attr": "n_heads",
    "config_heads": "n_heads",
    "config_ffn": "hidden_dim",
    "config_layers": "n_layers",
}
_PROJECTIONS = ("q_lin", "k_lin", "v_lin")


def resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A new Linear of the wanted shape on the same device / dtype (weights are loaded afterwards); `linear` itself
    when it already has that shape."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    if (in_features, out_features) == (linear.in_features, linear.out_features):
        return linear
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )


class EmptyDistilBertAttention(nn.Module):
    """Self-attention of a DistilBERT layer whose heads were all removed.

    DistilBERT's attention reshapes its projections to `(-1, head size)`, which a projection of zero width cannot do,
    so this module stands in for it: it contributes only the output projection's bias (the residual stream passes on to
    `sa_layer_norm`). The projections are kept, with zero Q/K/V outputs and zero output-projection inputs, so that the
    layer's parameters keep their names.

    Args:
        attention: the `DistilBertSelfAttention` it replaces (its children are kept, resized).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention_head_size = attention.attention_head_size
        self.dim = getattr(attention, "dim", attention.out_lin.out_features)
        self.n_heads = 0
        for name, child in attention.named_children():
            setattr(self, name, child)
        for name in _PROJECTIONS:
            setattr(self, name, resized(getattr(self, name), out_features=0))
        self.out_lin = resized(self.out_lin, in_features=0)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.out_lin(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


class KeptWidthEmbeddings(nn.Module):
    """DistilBERT's embeddings (word and position embeddings summed, LayerNorm, dropout) at a pruned residual width,
    standing in for transformers' `Embeddings` when the position table is sinusoidal.

    Whenever transformers initialises an `Embeddings` module (after loading weights too) it computes the sinusoidal
    table at the config's full `dim`, which a table of the kept width cannot take. This module computes the same
    function and holds the same submodules, so the weights (the kept columns of the table among them) load as they are.

    Args:
        embeddings: the `Embeddings` module it replaces (its children are kept).
    """

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        for name, child in embeddings.named_children():
            setattr(self, name, child)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is not None:
            inputs_embeds = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.size(1), device=inputs_embeds.device).unsqueeze(0)
        return self.dropout(self.LayerNorm(inputs_embeds + self.position_embeddings(position_ids)))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_size: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn = layer.get_submodule(layout["self_attention"])
    if heads == 0:
        if not isinstance(attn, EmptyDistilBertAttention):
            _set_module(layer, layout["self_attention"], EmptyDistilBertAttention(attn))
        return
    width = heads * head_size
    for role in ("query", "key", "value"):
        _set_module(layer, layout[role], resized(layer.get_submodule(layout[role]), out_features=width))
    out = layout["attention_output"]
    _set_module(layer, out, resized(layer.get_submodule(out), in_features=width))
    # the forward infers the head count from the projections; the attribute is kept true for introspection
    setattr(attn, layout["heads_attr"], heads)


def set_layer_ffn(layer: nn.Module, layout: dict, width: int) -> None:
    """Gives one layer's FFN `width` intermediate neurons."""
    _set_module(layer, layout["ffn_in"], resized(layer.get_submodule(layout["ffn_in"]), out_features=width))
    _set_module(layer, layout["ffn_out"], resized(layer.get_submodule(layout["ffn_out"]), in_features=width))


def apply_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules on the residual stream at the kept width recorded in `config` (no-op if none). The
    position table (learned or sinusoidal) is rebuilt like any embedding: its kept columns are stored in the weights;
    a sinusoidal one's embeddings module becomes a [`KeptWidthEmbeddings`]."""
    hidden = getattr(config, HIDDEN_KEY, None)
    if not hidden:
        return model
    size = int(hidden["size"])
    for name in hidden.get("embeddings", []):
        old = model.get_submodule(name)
        new = nn.Embedding(old.num_embeddings, size, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)  # fmt: skip
        new.weight.requires_grad_(old.weight.requires_grad)
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
    base = getattr(model, "base_model", model)
    if getattr(config, "sinusoidal_pos_embds", False) and not isinstance(base.embeddings, KeptWidthEmbeddings):
        base.embeddings = KeptWidthEmbeddings(base.embeddings)
    return model


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None) or DISTILBERT_LAYOUT
    heads = getattr(config, HEADS_KEY, None)
    ffn = getattr(config, FFN_KEY, None)
    if heads is not None or ffn is not None:
        base = getattr(model, "base_model", model)
        dense_heads, dense_ffn = getattr(config, layout["config_heads"]), getattr(config, layout["config_ffn"])
        head_size = config.dim // dense_heads
        for i, layer in enumerate(base.get_submodule(layout["layers"])):
            if heads is not None and heads[i] != dense_heads:
                set_layer_heads(layer, layout, int(heads[i]), head_size)
            if ffn is not None and ffn[i] != dense_ffn:
                set_layer_ffn(layer, layout, int(ffn[i]))
    return apply_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
