"""The architecture adapter: what one model family tells the rest of hf_prune about where its prunable units live and
how they shrink.

A *unit* is the smallest piece that can be removed and leave a valid model: an attention head (BERT), a key/value
group with the query heads that read it (grouped-query attention: removing it keeps every layer's GQA layout), or one
MLP neuron (across one or several input projections, e.g. the gate and up projections of a gated MLP, and the output
projection). Torch-Pruning calls such a set of coupled channels a group; here a [`UnitGroup`] lists, for one kind of
unit in one layer, which channels of which `nn.Linear` each unit owns ([`ChannelSlice`]). A fused projection (one
Linear holding Q, K and V, as ModernBERT's `Wqkv`) is several slices of one Linear at different offsets.

Everything that prunes (the training-time pruners, the retraining-free search, the cost model, surgery) works on these
groups and never names a module path; persistence asks the adapter for the config fields a pruned model writes and for
the remote-code modeling file that rebuilds it. A new family is one new adapter (see `models/bert/adapter.py`),
registered in `models/auto.py` (or with `register_adapter` for a family defined outside hf_prune).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

__all__ = ["ATTENTION", "MLP", "ChannelSlice", "UnitGroup", "ArchitectureAdapter", "set_module", "config_get"]

ATTENTION = "attention"
MLP = "mlp"


def config_get(config, key: str, default=None):
    """`config.key` of a `PretrainedConfig`, or `config[key]` of a `config.json` read as a dict."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule of `root` at the dotted `path`."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


