# Remote code: every export gets this file as its modeling file, with the text of `..remote_common` in place of the
# import of it, so the export imports nothing but torch and transformers. It rebuilds the per-layer shapes recorded in
# config.json before the weights are loaded, so `from_pretrained` loads a pruned model without random init or
# size-mismatch warnings.
"""Rebuilding pruned DistilBERT shapes from a config: per-layer attention heads and FFN widths, and the residual
width."""

from __future__ import annotations

import torch
from torch import nn

from ..remote_common import (
    HIDDEN_KEY,
    LAYOUT_KEY,
    apply_hidden_width,
    apply_layer_shapes,
    resized,
    set_module,
)

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


def set_layer_heads(layer: nn.Module, layout: dict, heads: int, head_size: int) -> None:
    """Gives one layer's attention `heads` heads (new, uninitialised projections when the count changes)."""
    attn = layer.get_submodule(layout["self_attention"])
    if heads == 0:
        if not isinstance(attn, EmptyDistilBertAttention):
            set_module(layer, layout["self_attention"], EmptyDistilBertAttention(attn))
        return
    width = heads * head_size
    for role in ("query", "key", "value"):
        set_module(layer, layout[role], resized(layer.get_submodule(layout[role]), out_features=width))
    out = layout["attention_output"]
    set_module(layer, out, resized(layer.get_submodule(out), in_features=width))
    # the forward infers the head count from the projections; the attribute is kept true for introspection
    setattr(attn, layout["heads_attr"], heads)


def apply_distilbert_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules on the residual stream at the kept width recorded in `config` (no-op if none). The
    position table (learned or sinusoidal) is rebuilt like any embedding: its kept columns are stored in the weights;
    a sinusoidal one's embeddings module becomes a [`KeptWidthEmbeddings`]."""
    if not getattr(config, HIDDEN_KEY, None):
        return model
    apply_hidden_width(model, config)
    base = getattr(model, "base_model", model)
    if getattr(config, "sinusoidal_pos_embds", False) and not isinstance(base.embeddings, KeptWidthEmbeddings):
        base.embeddings = KeptWidthEmbeddings(base.embeddings)
    return model


def apply_pruned_shapes(model: nn.Module, config) -> nn.Module:
    """Reshapes `model`'s layers to the per-layer head counts and FFN widths recorded in `config`, then the residual
    width (no-op if none)."""
    layout = getattr(config, LAYOUT_KEY, None) or DISTILBERT_LAYOUT
    apply_layer_shapes(model, config, layout, set_layer_heads, config.dim // getattr(config, layout["config_heads"]))
    return apply_distilbert_hidden_width(model, config)


class PrunedModelMixin:
    """Mixed in front of a transformers model class: builds the pruned shapes right after the dense ones."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self, config)
