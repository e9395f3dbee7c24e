"""Physical pruning: remove attention heads and FFN neurons from the Linear layers, and record the new shapes.

transformers 5 removed `prune_heads` and `config.pruned_heads`; hf_prune owns the surgery. BERT-style attention infers
the head count from tensor shapes, so once Q/K/V/O are shrunk every layer may keep a different number of heads, under
both the sdpa and eager attention implementations.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from . import structure
from .bert.modeling_hf_prune import FFN_KEY, HEADS_KEY, LAYOUT_KEY, PRUNED_HEADS_KEY, EmptySelfAttention, _set_module

__all__ = ["prune_heads", "prune_ffn_neurons", "record_shapes", "original_heads_kept"]


def _check_indices(kind: str, items: Mapping[int, Iterable[int]], sizes: list[int]) -> dict[int, list[int]]:
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
            )
        if idx:
            checked[layer] = idx
    return checked


def original_heads_kept(config, layer: int) -> list[int]:
    """Original (dense-model) indices of the heads a layer still has, in their current order."""
    dense_heads = getattr(config, structure.get_spec(config).config_heads)
    removed = set((getattr(config, PRUNED_HEADS_KEY, None) or {}).get(str(layer), []))
    return [h for h in range(dense_heads) if h not in removed]


def record_shapes(model: nn.Module) -> None:
    """Writes the per-layer head counts, FFN widths and layout into `model.config` (read back on load)."""
    spec = structure.get_spec(model)
    config = model.config
    setattr(config, HEADS_KEY, structure.num_heads(model))
    setattr(config, FFN_KEY, structure.ffn_size(model))
    setattr(config, LAYOUT_KEY, spec.to_dict())
    if getattr(config, PRUNED_HEADS_KEY, None) is None:
        setattr(config, PRUNED_HEADS_KEY, {})


@torch.no_grad()
def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Removes attention heads physically, in place.

    Args:
        model: a model of a type in `hf_prune.structure.ARCHITECTURES`.
        heads: `{layer_index: [head indices]}`, indices of the layer's current heads. Any subset may go, including
            every head of a layer: its attention block then contributes only its output projection's bias.

    Returns:
        The same model, with smaller Q/K/V/O projections and `model.config` recording the heads kept per layer.
    """
    spec = structure.get_spec(model)
    layers = structure.get_layers(model)
    size = structure.head_size(model)
    heads = _check_indices("heads", heads, structure.num_heads(model))
    config = model.config
    removed_map = {str(k): list(v) for k, v in (getattr(config, PRUNED_HEADS_KEY, None) or {}).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for layer_idx, prune_idx in heads.items():
            layer = layers[layer_idx]
            current = structure.get_module(layer, spec.query).out_features // size
            originals = original_heads_kept(config, layer_idx)
            keep_heads = [h for h in range(current) if h not in set(prune_idx)]
            keep_idx = torch.tensor([h * size + j for h in keep_heads for j in range(size)], dtype=torch.long)
            for role in ("query", "key", "value"):
                path = getattr(spec, role)
                _set_module(layer, path, prune_linear_layer(structure.get_module(layer, path), keep_idx, dim=0))
            out = spec.attention_output
            _set_module(layer, out, prune_linear_layer(structure.get_module(layer, out), keep_idx, dim=1))
            attn = structure.get_module(layer, spec.self_attention)
            if not keep_heads:
                names = tuple(getattr(spec, r).rpartition(".")[2] for r in ("query", "key", "value"))
                empty = EmptySelfAttention(structure.get_module(layer, spec.query).in_features, names, size)
                for name in names:
                    setattr(empty, name, getattr(attn, name))
                _set_module(layer, spec.self_attention, empty)
            else:
                setattr(attn, spec.heads_attr, len(keep_heads))
                setattr(attn, spec.all_head_size_attr, len(keep_heads) * size)
            removed_map[str(layer_idx)] = sorted(
                set(removed_map.get(str(layer_idx), [])) | {originals[h] for h in prune_idx}
            )
    setattr(config, PRUNED_HEADS_KEY, removed_map)
    record_shapes(model)
    return model


@torch.no_grad()
def prune_ffn_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Removes FFN intermediate neurons physically, in place.

    Args:
        model: a model of a type in `hf_prune.structure.ARCHITECTURES`.
        neurons: `{layer_index: [neuron indices]}` of the layer's current neurons; all of a layer's neurons may go (its
            FFN then adds only the down projection's bias).

    Returns:
        The same model, with `model.config` recording the FFN width per layer.
    """
    spec = structure.get_spec(model)
    layers = structure.get_layers(model)
    neurons = _check_indices("neurons", neurons, structure.ffn_size(model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for layer_idx, prune_idx in neurons.items():
            layer = layers[layer_idx]
            up = structure.get_module(layer, spec.ffn_in)
            drop = set(prune_idx)
            keep_idx = torch.tensor([i for i in range(up.out_features) if i not in drop], dtype=torch.long)
            _set_module(layer, spec.ffn_in, prune_linear_layer(up, keep_idx, dim=0))
            down = structure.get_module(layer, spec.ffn_out)
            _set_module(layer, spec.ffn_out, prune_linear_layer(down, keep_idx, dim=1))
    record_shapes(model)
    return model
