"""Importance of attention units and MLP neurons without training (Kwon et al. 2022, sections 4.1-4.2).

Mask variables multiply the output of every attention unit (its input columns of the attention output projection)
and of every MLP neuron (its input of the output projection). Their gradients are taken per example (each example gets
its own copy of the masks, so the gradient of the summed loss with respect to that copy is the example's own
gradient) and the Fisher information of a unit is the sum of its squared per-example gradients. With one label per
token (token classification, a causal LM), an example's loss is the sum of its labelled tokens' losses over the mean
number of labelled tokens per example, so every token weighs the same whatever batch it is in. Within a layer, the
block of the empirical Fisher matrix then chooses which units to remove together (`rearrange_layer`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn

from ..models import structure
from ..models.adapter import ATTENTION, MLP
from ..models.auto import is_causal_lm
from ..models.hidden import hidden_scale, hidden_width
from ..pruning.units import layer_units

__all__ = ["unit_masks", "layer_gates", "mask_gradients", "mask_fisher", "layer_fisher", "rearrange_layer"]

IGNORE_INDEX = -100  # labels the loss does not score (padding, later sub-tokens of a word)


def _mask_hook(mask: torch.Tensor, width: int):
    """A forward pre-hook scaling each unit's `width` input channels of an output projection by its mask."""
    if width == 1:  # one channel per unit (MLP neurons): a plain broadcast

        def hook(module, args):
            x = args[0]
            return (x * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), -1), *args[1:])

        return hook

    def hook(module, args):
        x = args[0]
        shape = x.shape
        scaled = x.view(*shape[:-1], -1, width) * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), -1, 1)
        return (scaled.view(shape), *args[1:])

    return hook


