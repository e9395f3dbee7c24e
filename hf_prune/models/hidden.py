"""Hidden-dimension (residual-width) pruning: one keep-mask over the residual stream, shared by every layer.

The residual stream's width is read and written everywhere: the embeddings write it, every projection that reads
the stream (Q/K/V, the FFN's input, the pooler, a token classifier) has one input column per dimension, every
projection that writes it (attention output, FFN output) one output row, and every LayerNorm on it one weight and
bias entry. Removing a dimension removes it from all of them at once (CoFi, Xia et al. 2022, section 3.1; Minitron's
embedding channels). The adapter lists those modules ([`ArchitectureAdapter.hidden_modules`]), so this file never
names a module path.

The *masked* model that the physically pruned one equals: every LayerNorm on the stream normalises over the kept
dimensions only and outputs zero on the removed ones ([`masked_layer_norm`]), and a projection that writes the stream
without a LayerNorm after it (ELECTRA's `embeddings_project`) has its removed rows zeroed. Projections reading the
stream then read zeros where the pruned model has no column, so both compute the same function. The stream may also
be written by a Conv2d (a vision transformer's patch projection: its output channels) and by parameters added to it
(class tokens, position embeddings: their last axis); like the other writers they need no zeroing where only
LayerNorms read the stream, and are sliced and rebuilt at the kept width.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from .adapter import set_module
from .auto import get_adapter
from .remote_common import tie_output_embeddings

__all__ = [
    "HIDDEN_KEY",
    "HIDDEN_KEPT_KEY",
    "HIDDEN_ROLES",
    "hidden_width",
    "hidden_module_objects",
    "masked_layer_norm",
    "masked_rms_norm",
    "masked_norm",
    "hidden_mask",
    "hidden_scale",
    "prune_hidden_dims",
]

# `{"size": kept width, <role>: [qualified module names]}` in the config of a model whose residual width was pruned;
# the remote-code modeling file rebuilds those modules at that width before the weights load
HIDDEN_KEY = "hf_prune_hidden"
# the original (dense-model) index of every residual dimension kept
HIDDEN_KEPT_KEY = "hf_prune_hidden_kept"
# embeddings: columns; norms: weight and bias entries; readers: Linear input columns; writers: Linear output rows;
# sources: writers whose output is the stream with no LayerNorm after it (zeroed in the masked model); parameters:
# tensors added to the stream, sliced on their last axis (writers may be Conv2d: their output channels)
HIDDEN_ROLES = ("embeddings", "norms", "readers", "writers", "sources", "parameters")


def hidden_width(model: nn.Module) -> int:
    """The residual width the model has now (its config's `hidden_size` until the width is pruned)."""
    recorded = getattr(model.config, HIDDEN_KEY, None)
    return int(recorded["size"]) if recorded else int(model.config.hidden_size)


def masked_layer_norm(
    x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the kept dimensions of the last axis only, zero on the others: what a LayerNorm of the kept
    width computes on the kept dimensions.

    Args:
        x: `(..., hidden)` input.
        keep: bool `(hidden,)` keep-mask.
        weight / bias: the LayerNorm's affine parameters `(hidden,)` (None when it has none).
        eps: the LayerNorm's epsilon.

    Returns:
        `(..., hidden)`, zero where `keep` is False.
    """
    m = keep.to(device=x.device, dtype=x.dtype)
    count = m.sum().clamp(min=1)
    mean = (x * m).sum(dim=-1, keepdim=True) / count
    var = ((x - mean).pow(2) * m).sum(dim=-1, keepdim=True) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out * m


def masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm (Llama's: in float32, the weight applied in the input's dtype) over the kept dimensions of the last
    axis only, zero on the others: what an RMSNorm of the kept width computes on the kept dimensions.

    Args:
        x: `(..., hidden)` input.
        keep: bool `(hidden,)` keep-mask.
        weight: the norm's weight `(hidden,)` (None when it has none).
        eps: the norm's epsilon.

    Returns:
        `(..., hidden)`, zero where `keep` is False.
    """
    m = keep.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    var = (xf.pow(2) * m).sum(dim=-1, keepdim=True) / m.sum().clamp(min=1)
    out = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    if weight is not None:
        out = weight * out
    return out * m.to(out.dtype)


def _is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm (mean and variance), else an RMSNorm (Llama's `variance_epsilon`, or `eps`)."""
    return isinstance(module, nn.LayerNorm)


def masked_norm(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`module` (a LayerNorm or an RMSNorm on the stream) applied to `x` over the kept dimensions only
    ([`masked_layer_norm`], [`masked_rms_norm`])."""
    if _is_layer_norm(module):
        return masked_layer_norm(x, keep, module.weight, module.bias, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return masked_rms_norm(x, keep, getattr(module, "weight", None), eps)


def _modules(model: nn.Module) -> dict[str, list[str]]:
    adapter = get_adapter(model)
    modules = adapter.hidden_modules(model)
    return {role: list(modules.get(role, [])) for role in HIDDEN_ROLES}


def hidden_module_objects(model: nn.Module) -> dict[str, list[nn.Module | nn.Parameter]]:
    """The adapter's `hidden_modules` resolved: `{role: [modules]}` for every role of `HIDDEN_ROLES` (the tensors of
    the `parameters` role as `nn.Parameter`s)."""
    resolve = {"parameters": model.get_parameter}
    names = _modules(model)
    return {role: [resolve.get(role, model.get_submodule)(n) for n in names[role]] for role in names}


@contextmanager
def hidden_mask(model: nn.Module, keep: torch.Tensor):
    """Runs `model` as if the residual dimensions where `keep` is False were removed (see the module docstring).

    Args:
        model: a model whose family supports hidden-dimension pruning.
        keep: bool `(hidden,)` keep-mask over the model's current residual dimensions.
    """
    modules = _modules(model)
    keep = keep.bool()
    if keep.shape != (hidden_width(model),):
        raise ValueError(f"keep has shape {tuple(keep.shape)}; the model's residual width is {hidden_width(model)}.")

    def norm_hook(module, args, output):
        return masked_norm(module, args[0], keep)

    def zero_hook(module, args, output):
        return output * keep.to(device=output.device, dtype=output.dtype)

    handles = []
    try:
        for name in modules["norms"]:
            handles.append(model.get_submodule(name).register_forward_hook(norm_hook))
        for name in modules["sources"]:
            handles.append(model.get_submodule(name).register_forward_hook(zero_hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def hidden_scale(model: nn.Module, scale: torch.Tensor):
    """Multiplies the residual stream by `scale` wherever it is written (the outputs of its LayerNorms and of the
    projections that write it without one): the soft mask whose gradient at one gives each dimension's importance
    (the Fisher information of a hidden mask, as for heads and neurons; CoFi's hidden mask).

    Args:
        model: a model whose family supports hidden-dimension pruning.
        scale: `(hidden,)`, or `(batch, hidden)` for one mask per example.
    """
    modules = _modules(model)

    def hook(module, args, output):
        s = scale.to(device=output.device, dtype=output.dtype)
        if s.dim() == 2 and output.dim() == 2:
            # a table the whole batch shares, without a batch axis (DeBERTa's relative embeddings, normalised): it
            # takes the examples' mean mask, so each example gets an equal share of the table's gradient
            return output * s.mean(dim=0)
        return output * (s.view(s.shape[0], *([1] * (output.dim() - 2)), -1) if s.dim() == 2 else s)

    handles = []
    try:
        for name in modules["norms"] + modules["sources"]:
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _pruned_embedding(embedding: nn.Embedding, keep_idx: torch.Tensor) -> nn.Embedding:
    new = nn.Embedding(
        embedding.num_embeddings, len(keep_idx), padding_idx=embedding.padding_idx,
        device=embedding.weight.device, dtype=embedding.weight.dtype,
    )  # fmt: skip
    new.weight.data.copy_(embedding.weight.data[:, keep_idx.to(embedding.weight.device)])
    new.weight.requires_grad_(embedding.weight.requires_grad)
    return new


def _pruned_conv(conv: nn.Conv2d, keep_idx: torch.Tensor) -> nn.Conv2d:
    """The Conv2d with only the output channels `keep_idx`."""
    new = nn.Conv2d(
        conv.in_channels, len(keep_idx), conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    for name in ("weight", "bias"):
        old = getattr(conv, name)
        if old is not None:
            getattr(new, name).data.copy_(old.data[keep_idx.to(old.device)])
            getattr(new, name).requires_grad_(old.requires_grad)
    return new


def _pruned_norm(norm: nn.Module, keep_idx: torch.Tensor) -> nn.Module:
    if not _is_layer_norm(norm):  # an RMSNorm reads its width from its input: only its weight is sliced
        if getattr(norm, "weight", None) is not None:
            norm.weight = nn.Parameter(norm.weight.data[keep_idx.to(norm.weight.device)].clone(),
                                       requires_grad=norm.weight.requires_grad)  # fmt: skip
        return norm
    affine = norm.weight is not None
    new = nn.LayerNorm(
        len(keep_idx), eps=norm.eps, elementwise_affine=affine, bias=norm.bias is not None,
        device=norm.weight.device if affine else None, dtype=norm.weight.dtype if affine else None,
    )  # fmt: skip
    for name in ("weight", "bias"):
        old = getattr(norm, name)
        if old is not None:
            getattr(new, name).data.copy_(old.data[keep_idx.to(old.device)])
            getattr(new, name).requires_grad_(old.requires_grad)
    return new


@torch.no_grad()
def prune_hidden_dims(model: nn.Module, dims: Iterable[int]) -> nn.Module:
    """Removes residual dimensions physically from every module that reads or writes the stream, in place.

    Args:
        model: a model whose family supports hidden-dimension pruning (see the adapter's `hidden_modules`).
        dims: indices of the model's current residual dimensions to remove; at least one must stay.

    Returns:
        The same model; `model.config` records the kept width and the rebuilt modules (`hf_prune_hidden`) and the
        original index of every kept dimension (`hf_prune_hidden_kept`), read back when the model is loaded.
    """
    width = hidden_width(model)
    drop = sorted({int(d) for d in dims})
    bad = [d for d in drop if not 0 <= d < width]
    if bad:
        raise ValueError(f"Hidden dimension {bad} out of range: the residual stream has dimensions 0..{width - 1}.")
    if len(drop) >= width:
        raise ValueError(f"Removing all {width} hidden dimensions leaves no model; keep at least one.")
    modules = _modules(model)
    if not drop:
        return model
    gone = set(drop)
    keep_idx = torch.tensor([d for d in range(width) if d not in gone], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for name in modules["embeddings"]:
            set_module(model, name, _pruned_embedding(model.get_submodule(name), keep_idx))
        for name in modules["norms"]:
            set_module(model, name, _pruned_norm(model.get_submodule(name), keep_idx))
        for name in modules["readers"]:
            linear = model.get_submodule(name)
            set_module(model, name, prune_linear_layer(linear, keep_idx.to(linear.weight.device), dim=1))
        for name in dict.fromkeys(modules["writers"] + modules["sources"]):
            linear = model.get_submodule(name)
            idx = keep_idx.to(linear.weight.device)
            conv = isinstance(linear, nn.Conv2d)
            set_module(model, name, _pruned_conv(linear, idx) if conv else prune_linear_layer(linear, idx, dim=0))
        for name in modules["parameters"]:
            old = model.get_parameter(name)
            new = nn.Parameter(old.data.index_select(-1, keep_idx.to(old.device)), requires_grad=old.requires_grad)
            set_module(model, name, new)
    tie_output_embeddings(model, model.config)  # the cut made a tied output projection a copy
    originals = list(getattr(model.config, HIDDEN_KEPT_KEY, None) or range(width))
    setattr(model.config, HIDDEN_KEPT_KEY, [originals[i] for i in keep_idx.tolist()])
    setattr(model.config, HIDDEN_KEY, {"size": len(keep_idx), **modules})
    get_adapter(model).record_hidden(model)
    return model
