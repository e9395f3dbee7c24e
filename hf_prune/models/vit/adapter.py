"""Vision Transformers (vit, and deit, whose layers are laid out alike): pre-LayerNorm encoder layers over image
patches, with separate Q, K, V projections, one attention head per unit, and an MLP of one up (`fc1`) and one down
(`fc2`) projection.

ViT's attention infers the head count from the projections' width (`view(..., -1, head_dim)`), so once Q/K/V/O are
sliced every layer may keep a different number of heads, under eager and sdpa attention. A layer that loses every head
gets an `EmptyAttention`, one that loses every neuron an MLP of zero width; either still adds its output projection's
bias, so an empty layer is not a pass-through and removing it whole is weighed by the Fisher of a gate that skips it.

The residual stream is written by the patch projection (a Conv2d whose output channels are the width), by the class,
distillation and mask tokens and the position embeddings (parameters whose last axis is the width) and by every
layer's output projections; it is read only by LayerNorms (pre-norm), whose outputs feed Q/K/V, `fc1`, the pooler and
the classifier. The inputs are `pixel_values` of the config's `image_size` and `num_channels`: the number of positions
(patches plus class tokens) is fixed, whatever sequence length a cost model is asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter import ATTENTION, config_get
from ..layout import LayoutAdapter
from . import modeling_hf_prune
from .modeling_hf_prune import VIT_LAYOUT, EmptyAttention

__all__ = ["ViTAdapter"]

# the embeddings' parameters on the residual stream (those a model has: DeiT's distillation token, the mask token of
# masked image modelling)
_STREAM_PARAMETERS = ("cls_token", "distillation_token", "mask_token", "position_embeddings")
# per model type, the tokens before the patches (DeiT adds a distillation token)
_SPECIAL_TOKENS = {"vit": 1, "deit": 2}


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class ViTAdapter(LayoutAdapter):
    """Adapter of the transformers 5 layout of ViT and DeiT (`<base>.layers[i].attention.q_proj`, `mlp.fc1`, ...)."""

    model_types = ("vit", "deit")
    layout = VIT_LAYOUT
    # the attention module holds Q/K/V/O and computes the scores; the MLP module holds fc1 and fc2
    attention_cost_paths = (VIT_LAYOUT["attention"],)
    mlp_cost_paths = (VIT_LAYOUT["ffn_in"], VIT_LAYOUT["ffn_out"])
    # pre-LayerNorm: the MLP output is added to the input of the norm before it
    mlp_residual_path = VIT_LAYOUT["norm_after"]
    modeling_module = modeling_hf_prune
    # the image classifier reads the class token of the final LayerNorm's output alone
    classifier_reads_first_token = True
    can_drop_layers = True

    def head_dim(self, config) -> int:
        # ViTAttention reads an explicit `head_dim` where the config has one
        return int(config_get(config, "head_dim") or config_get(config, "hidden_size") // config_get(
            config, self.layout["config_heads"]
        ))  # fmt: skip

    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        if kind != ATTENTION:
            return  # fc1 / fc2 of zero width add fc2's bias, which is what an MLP without neurons does
        path = self.layout["attention"]
        attn = self.linear(layer, path)
        if count == 0:
            if not isinstance(attn, EmptyAttention):  # the sliced, empty projections keep their parameter names
                layer.set_submodule(path, EmptyAttention(attn))
        else:
            attn.num_attention_heads = count  # informational: the forward infers it from the width

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        base = getattr(model, "base_model", model)
        layers = self.layers(model)
        base.set_submodule(self.layout["layers"], nn.ModuleList(layers[i] for i in keep))
        setattr(model.config, self.layout["config_layers"], len(keep))

    def empty_layer_is_identity(self, model: nn.Module) -> bool:
        # x + attention(norm(x)) + mlp(norm(...)): with no units each still adds its output projection's bias
        outputs = (self.layout["attention_output"], self.layout["ffn_out"])
        return all(self.linear(layer, path).bias is None for layer in self.layers(model) for path in outputs)

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        base = getattr(model, "base_model", model)
        prefix, layers = self.name_prefixes(model)
        embeddings = f"{prefix}embeddings."
        parameters = [
            f"{embeddings}{n}"
            for n in _STREAM_PARAMETERS
            if isinstance(getattr(base.embeddings, n, None), nn.Parameter)
        ]
        lay = self.layout
        pooler = getattr(base, "pooler", None)
        return {
            "embeddings": [],
            "norms": [f"{p}{lay[r]}" for p in layers for r in ("norm_before", "norm_after")] + [f"{prefix}layernorm"],
            "readers": [f"{p}{lay[r]}" for p in layers for r in ("query", "key", "value", "ffn_in")]
            + ([f"{prefix}pooler.dense"] if pooler is not None else [])
            + _head_readers(model, base),
            # the patch projection writes the patches' part of the stream, its output channels are the width; the
            # stream is read by LayerNorms only, so nothing that writes it needs zeroing in the masked form
            "writers": [f"{embeddings}patch_embeddings.projection"]
            + [f"{p}{lay[r]}" for p in layers for r in ("attention_output", "ffn_out")],
            "sources": [],
            "parameters": parameters,
        }

    # ------------------------------------------------------------------------------------------------ inputs
    def model_input_names(self, config) -> list[str]:
        return ["pixel_values"]

    def sequence_length(self, config) -> int:
        height, width = _pair(config_get(config, "image_size"))
        patch_h, patch_w = _pair(config_get(config, "patch_size"))
        return (height // patch_h) * (width // patch_w) + _SPECIAL_TOKENS.get(config_get(config, "model_type"), 1)

    def dummy_inputs(self, config, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
        # the patches are fixed by the image size: `seq_len` does not apply
        height, width = _pair(config_get(config, "image_size"))
        shape = (batch_size, int(config_get(config, "num_channels")), height, width)
        return {"pixel_values": torch.randn(shape, generator=generator)}


def _head_readers(model: nn.Module, base: nn.Module) -> list[str]:
    """The task head's Linears that read the residual stream (the final LayerNorm's output), or a `ValueError`."""
    if model is base:
        return []
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        heads = ("classifier",)
    elif name.endswith("ForImageClassificationWithTeacher"):  # DeiT: class token and distillation token heads
        heads = ("cls_classifier", "distillation_classifier")
    else:
        raise ValueError(
            f"Hidden dimensions of {name} cannot be pruned: its head is not one hf_prune knows (image "
            "classification). Prune heads, MLP neurons and layers instead."
        )
    # a classifier of num_labels=0 is an Identity: nothing to slice
    return [h for h in heads if isinstance(getattr(model, h, None), nn.Linear)]
