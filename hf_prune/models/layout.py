"""The adapter base of encoder families laid out alike: separate Q, K and V projections, one head per attention unit,
one attention output projection, and an FFN of one up and one down projection, each at a path a layout dict names.

BERT (and RoBERTa, XLM-RoBERTa, ELECTRA), DistilBERT, DeBERTa-v2 / v3 and ViT / DeiT differ only in those paths, in
what stands in for an attention block left without heads, and in the modules on their residual stream; the unit
groups, the sizes a config describes and the per-layer config lists they record are the same code, here.
"""

from __future__ import annotations

from torch import nn

from .adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get
from .remote_common import FFN_KEY, HEADS_KEY, HIDDEN_KEY, LAYOUT_KEY

__all__ = ["LayoutAdapter"]

_ATTENTION_ROLES = ("query", "key", "value", "attention_output")
_MLP_ROLES = ("ffn_in", "ffn_out")


class LayoutAdapter(ArchitectureAdapter):
    """An adapter whose modules are at the paths of `layout`.

    `layout` holds, relative to `model.base_model`, the `layers` list and, relative to one layer, the `query`, `key`,
    `value`, `attention_output`, `ffn_in` and `ffn_out` Linears, and the config names of the head count, FFN width
    and layer count (`config_heads`, `config_ffn`, `config_layers`). It is written into every export's config
    (`hf_prune_layout`), where the remote-code modeling file reads it back, so its keys never change.

    A subclass sets `layout` (the attention and MLP roles and the MLP cost paths follow from it unless it sets them)
    and writes what differs: `resize_units`, `drop_layers`, `hidden_modules`, the inputs.
    """

    layout: dict[str, str] = {}
    #: the config key of the model width (DistilBERT calls it `dim`)
    hidden_size_key: str = "hidden_size"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        layout = cls.__dict__.get("layout")
        if not layout:
            return
        if "attention_roles" not in cls.__dict__:
            cls.attention_roles = {r: layout[r] for r in _ATTENTION_ROLES}
        if "mlp_roles" not in cls.__dict__:
            cls.mlp_roles = {r: layout[r] for r in _MLP_ROLES}
        if "mlp_cost_paths" not in cls.__dict__:
            cls.mlp_cost_paths = tuple(layout[r] for r in _MLP_ROLES)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)
        return self.linear(base, self.layout["layers"])

    def head_dim(self, config) -> int:
        return config_get(config, self.hidden_size_key) // config_get(config, self.layout["config_heads"])

    def row_paths(self, layer: nn.Module) -> list[str]:
        """The projections whose output rows an attention head owns (Q, K and V here; DeBERTa adds the position
        projections a layer has)."""
        return [self.layout[r] for r in ("query", "key", "value")]

    def unit_group(self, layer: nn.Module, kind: str, config) -> UnitGroup:
        if kind == ATTENTION:
            size = self.head_dim(config)
            count = self.linear(layer, self.layout["query"]).out_features // size
            inputs = tuple(ChannelSlice(path, 0, size) for path in self.row_paths(layer))
            return UnitGroup(ATTENTION, count, inputs, ChannelSlice(self.layout["attention_output"], 1, size))
        if kind == MLP:
            count = self.linear(layer, self.layout["ffn_in"]).out_features
            inputs = (ChannelSlice(self.layout["ffn_in"], 0, 1),)
            return UnitGroup(MLP, count, inputs, ChannelSlice(self.layout["ffn_out"], 1, 1))
        raise ValueError(f"Unknown unit kind {kind!r}; use {ATTENTION!r} or {MLP!r}.")

    def dense_shape(self, config) -> tuple[int, int, int]:
        return tuple(int(config_get(config, self.layout[k])) for k in ("config_layers", "config_heads", "config_ffn"))

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        layers, heads, ffn = self.dense_shape(config)
        return (
            list(config_get(config, HEADS_KEY) or [heads] * layers),
            list(config_get(config, FFN_KEY) or [ffn] * layers),
        )

    def record_config(self, model: nn.Module) -> None:
        config = model.config
        layers = self.layers(model)
        setattr(config, HEADS_KEY, [self.unit_group(layer, ATTENTION, config).count for layer in layers])
        setattr(config, FFN_KEY, [self.unit_group(layer, MLP, config).count for layer in layers])
        setattr(config, LAYOUT_KEY, dict(self.layout))

    def is_pruned_config(self, config_dict: dict) -> bool:
        return HEADS_KEY in config_dict or FFN_KEY in config_dict or HIDDEN_KEY in config_dict