@dataclass(frozen=True)
class ChannelSlice:
    """The channels each unit of a group owns in one Linear.

    Along `dim` (0: output features, the weight's rows and the bias; 1: input features, the weight's columns) unit `u`
    owns channels `offset + u * width` to `offset + (u + 1) * width`.

    Args:
        path: the Linear's path relative to the layer.
        dim: 0 (rows) or 1 (columns).
        width: channels per unit (a head's width, a key/value group's query width, 1 for a neuron).
        offset: the first channel of unit 0 (non-zero in fused projections).
    """

    path: str
    dim: int
    width: int
    offset: int = 0

    def channels(self, units) -> list[int]:
        """Channel indices of `units` (indices of units of this group) in this Linear's `dim`."""
        return [self.offset + u * self.width + j for u in units for j in range(self.width)]

    def span(self, count: int) -> int:
        """Channels the `count` units of the group take in this Linear's `dim`."""
        return count * self.width

    def parameters_per_unit(self, linear: nn.Linear, bias: bool = False) -> int:
        """Parameters of `linear` one unit owns: its `width` rows or columns of the weight (and, with `bias`, its
        bias entries where the slice is rows)."""
        owned = self.width * linear.weight.shape[1 - self.dim]
        return owned + (self.width if bias and self.dim == 0 and linear.bias is not None else 0)

    def per_unit(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """Sum of `tensor` (shaped as this Linear's weight, or its bias for `dim=0`) over each unit's channels: a
        tensor `(count,)`."""
        if tensor.dim() == 1 or self.dim == 0:
            part = tensor.narrow(0, self.offset, self.span(count))
            return part.reshape(count, -1).sum(dim=1)
        part = tensor.narrow(1, self.offset, self.span(count))
        return part.reshape(part.shape[0], count, self.width).sum(dim=(0, 2))


@dataclass(frozen=True)
class UnitGroup:
    """One kind of unit of one layer and the channels each unit owns.

    Args:
        kind: `ATTENTION` or `MLP`.
        count: the number of units the layer has now.
        inputs: slices of the projections that compute the units (rows: Q/K/V, or up / gate).
        output: the slice of the projection that reads them (columns of the attention output or down projection);
            scaling a unit's columns there scales the unit's contribution, which is what unit masks do.
    """

    kind: str
    count: int
    inputs: tuple[ChannelSlice, ...]
    output: ChannelSlice

    @property
    def slices(self) -> tuple[ChannelSlice, ...]:
        return (*self.inputs, self.output)


class ArchitectureAdapter:
    """Base class of the adapters: one per model family, keyed by `config.model_type` in `models/auto.py`.

    A subclass fills in where the units live (`layers`, `unit_group`, `projection_paths`), what to change beyond the
    sliced Linears once units are gone (`resize_units`), the sizes a config describes, and the files a pruned model
    needs (`record_config`, `modeling_module`). The generic slicing, scoring, costing and surgery use only these.
    """

    #: the `config.model_type` values this adapter serves
    model_types: tuple[str, ...] = ()
    #: `{role: path relative to a layer}` of the attention and MLP projections (presets of the selection entries)
    attention_roles: dict[str, str] = {}
    mlp_roles: dict[str, str] = {}
    #: paths (relative to a layer) of the modules whose FLOPs scale with the attention / MLP units
    attention_cost_paths: tuple[str, ...] = ()
    mlp_cost_paths: tuple[str, ...] = ()
    #: path (relative to a layer) of the module whose input is the residual stream the MLP output is added to
    mlp_residual_path: str = ""
    #: whether whole layers can be dropped
    can_drop_layers: bool = False
    #: whether shapes that are the same in every layer export as the family's own config (no remote code), which
    #: is what `prune_to_speedup(uniform=True)` is for
    uniform_exports_own_config: bool = False
    #: whether a sequence (or image) classifier of the family reads the first token of the last layer alone (BERT's
    #: pooler, ViT's class token); decoders read the last real token
    classifier_reads_first_token: bool = False

    # ------------------------------------------------------------------------------------------------ where
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's layers (from a base model or a model with a head)."""
        raise NotImplementedError

    def unit_group(self, layer: nn.Module, kind: str, config) -> UnitGroup:
        """The units of `kind` (`ATTENTION` or `MLP`) of one layer, read from its current shapes."""
        raise NotImplementedError

    def roles(self, kind: str) -> dict[str, str]:
        """`{role: path}` of the projections of `kind`."""
        return self.attention_roles if kind == ATTENTION else self.mlp_roles

    def linear(self, layer: nn.Module, path: str) -> nn.Linear:
        """The Linear at `path` in `layer`, with an error naming the path."""
        try:
            return layer.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"{type(layer).__name__} has no submodule {path!r}: {err}") from err

    def name_prefixes(self, model: nn.Module) -> tuple[str, list[str]]:
        """`(base prefix, [layer prefix, ...])`: the qualified-name prefixes (with their trailing dot, empty for a
        base model) of the base model and of each of its layers, from which `hidden_modules` names the modules."""
        base = getattr(model, "base_model", model)
        names = {id(m): n for n, m in model.named_modules()}
        prefix = names[id(base)] + "." if names[id(base)] else ""
        return prefix, [f"{names[id(layer)]}." for layer in self.layers(model)]

    # ------------------------------------------------------------------------------------------------ sizes
    def head_dim(self, config) -> int:
        """Width of one attention head (pruning removes whole heads, never head dimensions)."""
        raise NotImplementedError

    def heads_per_unit(self, config) -> int:
        """Query heads in one attention unit (1 for multi-head attention, the group size for grouped-query)."""
        return 1

    def dense_shape(self, config) -> tuple[int, int, int]:
        """`(layers, attention units per layer, MLP width)` of the dense model a config describes."""
        raise NotImplementedError

    def config_shapes(self, config) -> tuple[list[int], list[int]]:
        """Per-layer attention units and MLP widths a (pruned or dense) config describes."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ shrink
    def resize_units(self, layer: nn.Module, kind: str, count: int, config) -> None:
        """Updates what the sliced Linears do not carry once `layer` keeps `count` units of `kind` (head-count
        attributes; a module that stands in for an attention block left without heads)."""

    def record_config(self, model: nn.Module) -> None:
        """Writes the per-layer shapes into `model.config`, read back when the model is loaded."""
        raise NotImplementedError

    def accepts_uniform(self, config, units: int) -> bool:
        """Whether the family's own config describes `units` attention units in every layer."""
        return True

    def needs_remote_code(self, config) -> bool:
        """Whether loading needs the modeling file (per-layer shapes the family's own config cannot describe)."""
        return True

    def drop_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Keeps only the layers `keep` (current indices, in order) and updates what indexes layers (cache indices,
        per-layer config lists, the layer count). Only for adapters with `can_drop_layers`."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop layers.")

    def output_bias_flags(self, config) -> dict[str, tuple[str, tuple[str, ...]]]:
        """`{kind: (config flag, paths relative to a layer)}`: the config flag that gives the projections of `kind` a
        bias (Llama's `attention_bias` / `mlp_bias`) and the projections it governs; none by default."""
        return {}

    def add_output_bias(self, model: nn.Module) -> list[str]:
        """Gives the output projections of every layer a bias where they have none and the family's config can say so
        (`output_bias_flags`): zero biases on every projection the flag governs, and the flag set, so the model still
        loads as its own class. Mask tuning then folds its bias compensation into them.

        Returns:
            The unit kinds whose output projections have a bias in every layer now.
        """
        layers = self.layers(model)
        for flag, paths in self.output_bias_flags(model.config).values():
            if getattr(model.config, flag, False):
                continue
            for layer in layers:
                for path in paths:
                    linear = self.linear(layer, path)
                    if linear.bias is None:
                        w = linear.weight
                        linear.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
            setattr(model.config, flag, True)
        if not len(layers):
            return []
        outputs = {kind: self.unit_group(layers[0], kind, model.config).output.path for kind in (ATTENTION, MLP)}
        return [k for k, path in outputs.items() if all(self.linear(layer, path).bias is not None for layer in layers)]

    def hidden_modules(self, model: nn.Module) -> dict[str, list[str]]:
        """Qualified names of the modules on the residual stream, by role (see `hf_prune.models.hidden`):
        `embeddings`, `norms`, `readers` (Linears whose input is the stream), `writers` (Linears whose output is added
        to it; a Conv2d writes its output channels), `sources` (writers with no LayerNorm after them) and
        `parameters` (tensors added to the stream, sliced on their last axis: a class token, position embeddings).
        Families without hidden-dimension pruning raise a `ValueError` naming the fix."""
        raise ValueError(
            f"Hidden dimensions of model_type={model.config.model_type!r} cannot be pruned yet; prune its attention "
            "units, MLP neurons or layers instead."
        )

    def record_hidden(self, model: nn.Module) -> None:
        """Called once `hf_prune.models.hidden.prune_hidden_dims` has recorded the kept width (`hf_prune_hidden`):
        a family whose own config can describe the narrower stream writes it there instead (nothing by default)."""

    def empty_layer_is_identity(self, model: nn.Module) -> bool:
        """Whether a layer left with no attention unit and no MLP neuron returns its input unchanged, so that removing
        it whole changes no output (pre-norm residual layers whose output projections have no bias)."""
        return False

    def is_pruned_config(self, config_dict: dict) -> bool:
        """Whether a `config.json` (as a dict) records per-layer shapes."""
        raise NotImplementedError

    #: the self-contained modeling file (torch and transformers only) copied into every export as remote code; it
    #: defines `PrunedModelMixin`, which rebuilds the recorded shapes before the weights are loaded
    modeling_module: ModuleType | None = None

    # ------------------------------------------------------------------------------------------------ inputs
    def model_input_names(self, config) -> list[str]:
        """The inputs of an exported graph, in order."""
        return ["input_ids", "attention_mask"]

    def sequence_length(self, config) -> int | None:
        """The positions every example has in the layers where the config fixes them (a vision transformer's patches
        and class tokens), else None: token inputs are as long as their `input_ids`."""
        return None

    def dummy_inputs(self, config, batch_size: int, seq_len: int, generator: torch.Generator) -> dict | None:
        """Random inputs of one forward pass, for counting and timing (on the CPU), or None for token inputs:
        `hf_prune.models.costs.dummy_inputs` then draws `input_ids` of `seq_len` tokens and a full attention mask.
        A family whose inputs are not tokens (images) draws its own, of the size its config fixes."""
        return None
