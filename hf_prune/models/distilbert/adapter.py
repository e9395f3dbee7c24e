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

from ..adapter import ATTENTION, set_module
from ..layout import LayoutAdapter
from . import modeling_hf_prune
from .modeling_hf_prune import DISTILBERT_LAYOUT, EmptyDistilBertAttention

__all__ = ["DistilBertAdapter"]

_LAYOUT = DISTILBERT_LAYOUT
# task heads whose Linears read the residual stream itself (the first token's hidden state for the classifiers)
_HEAD_READERS = {
    "DistilBertForSequenceClassification": ["pre_classifier"],
    "DistilBertForMultipleChoice": ["pre_classifier"],
    "DistilBertForTokenClassification": ["classifier"],
    "DistilBertForQuestionAnswering": ["qa_outputs"],
}


class DistilBertAdapter(LayoutAdapter):
    """Adapter of DistilBERT (`model_type="distilbert"`) in transformers 5."""

    model_types = ("distilbert",)
    layout = _LAYOUT
    hidden_size_key = "dim"
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

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind != ATTENTION:
            return
        attn = self.linear(layer, _LAYOUT["self_attention"])
        if count == 0:
            if not isinstance(attn, EmptyDistilBertAttention):
                set_module(layer, _LAYOUT["self_attention"], EmptyDistilBertAttention(attn))
        else:
            setattr(attn, _LAYOUT["heads_attr"], count)

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        transformer = getattr(model, "base_model", model).transformer
        transformer.layer = nn.ModuleList(transformer.layer[i] for i in keep)
        transformer.n_layers = len(keep)
        # the per-layer lists are written again from the layers kept (record_config, after this)
        setattr(model.config, _LAYOUT["config_layers"], len(keep))

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        base = getattr(model, "base_model", model)
        prefix, layers = self.name_prefixes(model)
        head = [] if model is base else _head_readers(model)
        return {
            "embeddings": [f"{prefix}embeddings.{n}" for n in ("word_embeddings", "position_embeddings")],
            "norms": [f"{prefix}embeddings.LayerNorm"]
            + [f"{p}{n}" for p in layers for n in ("sa_layer_norm", "output_layer_norm")],
            "readers": [f"{p}{_LAYOUT[r]}" for p in layers for r in ("query", "key", "value", "ffn_in")] + head,
            "writers": [f"{p}{_LAYOUT[r]}" for p in layers for r in ("attention_output", "ffn_out")],
            "sources": [],
        }

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
