"""The one architecture table: where each encoder layer keeps its attention projections, FFN and head count.

Every other module asks this one where things live, so adding an architecture is one entry in `ARCHITECTURES`. The
paths are relative to the model's `base_model` (for the layer list) and to one layer (for everything else). The
resolved layout is also written into `config.json` of pruned models so the self-contained remote-code modeling file can
rebuild their shapes without importing hf_prune.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "get_spec",
    "get_layers",
    "get_module",
    "attention_linears",
    "ffn_linears",
    "head_size",
    "num_heads",
    "ffn_size",
    "supported_model_types",
    "module_name",
    "layer_of",
    "role_modules",
    "ATTENTION_ROLES",
    "FFN_ROLES",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the prunable pieces of one encoder layer live.

    Args:
        layers: dotted path of the `nn.ModuleList` of layers, relative to `model.base_model`.
        self_attention: path of the self-attention module (owns Q/K/V and the head count attributes).
        query / key / value: paths of the Q, K, V projections (`nn.Linear`, out_features = heads * head_size).
        attention_output: path of the attention output projection (in_features = heads * head_size).
        ffn_in / ffn_out: paths of the FFN up and down projections (`nn.Linear`).
        heads_attr / head_size_attr / all_head_size_attr: attribute names on the self-attention module.
        config_heads / config_ffn / config_layers: the config attributes of the dense model.
    """

    layers: str = "encoder.layer"
    self_attention: str = "attention.self"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attention_output: str = "attention.output.dense"
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    heads_attr: str = "num_attention_heads"
    head_size_attr: str = "attention_head_size"
    all_head_size_attr: str = "all_head_size"
    config_heads: str = "num_attention_heads"
    config_ffn: str = "intermediate_size"
    config_layers: str = "num_hidden_layers"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_BERT_LIKE = ArchitectureSpec()

# model_type -> layout. BERT, RoBERTa, XLM-RoBERTa and ELECTRA share the BERT encoder layout in transformers 5.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
}

# Roles that name one nn.Linear of a layer; the presets of `pruning_target` are groups of them.
ATTENTION_ROLES = ("query", "key", "value", "attention_output")
FFN_ROLES = ("ffn_in", "ffn_out")


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_spec(model_or_config) -> ArchitectureSpec:
    """Returns the layout of a model (or config), or raises a `ValueError` listing the supported model types."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"hf_prune does not know where the attention heads and FFN of model_type={model_type!r} live. "
            f"Supported model types: {', '.join(supported_model_types())}. To add one, add an ArchitectureSpec "
            "entry to hf_prune.structure.ARCHITECTURES."
        )
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)` with an error that names the path and the root's class."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"{type(root).__name__} has no submodule {path!r}: {err}") from err


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of `model` (a base model or a model with a head)."""
    spec = get_spec(model)
    base = getattr(model, "base_model", model)
    return get_module(base, spec.layers)


def attention_linears(layer: nn.Module, spec: ArchitectureSpec) -> dict[str, nn.Linear]:
    """`{"query": ..., "key": ..., "value": ..., "attention_output": ...}` of one layer."""
    return {role: get_module(layer, getattr(spec, role)) for role in ATTENTION_ROLES}


def ffn_linears(layer: nn.Module, spec: ArchitectureSpec) -> dict[str, nn.Linear]:
    """`{"ffn_in": ..., "ffn_out": ...}` of one layer."""
    return {role: get_module(layer, getattr(spec, role)) for role in FFN_ROLES}


def head_size(model: nn.Module) -> int:
    """Width of one attention head (the same in every layer; pruning removes heads, not head dimensions)."""
    config = model.config
    return config.hidden_size // getattr(config, get_spec(model).config_heads)


def num_heads(model: nn.Module) -> list[int]:
    """Current number of attention heads of every layer, read from the Q projection's width."""
    spec, size = get_spec(model), head_size(model)
    return [get_module(layer, spec.query).out_features // size for layer in get_layers(model)]


def ffn_size(model: nn.Module) -> list[int]:
    """Current FFN intermediate width of every layer."""
    spec = get_spec(model)
    return [get_module(layer, spec.ffn_in).out_features for layer in get_layers(model)]


def module_name(model: nn.Module, layer_idx: int, role: str) -> str:
    """Fully qualified name of one layer's Linear for `role`, as in `model.named_modules()`."""
    spec = get_spec(model)
    prefix = getattr(model, "base_model_prefix", "")
    base = f"{prefix}." if prefix and getattr(model, prefix, None) is not None else ""
    return f"{base}{spec.layers}.{layer_idx}.{getattr(spec, role)}"


def layer_prefixes(model: nn.Module) -> list[str]:
    """Qualified-name prefix of every encoder layer (`"bert.encoder.layer.3."`), to place any module in its layer."""
    leaf = get_spec(model).ffn_in
    return [module_name(model, i, "ffn_in").rsplit(leaf, 1)[0] for i in range(len(get_layers(model)))]


def layer_of(model: nn.Module, name: str) -> int | None:
    """Index of the encoder layer holding the module `name`, or None when it is outside the layers."""
    for i, prefix in enumerate(layer_prefixes(model)):
        if name.startswith(prefix):
            return i
    return None


def role_modules(model: nn.Module, roles: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """`{qualified name: (layer, role)}` of the given roles in every layer (roles: see ATTENTION_ROLES, FFN_ROLES)."""
    return {module_name(model, i, role): (i, role) for i in range(len(get_layers(model))) for role in roles}
