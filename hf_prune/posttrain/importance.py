"""Importance without gradients: activation-based importance of attention units and MLP neurons (Minitron), and the
importance of whole layers for depth pruning (Block Influence, or the loss increase when a layer is skipped)."""

from __future__ import annotations

import torch
from torch import nn

from ..models import structure
from ..models.adapter import ATTENTION, MLP
from ..pruning.units import layer_units, unit_sums

__all__ = ["activation_importance", "magnitude_importance", "layer_importance", "LAYER_IMPORTANCE_METHODS"]

LAYER_IMPORTANCE_METHODS = ("cosine", "loss")


def _forward(model: nn.Module, batch: dict, labels: bool = False):
    return model(**{k: v for k, v in batch.items() if labels or k != "labels"})


@torch.no_grad()
def activation_importance(
    model: nn.Module, batches: list[dict], power: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The activation importance of Minitron (Muralidharan et al. 2024, section 2.2), made comparable across kinds:
    per unit, the mean over the real tokens of the L2 norm (to the `power`) of what it adds to the residual stream,
    its output (a head's or key/value group's context vectors; a neuron's gated activation) times its columns of the
    output projection. No labels and no gradients are needed.

    Minitron ranks heads, neurons and channels each on their own axis and chooses the widths by search; one budget
    shared by heads and neurons needs one scale. The raw activation norms are not one (a neuron's activation and a
    group's context vectors differ in size by orders of magnitude: ranked together, every attention unit goes
    first); their contributions to the residual stream, which both kinds write to, are (the norm-times-activation
    of Wanda and FLAP, per structured unit). Their squares (`power=2`, the default) add up across units and kinds as
    a loss does: to second order, removing a contribution `c` raises the loss by about `c^T H c`, which grows with
    `||c||^2`, not `||c||`. With the plain norms (`power=1`) one budget over SmolLM2-135M's key/value groups (a
    group owns as many parameters as 171 neurons, and writes 25 times a neuron's norm) removed nearly every group.

    Args:
        model: a model of a supported family.
        batches: collated batches on the model's device.
        power: 2 (squared norms, comparable across kinds: what the search uses) or 1 (Minitron's mean norm, for
            ranking within one layer and kind).

    Returns:
        `(head_importance, neuron_importance)`: per layer, a tensor `(units,)`.
    """
    if power not in (1, 2):
        raise ValueError(f"power={power!r} must be 1 (mean norm) or 2 (mean squared norm).")
    groups = {kind: layer_units(model, kind) for kind in (ATTENTION, MLP)}
    sums = {kind: [torch.zeros(lu.count, dtype=torch.float64) for lu in units] for kind, units in groups.items()}
    state = {"mask": None, "tokens": 0}

    def hook(kind: str, lu):
        def record(module, args):
            if lu.count == 0:
                return
            out = lu.group.output
            x = args[0][state["mask"]]  # (tokens, in_features)
            part = x.narrow(-1, out.offset, out.span(lu.count)).float().reshape(-1, lu.count, out.width)
            weight = module.weight.narrow(1, out.offset, out.span(lu.count)).float()
            weight = weight.reshape(weight.shape[0], lu.count, out.width)  # (hidden, units, width)
            if out.width == 1:  # a neuron adds activation x column: its norm is |activation| x the column's norm
                norms = part.squeeze(-1).abs() * weight.squeeze(-1).norm(dim=0)
            else:  # few units of many channels (heads, key/value groups): each unit's projection in turn
                norms = torch.stack([(part[:, u] @ weight[:, u].T).norm(dim=-1) for u in range(lu.count)], dim=-1)
            sums[kind][lu.layer] += norms.double().pow(power).sum(dim=0).cpu()

        return record

    handles = [lu.output_linear.register_forward_pre_hook(hook(k, lu)) for k, units in groups.items() for lu in units]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            state["mask"] = structure.token_mask(model, batch)
            state["tokens"] += int(state["mask"].sum())
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = max(state["tokens"], 1)
    return [s / tokens for s in sums[ATTENTION]], [s / tokens for s in sums[MLP]]


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per unit, the L2 norm of every weight it owns (its rows of the input projections and its columns of the output
    projection, as one group: Torch-Pruning's group magnitude). Comparable within a layer and kind only.

    Returns:
        `(head_importance, neuron_importance)`: per layer, a tensor `(units,)`.
    """
    return tuple(
        [unit_sums(lu, lambda lin: lin.weight.detach().float().square()).sqrt().cpu() for lu in layer_units(model, k)]
        for k in (ATTENTION, MLP)
    )


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_importance(model: nn.Module, batches: list[dict], method: str = "cosine") -> torch.Tensor:
    """Importance of every layer, for depth pruning (higher: keep).

    - `"cosine"`: Block Influence (Men et al. 2024, ShortGPT), one minus the mean over real tokens of the cosine
      between a layer's input and output hidden states: a layer that barely turns the residual stream matters little.
    - `"loss"`: the increase of the mean loss when the layer is skipped (its output replaced by its input), one
      forward pass per layer (Gromov et al. 2024 drop layers by such a measure); the batches need `labels`.

    Args:
        model: a model of a supported family.
        batches: collated batches on the model's device.
        method: `"cosine"` or `"loss"`.

    Returns:
        A float tensor `(layers,)`.
    """
    if method not in LAYER_IMPORTANCE_METHODS:
        raise ValueError(f"method={method!r} is not known: use one of {', '.join(LAYER_IMPORTANCE_METHODS)}.")
    layers = structure.get_layers(model)
    was_training = model.training
    model.eval()
    try:
        if method == "cosine":
            return _block_influence(model, layers, batches)
        if any("labels" not in b for b in batches):
            raise ValueError("method='loss' needs batches with `labels`; use method='cosine' without them.")
        base = sum(float(_forward(model, b, labels=True).loss) for b in batches) / len(batches)
        increase = []
        for layer in layers:
            handle = layer.register_forward_hook(_skip)
            try:
                loss = sum(float(_forward(model, b, labels=True).loss) for b in batches) / len(batches)
            finally:
                handle.remove()
            increase.append(loss - base)
        return torch.tensor(increase)
    finally:
        model.train(was_training)


def _skip(module, args, output):
    """A forward hook that makes a layer return its input (the residual stream passes unchanged)."""
    hidden = args[0]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _block_influence(model, layers, batches) -> torch.Tensor:
    sums = torch.zeros(len(layers), dtype=torch.float64)
    state = {"mask": None, "inputs": {}}
    handles = []
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, i=i):
            state["inputs"][i] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, kwargs, output, i=i):
            out, x = _layer_output(output), state["inputs"].pop(i)
            cos = torch.nn.functional.cosine_similarity(out.float(), x.float(), dim=-1)[state["mask"]]
            sums[i] += (1.0 - cos).sum().double().cpu()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    tokens = 0
    try:
        for batch in batches:
            state["mask"] = structure.token_mask(model, batch)
            tokens += int(state["mask"].sum())
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(tokens, 1)).float()
