# Self-contained: this module is written into every exported model's remote-code modeling file (in place of the
# family file's import of it, see `hf_prune.export.persistence.modeling_source`), so it imports nothing but torch.
"""The part of the remote-code modeling files every family shares: the config keys of the recorded shapes, building a
module of a new shape, and rebuilding the modules on the residual stream at the kept width.

Each family's `models/<family>/modeling_hf_prune.py` imports these names from here inside hf_prune; its export is one
file with this module's text in place of that import, so a pruned model loads with `trust_remote_code=True` and no
hf_prune installed.
"""

import torch
from torch import nn

LAYOUT_KEY = "hf_prune_layout"
HEADS_KEY = "layer_num_attention_heads"
FFN_KEY = "layer_intermediate_sizes"
# `{"size": kept residual width, role: [qualified module or parameter names]}` (written by hf_prune.models.hidden)
HIDDEN_KEY = "hf_prune_hidden"


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule of `root` at the dotted `path`."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A new Linear of the wanted shape on the same device / dtype (the weights are loaded afterwards), or `linear`
    itself when its shape is already the wanted one."""
    in_features = linear.in_features if in_features is None else in_features
    out_features = linear.out_features if out_features is None else out_features
    if (in_features, out_features) == (linear.in_features, linear.out_features):
        return linear
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )


def resized_conv(conv: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A new Conv2d with `out_channels` output channels, otherwise like `conv` (a vision transformer's patch
    projection, whose output channels are the residual width)."""
    if conv.out_channels == out_channels:
        return conv
    return nn.Conv2d(
        conv.in_channels, out_channels, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip


def set_layer_ffn(layer: nn.Module, layout: dict, width: int) -> None:
    """Gives one layer's FFN (one up and one down projection, at `layout["ffn_in"]` / `["ffn_out"]`) `width`
    intermediate neurons."""
    set_module(layer, layout["ffn_in"], resized(layer.get_submodule(layout["ffn_in"]), out_features=width))
    set_module(layer, layout["ffn_out"], resized(layer.get_submodule(layout["ffn_out"]), in_features=width))


def apply_layer_shapes(model: nn.Module, config, layout: dict, set_layer_heads, head_size: int) -> None:
    """Gives each layer the head count and FFN width recorded in `config` (per-layer lists), where they differ from
    the dense ones; `set_layer_heads(layer, layout, heads, head_size)` is the family's (what stands in for an
    attention left without heads differs)."""
    heads, ffn = getattr(config, HEADS_KEY, None), getattr(config, FFN_KEY, None)
    if heads is None and ffn is None:
        return
    base = getattr(model, "base_model", model)
    dense_heads, dense_ffn = getattr(config, layout["config_heads"]), getattr(config, layout["config_ffn"])
    for i, layer in enumerate(base.get_submodule(layout["layers"])):
        if heads is not None and heads[i] != dense_heads:
            set_layer_heads(layer, layout, int(heads[i]), head_size)
        if ffn is not None and ffn[i] != dense_ffn:
            set_layer_ffn(layer, layout, int(ffn[i]))


def apply_hidden_width(model: nn.Module, config) -> nn.Module:
    """Rebuilds the modules and parameters on the residual stream at the kept width recorded in `config` (no-op if
    none): embedding tables (their columns), LayerNorms, the Linears that read the stream (input features) or write it
    (output features; a Conv2d its output channels), and tensors added to the stream (their last axis). A tied output
    projection (`tie_word_embeddings`) is tied to the narrowed input embeddings again."""
    hidden = getattr(config, HIDDEN_KEY, None)
    if not hidden:
        return model
    size = int(hidden["size"])
    for name in hidden.get("embeddings", []):
        old = model.get_submodule(name)
        new = nn.Embedding(old.num_embeddings, size, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)  # fmt: skip
        new.weight.requires_grad_(old.weight.requires_grad)  # a frozen (sinusoidal) table stays frozen
        set_module(model, name, new)
    for name in hidden.get("norms", []):
        old = model.get_submodule(name)
        if not isinstance(old, nn.LayerNorm):  # an RMSNorm reads its width from its input: only its weight changes
            w = old.weight
            old.weight = nn.Parameter(torch.empty(size, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
            continue
        affine = old.weight is not None
        new = nn.LayerNorm(size, eps=old.eps, elementwise_affine=affine, bias=old.bias is not None,
                           device=old.weight.device if affine else None, dtype=old.weight.dtype if affine else None)
        set_module(model, name, new)
    for name in hidden.get("readers", []):
        set_module(model, name, resized(model.get_submodule(name), in_features=size))
    for name in list(hidden.get("writers", [])) + list(hidden.get("sources", [])):
        old = model.get_submodule(name)
        new = resized_conv(old, size) if isinstance(old, nn.Conv2d) else resized(old, out_features=size)
        set_module(model, name, new)
    for name in hidden.get("parameters", []):
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, leaf)
        new = torch.empty(*old.shape[:-1], size, device=old.device, dtype=old.dtype)
        setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    tie_output_embeddings(model, config)
    return model


def tie_output_embeddings(model: nn.Module, config) -> None:
    """Ties the output projection to the input embeddings again where `config.tie_word_embeddings` says they are one
    (once the residual width changed, both were rebuilt or sliced apart)."""
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if isinstance(inputs, nn.Embedding) and isinstance(outputs, nn.Linear):
            outputs.weight = inputs.weight
