"""The Llama family (llama, mistral, qwen2, qwen3 and any decoder with their layout): pre-norm decoder layers with
separate Q, K, V projections under grouped-query attention, RMSNorm, and a gated MLP (gate, up, down).

The attention unit is a key/value group with the query heads that read it: removing a unit removes one key and one
value head and `num_attention_heads / num_key_value_heads` query heads, so every layer keeps a valid GQA layout
(the group size never changes; transformers infers the head counts from the projections' widths). Qwen3's per-head
q/k norms act on one head's width and stay whole. An MLP neuron is a row of the gate and up projections and a column
of the down projection. A layer that keeps no group gets an `EmptyAttention`, a layer that keeps no neuron an MLP of
zero width (it adds nothing). Whole layers can be removed (depth pruning, as Minitron and ShortGPT do), and
dimensions of the residual stream (Minitron's embedding channels): the embeddings' columns, every RMSNorm's weight
(the masked model normalises over the kept dimensions), the inputs of Q/K/V, gate and up and of the task head (a
tied output projection stays tied), the outputs of O and down.

Shapes that are the same in every layer are written as the family's own config (`num_key_value_heads`,
`num_attention_heads`, `intermediate_size`, `num_hidden_layers`, with `head_dim` explicit), so plain
`from_pretrained` and serving engines, which refuse per-layer sizes, load the export without remote code, when the
family's config class accepts them (LlamaConfig wants the query heads to divide the hidden size). Other shapes are
written per layer and rebuilt by the remote-code modeling file; a narrower stream is the config's `hidden_size`
where the config accepts it (a multiple of the query heads), else recorded and rebuilt like the per-layer shapes.
The dense model's sizes are kept in `hf_prune_dense_shape` for the report and the card.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import logging

from ..adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get
from ..remote_common import HIDDEN_KEY
from . import modeling_hf_prune
from .modeling_hf_prune import KV_HEADS_KEY, MLP_KEY, EmptyAttention

logger = logging.get_logger(__name__)

__all__ = ["LlamaAdapter", "DENSE_SHAPE_KEY"]

# the dense model's sizes, written once, before the first pruned shapes replace the family's fields
DENSE_SHAPE_KEY = "hf_prune_dense_shape"
_DENSE_FIELDS = ("num_hidden_layers", "num_key_value_heads", "intermediate_size")


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
    can_drop_layers = True
    uniform_exports_own_config = True

    def output_bias_flags(self, config) -> dict[str, tuple[str, tuple[str, ...]]]:
        # LlamaConfig has both flags, Qwen3Config the attention one; Mistral's and Qwen2's output projections never
        # have a bias, so a bias there would need remote code
        kinds = {"llama": (ATTENTION, MLP), "qwen3": (ATTENTION,)}.get(config_get(config, "model_type"), ())
        flags = {
            ATTENTION: ("attention_bias", tuple(f"self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj", "o_proj"))),
            MLP: ("mlp_bias", tuple(f"mlp.{r}" for r in ("gate_proj", "up_proj", "down_proj"))),
        }
        return {k: flags[k] for k in kinds}

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
        dense = config_get(config, DENSE_SHAPE_KEY) or {k: config_get(config, k) for k in _DENSE_FIELDS}
        return tuple(int(dense[k]) for k in _DENSE_FIELDS)

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        # the family's own fields hold the shapes of every layer that has no per-layer entry
        layers, kv, width = (int(config_get(config, k)) for k in _DENSE_FIELDS)
        return (
            list(config_get(config, KV_HEADS_KEY) or [kv] * layers),
            list(config_get(config, MLP_KEY) or [width] * layers),
        )

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind == ATTENTION and count == 0 and not isinstance(layer.self_attn, EmptyAttention):
            layer.self_attn = EmptyAttention(layer.self_attn)

    def record_config(self, model: nn.Module) -> None:
        config = model.config
        _remember_dense(config)
        config.head_dim = self.head_dim(config)  # explicit: the head count below no longer implies it
        group = self.heads_per_unit(config)
        layers = self.layers(model)
        kv = [self.unit_group(layer, ATTENTION, config).count for layer in layers]
        widths = [self.unit_group(layer, MLP, config).count for layer in layers]
        config.num_hidden_layers = len(layers)
        uniform = {"num_key_value_heads": kv[0], "num_attention_heads": kv[0] * group, "intermediate_size": widths[0]}
        if len(set(kv)) == 1 and kv[0] > 0 and len(set(widths)) == 1 and widths[0] > 0 and _accepts(config, uniform):
            # uniform: the family's own config describes every layer
            for key, value in uniform.items():
                setattr(config, key, value)
            for key in (KV_HEADS_KEY, MLP_KEY):
                if hasattr(config, key):
                    delattr(config, key)
        else:
            setattr(config, KV_HEADS_KEY, kv)
            setattr(config, MLP_KEY, widths)

    def accepts_uniform(self, config, units: int) -> bool:
        group = self.heads_per_unit(config)
        return _accepts(config, {"num_key_value_heads": units, "num_attention_heads": units * group})

    def record_hidden(self, model: nn.Module) -> None:
        # a narrower stream that the family's config accepts as its hidden_size is written there (LlamaConfig wants
        # it to be a multiple of the query heads), so a uniform export still loads without remote code
        config = model.config
        _remember_dense(config)
        size, head_dim = int(config_get(config, HIDDEN_KEY)["size"]), self.head_dim(config)
        if _accepts(config, {"hidden_size": size, "head_dim": head_dim}):
            config.head_dim, config.hidden_size = head_dim, size
            delattr(config, HIDDEN_KEY)

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        # pre-norm: every reader of the stream reads an RMSNorm's output (the masked norms stand for the removed
        # dimensions), so the embeddings and the output projections need no zeroing; Qwen3's q / k norms act on one
        # head's width, not on the stream
        base = getattr(model, "base_model", model)
        prefix, layers = self.name_prefixes(model)
        norms = ("input_layernorm", "post_attention_layernorm")
        readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        return {
            "embeddings": [f"{prefix}embed_tokens"],
            "norms": [f"{p}{n}" for p in layers for n in norms] + [f"{prefix}norm"],
            "readers": [f"{p}{r}" for p in layers for r in readers] + _head_readers(model, base),
            "writers": [f"{p}{r}" for p in layers for r in ("self_attn.o_proj", "mlp.down_proj")],
            "sources": [],
        }

    def needs_remote_code(self, config) -> bool:
        return any(config_get(config, k) is not None for k in (KV_HEADS_KEY, MLP_KEY, HIDDEN_KEY))

    def empty_layer_is_identity(self, model: nn.Module) -> bool:
        # pre-norm: x + attention(norm(x)) + mlp(norm(...)); with no units each adds only its output bias
        outputs = (self.attention_roles["o_proj"], self.mlp_roles["down_proj"])
        return all(self.linear(layer, path).bias is None for layer in self.layers(model) for path in outputs)

    def is_pruned_config(self, config_dict: dict) -> bool:
        return any(k in config_dict for k in (KV_HEADS_KEY, MLP_KEY, DENSE_SHAPE_KEY, HIDDEN_KEY))

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        base = getattr(model, "base_model", model)
        config = model.config
        base.layers = nn.ModuleList(base.layers[i] for i in keep)
        for new, layer in enumerate(base.layers):  # the KV cache is indexed by the attention's layer_idx
            layer.self_attn.layer_idx = new
        for key in ("layer_types", KV_HEADS_KEY, MLP_KEY):
            values = config_get(config, key)
            if values is not None:
                setattr(config, key, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)


def _remember_dense(config) -> None:
    """Records the dense model's sizes once, before the first pruned shapes replace the family's fields."""
    if config_get(config, DENSE_SHAPE_KEY) is None:
        setattr(config, DENSE_SHAPE_KEY, {k: int(config_get(config, k)) for k in _DENSE_FIELDS})


def _head_readers(model: nn.Module, base: nn.Module) -> list[str]:
    """The task head's Linears that read the stream (the final norm's output), or a `ValueError` naming the fix."""
    if model is base:
        return []
    for suffix, head in (("ForCausalLM", "lm_head"), ("ForSequenceClassification", "score"),
                         ("ForTokenClassification", "score"), ("ForQuestionAnswering", "qa_outputs")):  # fmt: skip
        if type(model).__name__.endswith(suffix) and isinstance(getattr(model, head, None), nn.Linear):
            return [head]
    raise ValueError(
        f"Hidden dimensions of {type(model).__name__} cannot be pruned: its head is not one hf_prune knows (causal "
        "LM, sequence or token classification, question answering). Prune its key/value groups, MLP neurons or layers."
    )


def _accepts(config, fields: dict) -> bool:
    """Whether the family's config class takes `fields` (LlamaConfig, for one, refuses a head count that does not
    divide the hidden size, even with an explicit `head_dim`)."""
    try:
        type(config)(**{**config.to_dict(), **fields})
    except Exception as err:  # noqa: BLE001  (validators raise their own error classes)
        logger.info("Per-layer sizes kept: %s refuses %s (%s).", type(config).__name__, fields, err)
        return False
    return True
