"""The ModernBERT family: pre-norm encoder layers with one fused `Wqkv` projection, rotary embeddings, a gated MLP
(`Wi` rows are [input half | gate half]), and local (sliding-window) attention in some layers, global in the others.

An attention unit is one head: its rows of the Q, K and V thirds of `Wqkv` (three slices of one Linear at different
offsets) and its columns of `Wo`. The attention infers the head count from the width of `Wqkv`'s output, so each
layer may keep a different number of heads (transformers >= 5.1; 5.0's attention took it from the config and is
refused). A layer that keeps no head gets an `EmptyAttention`; a layer that keeps no neuron keeps an MLP of zero
width, which adds only its output bias. An MLP neuron is row `j` of `Wi`'s input half, row `width + j` of its gate
half (`width`: the layer's neurons now) and column `j` of `Wo`.

A layer's attention type (sliding or global) is read from `config.layer_types` when the model is built, so dropping
layers keeps the kept layers' entries. The dense model's first layer has no attention norm (the embeddings' norm
stands in); when it is dropped the new first layer keeps its LayerNorm, which the config records for the remote code.

Hidden dimensions: the token embeddings, every LayerNorm on the stream (the embeddings' norm, attention and MLP norms,
the final norm), the readers `Wqkv`, `Wi` and a task head's `head.dense`, the writers (both `Wo`). The head's own
norm and classifier act on the head's output, not on the stream, and keep their width (with either pooling, "cls" or
"mean"). A masked LM whose decoder is tied to the token embeddings is refused: the decoder reads the head's output.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import logging

from ..adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get
from ..remote_common import FFN_KEY, HEADS_KEY, HIDDEN_KEY
from . import modeling_hf_prune
from .modeling_hf_prune import ATTN_NORMS_KEY, EmptyAttention, check_layout

logger = logging.get_logger(__name__)

__all__ = ["ModernBertAdapter"]

_TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


class ModernBertAdapter(ArchitectureAdapter):
    """Adapter of ModernBERT (`model_type="modernbert"`) in transformers >= 5.1."""

    model_types = ("modernbert",)
    attention_roles = {"qkv": "attn.Wqkv", "attention_output": "attn.Wo"}
    mlp_roles = {"ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo"}
    attention_cost_paths = ("attn",)
    mlp_cost_paths = ("mlp",)
    # pre-norm: the MLP output is added to the input of its norm
    mlp_residual_path = "mlp_norm"
    modeling_module = modeling_hf_prune
    can_drop_layers = True
    # the flag is the family's, not the model's: a classifier with classifier_pooling="mean" reads every token of the
    # last layer, so tuning fits it on every token (right for both poolings)
    classifier_reads_first_token = False

    def output_bias_flags(self, config) -> dict[str, tuple[str, tuple[str, ...]]]:
        return {ATTENTION: ("attention_bias", ("attn.Wqkv", "attn.Wo")), MLP: ("mlp_bias", ("mlp.Wi", "mlp.Wo"))}

    def layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)
        return base.layers

    def head_dim(self, config) -> int:
        return config_get(config, "hidden_size") // config_get(config, "num_attention_heads")

    def unit_group(self, layer: nn.Module, kind: str, config) -> UnitGroup:
        if kind == ATTENTION:
            check_layout(layer.attn)
            size = self.head_dim(config)
            count = layer.attn.Wqkv.out_features // (3 * size)
            # [Q of all heads | K of all heads | V of all heads]: head h owns rows h*size.. of each third
            inputs = tuple(ChannelSlice("attn.Wqkv", 0, size, offset=part * count * size) for part in range(3))
            return UnitGroup(ATTENTION, count, inputs, ChannelSlice("attn.Wo", 1, size))
        if kind == MLP:
            count = layer.mlp.Wo.in_features
            # `chunk(2)`: neuron j is row j of the input half and row count + j of the gate half
            inputs = (ChannelSlice("mlp.Wi", 0, 1), ChannelSlice("mlp.Wi", 0, 1, offset=count))
            return UnitGroup(MLP, count, inputs, ChannelSlice("mlp.Wo", 1, 1))
        raise ValueError(f"Unknown unit kind {kind!r}; use {ATTENTION!r} or {MLP!r}.")

    def dense_shape(self, config) -> tuple[int, int, int]:
        keys = ("num_hidden_layers", "num_attention_heads", "intermediate_size")
        return tuple(int(config_get(config, k)) for k in keys)

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        layers, heads, ffn = self.dense_shape(config)
        return (
            list(config_get(config, HEADS_KEY) or [heads] * layers),
            list(config_get(config, FFN_KEY) or [ffn] * layers),
        )

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        # `Wqkv`'s width carries the head count; only a layer without heads needs a stand-in (a view of zero heads
        # cannot infer its size)
        if kind == ATTENTION and count == 0 and not isinstance(layer.attn, EmptyAttention):
            layer.attn = EmptyAttention(layer.attn)

    def record_config(self, model: nn.Module) -> None:
        config = model.config
        layers = self.layers(model)
        setattr(config, HEADS_KEY, [self.unit_group(layer, ATTENTION, config).count for layer in layers])
        setattr(config, FFN_KEY, [self.unit_group(layer, MLP, config).count for layer in layers])
        norms = [not isinstance(layer.attn_norm, nn.Identity) for layer in layers]
        if norms != [i > 0 for i in range(len(layers))]:  # what the family builds from the layer index
            setattr(config, ATTN_NORMS_KEY, norms)
        elif hasattr(config, ATTN_NORMS_KEY):
            delattr(config, ATTN_NORMS_KEY)

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        base = getattr(model, "base_model", model)
        config = model.config
        if keep[0] != 0 and isinstance(base.layers[0].attn_norm, nn.Identity):
            logger.info(
                "Layer 0 is dropped: layer %d becomes the first and keeps its attention LayerNorm (recorded in %s).",
                keep[0], ATTN_NORMS_KEY,
            )  # fmt: skip
        base.layers = nn.ModuleList(base.layers[i] for i in keep)
        for new, layer in enumerate(base.layers):
            for module in (layer, layer.attn):
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        # each kept layer keeps its attention type: the model picks its mask and rotary table by `layer_types`
        for key in ("layer_types", HEADS_KEY, FFN_KEY, ATTN_NORMS_KEY):
            values = config_get(config, key)
            if values is not None:
                setattr(config, key, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)

    def empty_layer_is_identity(self, model: nn.Module) -> bool:
        # pre-norm: x + attn(norm(x)) + mlp(norm(...)); with no units each adds only its output projection's bias
        return all(layer.attn.Wo.bias is None and layer.mlp.Wo.bias is None for layer in self.layers(model))

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        base = getattr(model, "base_model", model)
        prefix, prefixes = self.name_prefixes(model)
        head = _head_readers(model, base)
        layers = list(zip(prefixes, self.layers(model)))
        norms = [f"{prefix}embeddings.norm"]
        for p, layer in layers:
            norms += [f"{p}attn_norm"] if isinstance(layer.attn_norm, nn.LayerNorm) else []
            norms.append(f"{p}mlp_norm")
        return {
            "embeddings": [f"{prefix}embeddings.tok_embeddings"],
            "norms": norms + [f"{prefix}final_norm"],
            "readers": [f"{p}{r}" for p, _ in layers for r in ("attn.Wqkv", "mlp.Wi")] + head,
            "writers": [f"{p}{r}" for p, _ in layers for r in ("attn.Wo", "mlp.Wo")],
            "sources": [],
        }

    def is_pruned_config(self, config_dict: dict) -> bool:
        return any(k in config_dict for k in (HEADS_KEY, FFN_KEY, HIDDEN_KEY, ATTN_NORMS_KEY))


def _head_readers(model: nn.Module, base: nn.Module) -> list[str]:
    """The task head's Linears that read the residual stream (its `head.dense`), or a `ValueError`."""
    if model is base:
        return []
    name = type(model).__name__
    if name.endswith(_TASK_HEADS):
        return ["head.dense"]
    if name.endswith("ForMaskedLM"):
        decoder, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if decoder is not None and decoder.weight is embeddings.weight:
            raise ValueError(
                f"Hidden dimensions of {name} cannot be pruned while its decoder shares its weights with the token "
                "embeddings (tie_word_embeddings=True): the decoder reads the head's output, which keeps the full "
                "width. Build the model with tie_word_embeddings=False, or prune heads, FFN neurons and layers "
                "instead."
            )
        return ["head.dense"]
    raise ValueError(
        f"Hidden dimensions of {name} cannot be pruned: its head is not one hf_prune knows (sequence or token "
        "classification, multiple choice, question answering, masked LM). Prune heads and FFN neurons instead."
    )