@contextmanager
def unit_masks(model: nn.Module, head_masks: list[torch.Tensor], neuron_masks: list[torch.Tensor]):
    """Multiplies each attention unit's and MLP neuron's output by its mask, per example (`(batch, units)` masks),
    where it enters its output projection."""
    handles = []
    try:
        for kind, masks in ((ATTENTION, head_masks), (MLP, neuron_masks)):
            for lu, mask in zip(layer_units(model, kind), masks):
                out = lu.group.output
                if mask.shape[-1] == 0:
                    continue
                if out.offset != 0 or out.span(lu.count) != lu.output_linear.in_features:
                    raise ValueError(
                        f"Unit masks need each layer's {kind} units to fill their output projection's input; layer "
                        f"{lu.layer} has {lu.count} units of {out.width} channels at offset {out.offset} in "
                        f"{lu.output_linear.in_features}."
                    )
                handles.append(lu.output_linear.register_forward_pre_hook(_mask_hook(mask, out.width)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def layer_gates(model: nn.Module, gates: torch.Tensor):
    """Gates every whole layer: its output becomes `x + g * (layer(x) - x)` for its input `x` (`gates`: `(batch,
    layers)`, one per example). At `g = 0` the layer is skipped, which is what removing it does, so the Fisher
    information of the gate estimates the loss of removing the layer, whatever a layer without units still computes
    (a post-LayerNorm layer normalises twice).
    """
    inputs, handles = {}, []

    def pre(module, args, kwargs, i):
        inputs[i] = args[0] if args else kwargs["hidden_states"]

    def post(module, args, kwargs, output, i):
        x = inputs.pop(i)
        out = output[0] if isinstance(output, tuple) else output
        g = gates[:, i].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        gated = x + g * (out - x)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    try:
        for i, layer in enumerate(structure.get_layers(model)):
            handles.append(layer.register_forward_pre_hook(partial(pre, i=i), with_kwargs=True))
            handles.append(layer.register_forward_hook(partial(post, i=i), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _labels_per_token(batch: dict) -> bool:
    """Whether the batch's labels are one class id per token (token classification, causal LM), not per example."""
    labels = batch.get("labels")
    return (
        labels is not None
        and not labels.is_floating_point()
        and labels.dim() == 2
        and labels.shape == batch["input_ids"].shape
    )


def _scored_tokens(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The labels each position is scored against: a causal LM's are shifted (position `t` predicts token `t + 1`)."""
    if is_causal_lm(model):
        return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def _summed_loss(model: nn.Module, batch: dict, tokens_per_example: float | None) -> torch.Tensor:
    """The sum over the batch's examples of each example's own loss.

    With one label per example the model's loss is a batch mean, so times the batch size it is that sum. With one
    label per token the model's loss is a mean over the batch's labelled tokens, whose count differs from batch to
    batch, so it is recomputed from the logits: an example's loss is the sum of its tokens' cross-entropies divided by
    `tokens_per_example` (the mean number of labelled tokens per example over every batch), the same constant for
    every example. Every labelled token then weighs the same, as in the token mean the model trains on.
    """
    if tokens_per_example is None:
        return model(**batch).loss * batch["labels"].shape[0]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = _scored_tokens(model, batch["labels"]).to(logits.device)
    summed = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / tokens_per_example


def _tokens_per_example(model: nn.Module, batches: list[dict]) -> float | None:
    """The mean number of labelled tokens per example over every batch, or None for one label per example."""
    token_level = [_labels_per_token(b) for b in batches]
    if not any(token_level):
        return None
    if not all(token_level):
        raise ValueError(
            "Some batches have one label per token and others one per example: give the batches of one task."
        )
    tokens = sum(int((_scored_tokens(model, b["labels"]) != IGNORE_INDEX).sum()) for b in batches)
    examples = sum(b["input_ids"].shape[0] for b in batches)
    if tokens == 0:
        raise ValueError(
            f"The {examples} examples have no labelled token (every label is {IGNORE_INDEX}), but the Fisher "
            "information needs the loss: pass examples with their labels."
        )
    return tokens / examples


def mask_gradients(
    model: nn.Module, batches: list[dict], hidden: bool = False, layers: bool = False
) -> tuple[list[torch.Tensor], ...]:
    """Per-example gradients of the loss with respect to every head's and every neuron's mask, at masks of one (and,
    with `hidden`, of the residual stream's dimensions, [`hf_prune.models.hidden.hidden_scale`]; with `layers`, of a
    gate on every whole layer, [`layer_gates`]).

    An example's loss is the model's loss on it alone for one label per example (sequence classification,
    regression). For one label per token (token classification, a causal LM's next tokens; labels of
    `ignore_index=-100` are not scored), it is the sum of its tokens' cross-entropies over the mean number of
    labelled tokens per example: every token weighs the same whatever batch it is in, and the examples' losses sum to
    the token-mean loss times the number of examples, as one label per example does.

    Args:
        model: a model with a loss (the batches carry `labels`), in eval mode for deterministic outputs.
        batches: collated batches on the model's device (per-token labels padded with -100).

        hidden: also the gradients of a mask over the residual stream's dimensions, shared by every layer.
        layers: also the gradients of the layer gates.

    Returns:
        `(head_grads, neuron_grads)`: per layer, a float tensor `(examples, heads)` / `(examples, neurons)`; with
        `hidden` or `layers`, two more: `(examples, hidden)` and `(examples, layers)` (None for the one not asked).
    """
    heads, neurons = structure.attention_units(model), structure.ffn_size(model)
    head_grads, neuron_grads, hidden_grads, layer_grads = [[] for _ in heads], [[] for _ in neurons], [], []
    width = hidden_width(model) if hidden else 0
    tokens_per_example = _tokens_per_example(model, batches)
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the masks' gradients are needed
    try:
        for batch in batches:
            first = next(v for v in batch.values() if isinstance(v, torch.Tensor))  # tokens, images or labels
            size, device = first.shape[0], first.device
            hm = [torch.ones(size, h, device=device, requires_grad=True) for h in heads]
            nm = [torch.ones(size, n, device=device, requires_grad=True) for n in neurons]
            dm = torch.ones(size, width, device=device, requires_grad=True)
            lm = torch.ones(size, len(heads), device=device, requires_grad=True)
            with (
                unit_masks(model, hm, nm),
                hidden_scale(model, dm) if hidden else nullcontext(),
                layer_gates(model, lm) if layers else nullcontext(),
            ):
                loss = _summed_loss(model, batch, tokens_per_example)
            # The gradient of the sum of per-example losses with respect to an example's own copy of the masks is
            # that example's gradient.
            wanted = [m for m in hm + nm if m.shape[-1] > 0] + ([dm] if hidden else []) + ([lm] if layers else [])
            grads = iter(torch.autograd.grad(loss, wanted))
            for store, masks in ((head_grads, hm), (neuron_grads, nm)):
                for i, m in enumerate(masks):
                    store[i].append(next(grads).detach().float().cpu() if m.shape[-1] > 0 else torch.zeros(size, 0))
            if hidden:
                hidden_grads.append(next(grads).detach().float().cpu())
            if layers:
                layer_grads.append(next(grads).detach().float().cpu())
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    out = [torch.cat(g) for g in head_grads], [torch.cat(g) for g in neuron_grads]
    if not (hidden or layers):
        return out
    return *out, torch.cat(hidden_grads) if hidden else None, torch.cat(layer_grads) if layers else None


def mask_fisher(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The diagonal Fisher information of each unit: the sum over examples of its squared gradient."""
    return [g.pow(2).sum(dim=0) for g in grads]


def layer_fisher(head_grads: list[torch.Tensor], neuron_grads: list[torch.Tensor]) -> torch.Tensor:
    """The Fisher information of removing each layer's units all together: `sum_examples (sum_units g)^2`, the loss
    increase the layer's block of the empirical Fisher matrix predicts (Kwon et al. 2022, section 4.2) for the layer
    emptied, on the scale of `mask_fisher` (a sum over examples). Where an empty layer is a pass-through (pre-norm
    decoders), that is the loss of removing the layer whole.

    Args:
        head_grads / neuron_grads: per layer, per-example mask gradients `(examples, units)` (`mask_gradients`).

    Returns:
        A float tensor `(layers,)`.
    """
    return torch.stack(
        [(h.double().sum(dim=1) + n.double().sum(dim=1)).pow(2).sum() for h, n in zip(head_grads, neuron_grads)]
    ).float()


def rearrange_layer(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Chooses which units of one layer to remove, keeping their number (Kwon et al. 2022, section 4.2).

    The loss increase of removing a set `S` is estimated with the layer's block of the empirical Fisher matrix,
    `sum_examples (sum_{j in S} g_j)^2`: units whose gradients cancel are cheaper together than their diagonal
    terms say. Starting from the units of least diagonal Fisher, each other unit (in increasing order) is swapped in
    if that lowers the estimate; it never rises.

    Args:
        keep: bool keep-mask of the layer's units (its number of False is kept).
        grads: per-example gradients `(examples, units)`.

    Returns:
        The new keep-mask.
    """
    removed = int((~keep).sum())
    if removed == 0 or removed == keep.numel():
        return keep.clone()
    g = grads.double().t().contiguous()  # (units, examples)
    order = torch.sort(g.pow(2).sum(dim=1), stable=True).indices
    chosen = order[:removed].clone()  # the removed set, as unit indices
    rows = g[chosen]  # their gradients, row by row
    total = rows.sum(dim=0)
    row_norms = rows.pow(2).sum(dim=1)
    for unit in order[removed:].tolist():
        with_unit = total + g[unit]
        # ||with_unit - g_c||^2 for every c in the set, from one matrix-vector product (as `with_unit` minus each row)
        left = with_unit.pow(2).sum() - 2.0 * (rows @ with_unit) + row_norms
        drop = int(torch.argmin(left))
        if left[drop] <= total.pow(2).sum():  # dropping `unit` itself leaves `total` (ties: swap, as argmin would)
            total = with_unit - rows[drop]
            chosen[drop], rows[drop], row_norms[drop] = unit, g[unit], g[unit].pow(2).sum()
    new_keep = torch.ones_like(keep)
    new_keep[chosen] = False
    return new_keep
