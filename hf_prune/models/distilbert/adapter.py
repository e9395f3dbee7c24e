"""The DistilBERT family: post-LayerNorm encoder layers (`sa_layer_norm` after the attention, `output_layer_norm`
after the FFN) with separate Q, K, V projections (`q_lin`, `k_lin`, `v_lin`) and the output projection (`out_lin`)
inside one attention module, one head per unit, and an FFN of one up and one down projection (`ffn.lin1`, `ffn.lin2`).

DistilBERT's attention reshapes its projections to `(-1, head size)`, so once Q/K/V/O are sliced every layer may keep
a different number of heads (the `n_heads` attribute is updated for introspection only). A layer that loses every
head gets an `EmptyDistilBertAttention`, which adds only the output projection's bias. Whole layers can be removed;
a layer without units still normalises twice, so it is no pass-through and the depth search weighs it with a layer
gate. The residual width can be pruned for the base model and the heads that read the stream (sequence
classification and multiple choice through `pre_classifier`, token classification, question answering), with
learned or sinusoidal position embeddings: a sinusoidal table is fixed, so keeping some of its columns keeps their
values.
"""

from __future__ import annotations

from torch import nn

from ..adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get, set_module
from . import modeling_hf_prune
from .modeling_hf_prune import DISTILBERT_LAYOUT, FFN_KEY, HEADS_KEY, HIDDEN_KEY, LAYOUT_KEY, EmptyDistilBertAttention

__all__ = ["DistilBertAdapter"]

_LAYOUT = DISTILBERT_LAYOUT
# task heads whose Linears read the residual stream itself (the first token's hidden state for the classifiers)
_HEAD_READERS = {
    "DistilBertForSequenceClassification": ["pre_classifier"],
    "DistilBertForMultipleChoice": ["pre_classifier"],
    "DistilBertForTokenClassification": ["classifier"],
    "DistilBertForQuestionAnswering": ["qa_outputs"],
}


