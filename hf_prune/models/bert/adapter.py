"""The BERT family (bert, roberta, xlm-roberta, electra): post-LayerNorm encoder layers with separate Q, K, V
projections, one attention head per unit, and an FFN of one up and one down projection.

BERT-style attention infers the head count from tensor shapes, so once Q/K/V/O are sliced every layer may keep a
different number of heads, under both the sdpa and eager attention implementations. A layer that loses every head
gets an `EmptySelfAttention` (its attention block then adds only the output projection's bias).
"""

from __future__ import annotations

from torch import nn

from ..adapter import ATTENTION, config_get, set_module
from ..layout import LayoutAdapter
from . import modeling_hf_prune
from .modeling_hf_prune import EmptySelfAttention

__all__ = ["BertAdapter", "BERT_LAYOUT"]

# Paths relative to `model.base_model` (layers) and to one layer (the rest), with the attribute and config names of
# the head count. Written into the `config.json` of every export (LAYOUT_KEY), where the remote-code modeling file
# reads it: its keys and values are those hf_prune 0.1 wrote, so its exports load unchanged.
BERT_LAYOUT = {
    "layers": "encoder.layer",
    "self_attention": "attention.self",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "heads_attr": "num_attention_heads",
    "head_size_attr": "attention_head_size",
    "all_head_size_attr": "all_head_size",
    "config_heads": "num_attention_heads",
    "config_ffn": "intermediate_size",
    "config_layers": "num_hidden_layers",
}


class BertAdapter(LayoutAdapter):
    """Adapter of the BERT encoder layout shared by BERT, RoBERTa, XLM-RoBERTa and ELECTRA in transformers 5."""

    model_types = ("bert", "roberta", "xlm-roberta", "electra")
    layout = BERT_LAYOUT
    # the self-attention module computes Q/K/V and the scores; the output projection sits beside it
    attention_cost_paths = (BERT_LAYOUT["self_attention"], BERT_LAYOUT["attention_output"])
    # post-LayerNorm: the FFN's residual is its own input (the attention block's normalised output)
    mlp_residual_path = BERT_LAYOUT["ffn_in"]
    modeling_module = modeling_hf_prune
    classifier_reads_first_token = True
    # post-LayerNorm: a layer without units still normalises twice, so removing it changes the function (the search
    # weighs that with the Fisher of a gate on the whole layer; see posttrain.fisher.layer_gates)
    can_drop_layers = True
    # model types whose tokenizers return token_type_ids; roberta and xlm-roberta use one segment only
    token_type_models = ("bert", "electra")

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind != ATTENTION:
            return
        path = self.layout["self_attention"]
        attn = self.linear(layer, path)
        size = self.head_dim(config)
        if count == 0:
            names = tuple(self.layout[r].rpartition(".")[2] for r in ("query", "key", "value"))
            empty = EmptySelfAttention(self.linear(layer, self.layout["query"]).in_features, names, size)
            for name in names:  # the sliced, empty projections keep their parameter names
                setattr(empty, name, getattr(attn, name))
            set_module(layer, path, empty)
        else:
            setattr(attn, self.layout["heads_attr"], count)
            setattr(attn, self.layout["all_head_size_attr"], count * size)

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        base = getattr(model, "base_model", model)
        encoder = base.get_submodule(self.layout["layers"].rpartition(".")[0])
        layers = self.layers(model)
        setattr(encoder, self.layout["layers"].rpartition(".")[2], nn.ModuleList(layers[i] for i in keep))
        for new, layer in enumerate(self.layers(model)):  # caches (decoder use) are indexed by layer_idx
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        setattr(model.config, self.layout["config_layers"], len(keep))

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        base = getattr(model, "base_model", model)
        prefix, layers = self.name_prefixes(model)
        head = _residual_head_readers(model, base)
        tables = ("word_embeddings", "position_embeddings", "token_type_embeddings")
        stream = [f"{prefix}embeddings.{n}" for n in tables if getattr(base.embeddings, n, None) is not None]
        norms, sources = [f"{prefix}embeddings.LayerNorm"], []
        if getattr(base, "embeddings_project", None) is not None:  # ELECTRA with embedding_size != hidden_size:
            stream, norms, sources = [], [], [f"{prefix}embeddings_project"]  # the stream starts at the projection
        lay = self.layout
        return {
            "embeddings": stream,
            "norms": norms + [f"{p}{n}" for p in layers for n in ("attention.output.LayerNorm", "output.LayerNorm")],
            "readers": [f"{p}{lay[r]}" for p in layers for r in ("query", "key", "value", "ffn_in")]
            + ([f"{prefix}pooler.dense"] if getattr(base, "pooler", None) is not None else [])
            + head,
            "writers": [f"{p}{lay[r]}" for p in layers for r in ("attention_output", "ffn_out")],
            "sources": sources,
        }

    def model_input_names(self, config) -> list[str]:
        names = ["input_ids", "attention_mask"]
        return names + ["token_type_ids"] if config_get(config, "model_type") in self.token_type_models else names


def _residual_head_readers(model: nn.Module, base: nn.Module) -> list[str]:
    """The task head's Linears that read the residual stream (not the pooler's output), or a `ValueError`."""
    if model is base:
        return []
    name = type(model).__name__
    if name.endswith("ForTokenClassification"):
        return ["classifier"]
    if name.endswith("ForQuestionAnswering"):
        return ["qa_outputs"]
    pooled = getattr(base, "pooler", None) is not None
    if name.endswith(("ForSequenceClassification", "ForMultipleChoice")):
        # BERT's classifier reads the pooler; RoBERTa's and ELECTRA's heads read the first token's hidden state
        head = getattr(model, "classifier", None)
        return ["classifier.dense"] if isinstance(getattr(head, "dense", None), nn.Linear) and not pooled else []
    raise ValueError(
        f"Hidden dimensions of {name} cannot be pruned: its head is not one hf_prune knows (sequence or token "
        "classification, multiple choice, question answering). Prune heads and FFN neurons instead."
    )
