"""Physical pruning: remove attention units and MLP neurons from the Linear layers, and record the new shapes.

transformers 5 removed `prune_heads` and `config.pruned_heads`; hf_prune owns the surgery. It is one generic cut: the
adapter's [`UnitGroup`] says which channels of which Linear every unit owns (fused projections included), the cut
keeps the other channels of each Linear, and the adapter updates what the Linears do not carry (head counts, a stand-in
for an attention block left without heads) and records the per-layer shapes in the config.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from .adapter import ATTENTION, MLP, UnitGroup, config_get, set_module
from .auto import ADAPTER_MAPPING, get_adapter
from .hidden import HIDDEN_KEY

__all__ = [
    "PRUNED_HEADS_KEY",
    "KEPT_LAYERS_KEY",
    "prune_units",
    "prune_layers",
    "prune_heads",
    "prune_ffn_neurons",
    "record_shapes",
    "original_heads_kept",
]

# `{layer: [original indices of the attention units removed]}` in the config of a pruned model
PRUNED_HEADS_KEY = "hf_prune_pruned_heads"
# the original (dense-model) index of every layer a depth-pruned model kept
KEPT_LAYERS_KEY = "hf_prune_kept_layers"


def _check_indices(
    kind: str, items: Mapping[int, Iterable[int]], sizes: list[int], hint: str = ""
) -> dict[int, list[int]]:
    """Validates `{layer: [index, ...]}` against the current sizes; returns sorted, de-duplicated lists."""
    if not isinstance(items, Mapping):
        raise TypeError(f"{kind} must be a dict {{layer_index: [indices]}}, got {type(items).__name__}.")
    checked = {}
    for layer, idx in items.items():
        layer = int(layer)
        if not 0 <= layer < len(sizes):
            raise ValueError(f"Layer {layer} is out of range: the model has layers 0..{len(sizes) - 1}.")
        idx = sorted({int(i) for i in idx})
        bad = [i for i in idx if not 0 <= i < sizes[layer]]
        if bad:
            raise ValueError(
                f"{kind} index {bad} out of range for layer {layer}, which has {sizes[layer]} {kind} "
                f"(valid: 0..{sizes[layer] - 1}). Indices refer to the model's current {kind}, after earlier pruning."
                + hint
            )
        if idx:
            checked[layer] = idx
    return checked


def original_heads_kept(config, layer: int) -> list[int]:
    """Original (dense-model) indices of the attention units a layer still has, in their current order."""
    dense_units = get_adapter(config).dense_shape(config)[1]
    removed = set((config_get(config, PRUNED_HEADS_KEY) or {}).get(str(layer), []))
    return [h for h in range(dense_units) if h not in removed]


def record_shapes(model: nn.Module) -> None:
    """Writes the per-layer shapes into `model.config` (read back on load)."""
    get_adapter(model).record_config(model)
    if getattr(model.config, PRUNED_HEADS_KEY, None) is None:
        setattr(model.config, PRUNED_HEADS_KEY, {})


def _cut(layer: nn.Module, group: UnitGroup, prune_idx: list[int]) -> None:
    """Removes the channels of `prune_idx` (units of `group`) from every Linear the group spans."""
    removed: dict[tuple[str, int], set[int]] = {}
    for s in group.slices:
        removed.setdefault((s.path, s.dim), set()).update(s.channels(prune_idx))
    for (path, dim), channels in removed.items():
        linear = layer.get_submodule(path)
        size = linear.out_features if dim == 0 else linear.in_features
        keep_idx = torch.tensor([c for c in range(size) if c not in channels], dtype=torch.long)
        set_module(layer, path, prune_linear_layer(linear, keep_idx, dim=dim))


@torch.no_grad()
def prune_units(model: nn.Module, kind: str, units: Mapping[int, Iterable[int]]) -> nn.Module:
    """Removes attention units or MLP neurons physically, in place.

    Args:
        model: a model of a supported family (see `hf_prune.models.auto.supported_model_types`).
        kind: `"attention"` (heads, or key/value groups with their query heads) or `"mlp"` (neurons).
        units: `{layer_index: [unit indices]}`, indices of the layer's current units. Any subset may go, including
            every unit of a layer.

    Returns:
        The same model, with smaller projections and `model.config` recording the per-layer shapes.
    """
    adapter = get_adapter(model)
    config = model.config
    layers = adapter.layers(model)
    groups = [adapter.unit_group(layer, kind, config) for layer in layers]
    per_unit = adapter.heads_per_unit(config) if kind == ATTENTION else 1
    label = "heads" if kind == ATTENTION else "neurons"
    hint = ""
    if per_unit > 1:  # grouped-query attention: a unit is a key/value group, so every layer keeps a valid layout
        label = "key/value groups"
        hint = (
            f" Under grouped-query attention whole groups go: group g is query heads {per_unit}g to {per_unit}g + "
            f"{per_unit - 1} with their key and value head; one query head alone cannot be removed."
        )
    units = _check_indices(label, units, [g.count for g in groups], hint)
    removed_map = {str(k): list(v) for k, v in (getattr(config, PRUNED_HEADS_KEY, None) or {}).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for layer_idx, prune_idx in units.items():
            layer, group = layers[layer_idx], groups[layer_idx]
            originals = original_heads_kept(config, layer_idx) if kind == ATTENTION else None
            _cut(layer, group, prune_idx)
            adapter.resize_units(layer, kind, group.count - len(prune_idx), config)
            if originals is not None:
                removed_map[str(layer_idx)] = sorted(
                    set(removed_map.get(str(layer_idx), [])) | {originals[h] for h in prune_idx}
                )
    if kind == ATTENTION:
        setattr(config, PRUNED_HEADS_KEY, removed_map)
    record_shapes(model)
    return model


def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Removes attention heads physically, in place.

    Args:
        model: a model of a supported family.
        heads: `{layer_index: [head indices]}`, indices of the layer's current attention units (heads; key/value
            groups under grouped-query attention). Any subset may go, including every head of a layer: its attention
            block then contributes only its output projection's bias.

    Returns:
        The same model, with smaller attention projections and `model.config` recording the heads kept per layer.
    """
    return prune_units(model, ATTENTION, heads)


