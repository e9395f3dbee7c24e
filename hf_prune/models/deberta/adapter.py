"""The DeBERTa-v2 / v3 family (`model_type="deberta-v2"`): post-LayerNorm encoder layers with disentangled attention.

A head is its rows of `query_proj`, `key_proj` and `value_proj`, and its columns of `attention.output.dense`. The
relative-position embeddings (`encoder.rel_embeddings`, one table shared by every layer) are projected per head: with
`share_att_key=True` (DeBERTa-v3) by the same `query_proj` / `key_proj`, so a head's rows there are its position
projections too; with `share_att_key=False` by `pos_key_proj` (for "c2p") and `pos_query_proj` (for "p2c"), whose
rows of the head go with it. The c2p and p2c scores of a head read only that head's rows, so removing a head removes
exactly its share of the disentangled scores. An FFN neuron is a row of `intermediate.dense` and a column of
`output.dense`. A layer may lose every head (an `EmptySelfAttention` stands in) or every neuron.

Hidden dimensions: the stream is written by the embeddings (or `embed_proj` when `embedding_size` differs), every
LayerNorm, the attention and FFN outputs; it is read by every projection above, the pooler and the token heads. The
relative embeddings have the stream's width and are read by the same projections, so they lose the same columns;
their LayerNorm (`norm_rel_ebd="layer_norm"`, as every released DeBERTa-v2 / v3 checkpoint has) normalises over the
kept dimensions in the masked form, which is what makes masked and pruned agree. Without it the table is read raw
and no mask can stand for the removed columns, so hidden pruning is refused; so it is with the ConvLayer
(`conv_kernel_size > 0`, DeBERTa-v2 xlarge / xxlarge), a Conv1d on the hidden width that the surgery (which slices
Linears) cannot cut.

Whole layers can be removed (post-LayerNorm: an empty layer still normalises twice, so it is no pass-through). The
ConvLayer runs after layer 0 on the embeddings, so with it layer 0 stays.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import logging

from ..adapter import ATTENTION, config_get, set_module
from ..layout import LayoutAdapter
from ..remote_common import HIDDEN_KEY
from . import modeling_hf_prune
from .modeling_hf_prune import EmptySelfAttention

logger = logging.get_logger(__name__)

__all__ = ["DebertaV2Adapter", "DEBERTA_LAYOUT"]

# Paths relative to `model.base_model` (layers) and to one layer (the rest), with the attribute and config names of
# the head count; written into the `config.json` of every export (LAYOUT_KEY), where the modeling file reads it.
DEBERTA_LAYOUT = {
    "layers": "encoder.layer",
    "self_attention": "attention.self",
    "query": "attention.self.query_proj",
    "key": "attention.self.key_proj",
    "value": "attention.self.value_proj",
    "pos_key": "attention.self.pos_key_proj",
    "pos_query": "attention.self.pos_query_proj",
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
_ROWS = ("query", "key", "value", "pos_key", "pos_query")


class DebertaV2Adapter(LayoutAdapter):
    """Adapter of DeBERTa-v2 and DeBERTa-v3 (both `model_type="deberta-v2"` in transformers 5)."""

    model_types = ("deberta-v2",)
    layout = DEBERTA_LAYOUT
    # the self-attention module computes Q/K/V, the position projections and every score; the output projection sits
    # beside it
    attention_cost_paths = (DEBERTA_LAYOUT["self_attention"], DEBERTA_LAYOUT["attention_output"])
    mlp_cost_paths = (DEBERTA_LAYOUT["ffn_in"], DEBERTA_LAYOUT["ffn_out"])
    # post-LayerNorm: the FFN's residual is its own input (the attention block's normalised output)
    mlp_residual_path = DEBERTA_LAYOUT["ffn_in"]
    modeling_module = modeling_hf_prune
    # the ContextPooler of the sequence classifier reads the first token of the last layer alone
    classifier_reads_first_token = True
    can_drop_layers = True

    def head_dim(self, config) -> int:
        return config_get(config, "attention_head_size") or (
            config_get(config, "hidden_size") // config_get(config, "num_attention_heads")
        )

    def row_paths(self, layer: nn.Module) -> list[str]:
        """The projections whose rows a head owns: Q/K/V and the separate position projections the layer has."""
        return [self.layout[r] for r in _ROWS if isinstance(_submodule(layer, self.layout[r]), nn.Linear)]

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind != ATTENTION:
            return
        path = self.layout["self_attention"]
        attn = self.linear(layer, path)
        if count == 0:
            # the sliced, empty projections are kept (EmptySelfAttention reuses Linears of the right shape)
            set_module(layer, path, EmptySelfAttention(attn))
        else:
            setattr(attn, self.layout["heads_attr"], count)
            setattr(attn, self.layout["all_head_size_attr"], count * self.head_dim(config))

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        encoder = self._encoder(model)
        if encoder.conv is not None and 0 not in keep:
            raise ValueError(_conv_refusal(model.config, "Removing layer 0"))
        encoder.layer = nn.ModuleList(encoder.layer[i] for i in keep)
        setattr(model.config, self.layout["config_layers"], len(keep))
        hidden = config_get(model.config, HIDDEN_KEY)
        if hidden:  # the narrowed modules are recorded by name, and the layers kept have new indices
            setattr(model.config, HIDDEN_KEY, {"size": hidden["size"], **self.hidden_modules(model)})

    def empty_layer_is_identity(self, model: nn.Module) -> bool:
        """False: post-LayerNorm, an empty layer still normalises its input twice.

        Raises:
            ValueError: for a model with a ConvLayer. The search asks this before it weighs whole layers, and with a
                ConvLayer it could choose layer 0, which must stay: refused before any work rather than at the end.
        """
        if self._encoder(model).conv is not None:
            raise ValueError(_conv_refusal(model.config, "A search that may remove layer 0 (drop_layers=True)"))
        return False

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        config = model.config
        encoder = self._encoder(model)
        if encoder.conv is not None:
            raise ValueError(_conv_refusal(config, "Removing hidden dimensions"))
        if encoder.relative_attention and "layer_norm" not in encoder.norm_rel_ebd:
            raise ValueError(
                f"Hidden dimensions of this DeBERTa model cannot be pruned: its relative-position embeddings are read "
                f"without a LayerNorm (norm_rel_ebd={config_get(config, 'norm_rel_ebd')!r}), so no mask on the "
                "stream stands for their removed columns and the pruned model would not equal the masked one. Prune "
                "its heads, FFN neurons or layers instead (every released DeBERTa-v2 / v3 checkpoint has "
                "norm_rel_ebd='layer_norm')."
            )
        base = getattr(model, "base_model", model)
        prefix, prefixes = self.name_prefixes(model)
        emb = base.embeddings
        tables = ("word_embeddings", "position_embeddings", "token_type_embeddings")
        stream = [f"{prefix}embeddings.{n}" for n in tables if getattr(emb, n, None) is not None]
        writers = []
        if emb.embed_proj is not None:  # embedding_size != hidden_size: the stream starts at the projection
            stream, writers = [], [f"{prefix}embeddings.embed_proj"]
        norms = [f"{prefix}embeddings.LayerNorm"]
        if encoder.relative_attention:
            stream.append(f"{prefix}encoder.rel_embeddings")
            norms.append(f"{prefix}encoder.LayerNorm")
        layers = list(zip(prefixes, self.layers(model)))
        lay = self.layout
        layer_norms = ("attention.output.LayerNorm", "output.LayerNorm")
        return {
            "embeddings": stream,
            "norms": norms + [f"{p}{n}" for p, _ in layers for n in layer_norms],
            "readers": [f"{p}{path}" for p, layer in layers for path in self.row_paths(layer)]
            + [f"{p}{lay['ffn_in']}" for p, _ in layers]
            + _head_readers(model, base),
            "writers": writers + [f"{p}{lay[r]}" for p, _ in layers for r in ("attention_output", "ffn_out")],
            "sources": [],
        }

    def model_input_names(self, config) -> list[str]:
        # the embeddings have a token-type table only when type_vocab_size > 0 (DeBERTa-v3 has none)
        names = ["input_ids", "attention_mask"]
        return names + ["token_type_ids"] if int(config_get(config, "type_vocab_size", 0) or 0) > 0 else names

    def _encoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, "base_model", model).encoder


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _conv_refusal(config, what: str) -> str:
    return (
        f"{what} is not supported for DeBERTa models with a ConvLayer (conv_kernel_size="
        f"{config_get(config, 'conv_kernel_size')}): its Conv1d runs after layer 0 on the embeddings and on the "
        "hidden width, which the surgery cannot cut or move. Prune heads and FFN neurons (any layer) and whole "
        "layers other than 0 with prune_layers; in prune_to_speedup pass drop_layers=False and prune_hidden=False."
    )


def _head_readers(model: nn.Module, base: nn.Module) -> list[str]:
    """The task head's Linears that read the residual stream, or a `ValueError` for a head hf_prune does not know."""
    if model is base:
        return []
    name = type(model).__name__
    if name.endswith(("ForSequenceClassification", "ForMultipleChoice")):
        return ["pooler.dense"]  # the ContextPooler reads the first token; the classifier reads the pooler
    if name.endswith("ForTokenClassification"):
        return ["classifier"]
    if name.endswith("ForQuestionAnswering"):
        return ["qa_outputs"]
    raise ValueError(
        f"Hidden dimensions of {name} cannot be pruned: its head is not one hf_prune knows (sequence or token "
        "classification, multiple choice, question answering). Prune heads and FFN neurons instead."
    )