class DistilBertAdapter(ArchitectureAdapter):
    """Adapter of DistilBERT (`model_type="distilbert"`) in transformers 5."""

    model_types = ("distilbert",)
    layout = _LAYOUT
    attention_roles = {r: _LAYOUT[r] for r in ("query", "key", "value", "attention_output")}
    mlp_roles = {"ffn_in": _LAYOUT["ffn_in"], "ffn_out": _LAYOUT["ffn_out"]}
    # the attention module holds Q/K/V, the scores and the output projection; the FFN module both projections
    attention_cost_paths = (_LAYOUT["self_attention"],)
    mlp_cost_paths = ("ffn",)
    # post-LayerNorm: the FFN's residual is its own input (the attention block's normalised output)
    mlp_residual_path = _LAYOUT["ffn_in"]
    modeling_module = modeling_hf_prune
    # the sequence classifier reads the first token's hidden state of the last layer
    classifier_reads_first_token = True
    # post-LayerNorm: a layer without units still normalises twice, so `empty_layer_is_identity` stays False and the
    # search weighs removing a layer with the Fisher of a gate on it (posttrain.fisher.layer_gates)
    can_drop_layers = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)
        return self.linear(base, _LAYOUT["layers"])

    def head_dim(self, config) -> int:
        return config_get(config, "dim") // config_get(config, _LAYOUT["config_heads"])

    def unit_group(self, layer: nn.Module, kind: str, config) -> UnitGroup:
        if kind == ATTENTION:
            size = self.head_dim(config)
            count = self.linear(layer, _LAYOUT["query"]).out_features // size
            inputs = tuple(ChannelSlice(_LAYOUT[r], 0, size) for r in ("query", "key", "value"))
            return UnitGroup(ATTENTION, count, inputs, ChannelSlice(_LAYOUT["attention_output"], 1, size))
        if kind == MLP:
            count = self.linear(layer, _LAYOUT["ffn_in"]).out_features
            inputs = (ChannelSlice(_LAYOUT["ffn_in"], 0, 1),)
            return UnitGroup(MLP, count, inputs, ChannelSlice(_LAYOUT["ffn_out"], 1, 1))
        raise ValueError(f"Unknown unit kind {kind!r}; use {ATTENTION!r} or {MLP!r}.")

    def dense_shape(self, config) -> tuple[int, int, int]:
        return tuple(int(config_get(config, _LAYOUT[k])) for k in ("config_layers", "config_heads", "config_ffn"))

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        layers, heads, ffn = self.dense_shape(config)
        return (
            list(config_get(config, HEADS_KEY) or [heads] * layers),
            list(config_get(config, FFN_KEY) or [ffn] * layers),
        )

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind != ATTENTION:
            return
        attn = self.linear(layer, _LAYOUT["self_attention"])
        if count == 0:
            if not isinstance(attn, EmptyDistilBertAttention):
                set_module(layer, _LAYOUT["self_attention"], EmptyDistilBertAttention(attn))
        else:
            setattr(attn, _LAYOUT["heads_attr"], count)

    def record_config(self, model: nn.Module) -> None:
        config = model.config
        layers = self.layers(model)
        setattr(config, HEADS_KEY, [self.unit_group(layer, ATTENTION, config).count for layer in layers])
        setattr(config, FFN_KEY, [self.unit_group(layer, MLP, config).count for layer in layers])
        setattr(config, LAYOUT_KEY, dict(_LAYOUT))

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        transformer = getattr(model, "base_model", model).transformer
        transformer.layer = nn.ModuleList(transformer.layer[i] for i in keep)
        transformer.n_layers = len(keep)
        # the per-layer lists are written again from the layers kept (record_config, after this)
        setattr(model.config, _LAYOUT["config_layers"], len(keep))

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        base = getattr(model, "base_model", model)
        names = {id(m): n for n, m in model.named_modules()}
        prefix = names[id(base)] + "." if names[id(base)] else ""
        head = [] if model is base else _head_readers(model)
        layers = [f"{names[id(layer)]}." for layer in self.layers(model)]
        return {
            "embeddings": [f"{prefix}embeddings.{n}" for n in ("word_embeddings", "position_embeddings")],
            "norms": [f"{prefix}embeddings.LayerNorm"]
            + [f"{p}{n}" for p in layers for n in ("sa_layer_norm", "output_layer_norm")],
            "readers": [f"{p}{_LAYOUT[r]}" for p in layers for r in ("query", "key", "value", "ffn_in")] + head,
            "writers": [f"{p}{_LAYOUT[r]}" for p in layers for r in ("attention_output", "ffn_out")],
            "sources": [],
        }

    def is_pruned_config(self, config_dict: dict) -> bool:
        return HEADS_KEY in config_dict or FFN_KEY in config_dict or HIDDEN_KEY in config_dict

    def model_input_names(self, config) -> list[str]:
        # DistilBERT has no segment (token type) embeddings
        return ["input_ids", "attention_mask"]


def _head_readers(model: nn.Module) -> list[str]:
    """The task head's Linears that read the residual stream, or a `ValueError` naming the heads that have them."""
    for cls in type(model).__mro__:  # the transformers class under `Pruned...` or a user's subclass
        if cls.__name__ in _HEAD_READERS:
            return _HEAD_READERS[cls.__name__]
    why = (
        "its vocabulary projector shares its weight with the word embeddings, whose columns are the residual "
        "dimensions, but reads vocab_layer_norm's output, which is not the residual stream, so no cut keeps both"
        if hasattr(model, "vocab_projector")
        else "its head is not one hf_prune knows"
    )
    raise ValueError(
        f"Hidden dimensions of {type(model).__name__} cannot be pruned: {why}. They can be pruned for DistilBertModel "
        f"and {', '.join(_HEAD_READERS)}; prune the heads, FFN neurons or layers of this model instead."
    )
