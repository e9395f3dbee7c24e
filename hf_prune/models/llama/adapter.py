"""The Llama family (llama, mistral, qwen2, qwen3 and any decoder with their layout): pre-norm decoder layers with
separate Q, K, V projections under grouped-query attention, RMSNorm, and a gated MLP (gate, up, down).

The attention unit is a key/value group with the query heads that read it: removing a unit removes one key and one
value head and `num_attention_heads / num_key_value_heads` query heads, so every layer keeps a valid GQA layout
(the group size never changes; transformers infers the head counts from the projections' widths). Qwen3's per-head
q/k norms act on one head's width and stay whole. An MLP neuron is a row of the gate and up projections and a column
of the down projection. A layer that keeps no group gets an `EmptyAttention`, a layer that keeps no neuron an MLP of
zero width (it adds nothing).
"""

from __future__ import annotations

from torch import nn

from ..adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get
from . import modeling_hf_prune
from .modeling_hf_prune import KV_HEADS_KEY, MLP_KEY, EmptyAttention

__all__ = ["LlamaAdapter"]


class LlamaAdapter(ArchitectureAdapter):
    """Adapter of the Llama decoder layout, shared by Llama, Mistral, Qwen2 and Qwen3 in transformers 5."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    attention_roles = {r: f"self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp_roles = {r: f"mlp.{r}" for r in ("gate_proj", "up_proj", "down_proj")}
    attention_cost_paths = ("self_attn",)
    mlp_cost_paths = ("mlp",)
    # pre-norm: the MLP output is added to the input of its norm
    mlp_residual_path = "post_attention_layernorm"
    modeling_module = modeling_hf_prune

    def layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)
        return base.layers

    def head_dim(self, config) -> int:
        return config_get(config, "head_dim") or config_get(config, "hidden_size") // config_get(
            config, "num_attention_heads"
        )

    def heads_per_unit(self, config) -> int:
        return config_get(config, "num_attention_heads") // config_get(config, "num_key_value_heads")

    def unit_group(self, layer: nn.Module, kind: str, config) -> UnitGroup:
        if kind == ATTENTION:
            size, group = self.head_dim(config), self.heads_per_unit(config)
            count = self.linear(layer, "self_attn.k_proj").out_features // size
            inputs = (
                ChannelSlice("self_attn.q_proj", 0, group * size),
                ChannelSlice("self_attn.k_proj", 0, size),
                ChannelSlice("self_attn.v_proj", 0, size),
            )
            return UnitGroup(ATTENTION, count, inputs, ChannelSlice("self_attn.o_proj", 1, group * size))
        if kind == MLP:
            count = self.linear(layer, "mlp.down_proj").in_features
            inputs = (ChannelSlice("mlp.gate_proj", 0, 1), ChannelSlice("mlp.up_proj", 0, 1))
            return UnitGroup(MLP, count, inputs, ChannelSlice("mlp.down_proj", 1, 1))
        raise ValueError(f"Unknown unit kind {kind!r}; use {ATTENTION!r} or {MLP!r}.")

    def dense_shape(self, config) -> tuple[int, int, int]:
        keys = ("num_hidden_layers", "num_key_value_heads", "intermediate_size")
        return tuple(int(config_get(config, k)) for k in keys)

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        layers, kv, width = self.dense_shape(config)
        return (
            list(config_get(config, KV_HEADS_KEY) or [kv] * layers),
            list(config_get(config, MLP_KEY) or [width] * layers),
        )

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind == ATTENTION and count == 0 and not isinstance(layer.self_attn, EmptyAttention):
            layer.self_attn = EmptyAttention(layer.self_attn)

    def record_config(self, model: nn.Module) -> None:
        config = model.config
        layers = self.layers(model)
        setattr(config, KV_HEADS_KEY, [self.unit_group(layer, ATTENTION, config).count for layer in layers])
        setattr(config, MLP_KEY, [self.unit_group(layer, MLP, config).count for layer in layers])

    def is_pruned_config(self, config_dict: dict) -> bool:
        return KV_HEADS_KEY in config_dict or MLP_KEY in config_dict