def prune_ffn_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Removes FFN (MLP) intermediate neurons physically, in place.

    Args:
        model: a model of a supported family.
        neurons: `{layer_index: [neuron indices]}` of the layer's current neurons; all of a layer's neurons may go (its
            MLP then adds only the output projection's bias).

    Returns:
        The same model, with `model.config` recording the MLP width per layer.
    """
    return prune_units(model, MLP, neurons)


@torch.no_grad()
def prune_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Removes whole layers physically (depth pruning), in place.

    Args:
        model: a model of a family whose adapter can drop layers (the Llama family).
        layers: indices of the model's current layers to remove; at least one layer must stay.

    Returns:
        The same model, with fewer layers; `model.config` records the layer count and, in `hf_prune_kept_layers`,
        the original index of every layer kept.
    """
    adapter = get_adapter(model)
    config = model.config
    if not adapter.can_drop_layers:
        raise ValueError(
            f"Whole layers of model_type={config.model_type!r} cannot be removed yet; the families that can: "
            f"{', '.join(sorted(t for t, a in ADAPTER_MAPPING.items() if a.can_drop_layers))}. Prune its heads and "
            "neurons instead."
        )
    count = len(adapter.layers(model))
    drop = sorted({int(i) for i in layers})
    bad = [i for i in drop if not 0 <= i < count]
    if bad:
        raise ValueError(f"Layer {bad} out of range: the model has layers 0..{count - 1}.")
    if len(drop) == count:
        raise ValueError(f"Removing all {count} layers leaves no model; keep at least one.")
    keep = [i for i in range(count) if i not in set(drop)]
    originals = list(config_get(config, KEPT_LAYERS_KEY) or range(count))
    removed = {str(k): v for k, v in (config_get(config, PRUNED_HEADS_KEY) or {}).items()}
    adapter.drop_layers(model, keep)
    setattr(config, KEPT_LAYERS_KEY, [originals[i] for i in keep])
    renumbered = {str(new): removed[str(old)] for new, old in enumerate(keep) if str(old) in removed}
    setattr(config, PRUNED_HEADS_KEY, renumbered)
    hidden = config_get(config, HIDDEN_KEY)
    if hidden:  # the modules rebuilt at the kept width are named by layer index: name the layers that are left
        setattr(config, HIDDEN_KEY, {"size": hidden["size"], **adapter.hidden_modules(model)})
    record_shapes(model)
    return model
