"""Spending a speed budget: how many FLOPs (or milliseconds) a target speedup leaves to the heads and neurons, and
which heads and neurons to keep in it by importance (Kwon et al. 2022, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.costs import UnitCosts

__all__ = [
    "speedup_budget",
    "allocate_units",
    "allocate_uniform_units",
    "allocate_with_depth",
    "allocate_with_width",
    "candidate_record",
    "removed_importance",
]


def speedup_budget(costs: UnitCosts, target_speedup: float, reference_flops: float | None = None) -> float:
    """FLOPs left to heads and neurons for a model `target_speedup` times cheaper than `reference_flops` (default:
    the model `costs` describes). Raises a `ValueError` naming the reachable range."""
    reference = costs.total if reference_flops is None else float(reference_flops)
    reachable = reference / costs.base if costs.base > 0 else float("inf")
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup={target_speedup} must be > 1 (it is dense FLOPs / pruned FLOPs, e.g. 2).")
    if target_speedup >= reachable:
        raise ValueError(
            f"target_speedup={target_speedup} is out of reach: removing every head and FFN neuron leaves "
            f"{costs.base:.3g} of {reference:.3g} {costs.unit} at seq_len={costs.seq_len}, a {reachable:.2f}x "
            "speedup. Ask for less, or prune layers away."
        )
    return reference / target_speedup - costs.base


def allocate_units(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    costs: UnitCosts,
    budget: float,
    head_alive: list[torch.Tensor] | None = None,
    neuron_alive: list[torch.Tensor] | None = None,
    slack: float = 0.0,
    keep_each: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep-masks of heads and neurons that spend at most `budget` FLOPs and keep the most importance.

    The search of Kwon et al. (2022, Algorithm 1): units of one kind are kept in order of importance, so a solution is
    a number of heads `h`; the neurons that fit in what the `h` best heads leave are kept in order of importance, and
    the `h` with the largest total kept importance wins. A single ranking by importance per unit of cost is one of
    these candidates, so the search never does worse. Only candidates that spend at least `budget - slack` take part
    (when any does), so the speedup reached does not overshoot the target.

    Args:
        head_scores / neuron_scores: per layer, the importance of each head / neuron (higher is kept first).
        costs: the [`UnitCosts`] of the model (per-layer FLOPs of one head and one neuron).
        budget: FLOPs that the kept heads and neurons may spend together.
        head_alive / neuron_alive: per layer, units that may be kept (default all); the others stay removed.
        slack: how far under `budget` a solution may end.
        keep_each: only solutions that keep at least one head and one neuron in the model (when any fits).

    Returns:
        `(head_keep, neuron_keep)`: per layer, bool keep-masks.
    """

    def ranked(scores, unit_costs_, alive):
        flat_scores, flat_costs, flat_ok = [], [], []
        for i, s in enumerate(scores):
            flat_scores.append(s.detach().double().flatten().cpu())
            flat_costs.append(torch.full((s.numel(),), float(unit_costs_[i]), dtype=torch.float64))
            ok = torch.ones(s.numel(), dtype=torch.bool) if alive is None else alive[i].flatten().cpu().bool()
            flat_ok.append(ok)
        s, c, ok = torch.cat(flat_scores), torch.cat(flat_costs), torch.cat(flat_ok)
        idx = ok.nonzero().flatten()
        order = idx[torch.sort(s[idx], descending=True, stable=True).indices]
        zero = torch.zeros(1, dtype=torch.float64)
        return order, torch.cat([zero, torch.cumsum(s[order], 0)]), torch.cat([zero, torch.cumsum(c[order], 0)])

    h_order, h_imp, h_cost = ranked(head_scores, costs.head, head_alive)
    n_order, n_imp, n_cost = ranked(neuron_scores, costs.neuron, neuron_alive)
    fits = h_cost <= budget + 1e-6
    left = (budget - h_cost).clamp(min=0)
    n_count = (torch.searchsorted(n_cost, left + 1e-6, right=True) - 1).clamp(min=0)
    spent = h_cost + n_cost[n_count]
    importance = torch.where(fits, h_imp + n_imp[n_count], torch.tensor(float("-inf"), dtype=torch.float64))
    if keep_each:
        some = (torch.arange(len(h_cost)) > 0) & (n_count > 0)
        if bool((fits & some).any()):
            importance = torch.where(some, importance, torch.tensor(float("-inf"), dtype=torch.float64))
            fits = fits & some
    full = fits & (spent >= budget - slack - 1e-6)
    if bool(full.any()):
        importance = torch.where(full, importance, torch.tensor(float("-inf"), dtype=torch.float64))
    h = int(torch.argmax(importance))
    n = int(n_count[h])

    def masks(scores, order, count):
        keep = torch.zeros(sum(s.numel() for s in scores), dtype=torch.bool)
        keep[order[:count]] = True
        return [k.view(s.shape) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]

    return masks(head_scores, h_order, h), masks(neuron_scores, n_order, n)


def allocate_uniform_units(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    costs: UnitCosts,
    budget: float,
    allowed=None,
    slack: float = 0.0,
    head_alive: list[torch.Tensor] | None = None,
    neuron_alive: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep-masks with the same number of heads `h` and of neurons `n` in every layer, spending at most `budget`.

    Every `(h, n)` with `h >= 1` and `n >= 1` is a candidate (each layer keeps its `h` most important heads and `n`
    most important neurons); for each `h` the largest `n` that fits is taken, and the pair that keeps the most
    importance wins, among those spending at least `budget - slack` when any does. Uniform shapes are what the
    family's own config describes, so the export loads without remote code and in serving engines.

    Args:
        head_scores / neuron_scores: per layer, the importance of each head / neuron.
        costs: the [`UnitCosts`] of the model.
        budget: what the kept heads and neurons may spend together.
        allowed: a function `h -> bool` excluding head counts the family's config refuses (default: all).
        slack: how far under `budget` a solution may end.
        head_alive / neuron_alive: per layer, units that may be kept (default all; gradual pruning passes the current
            masks so that a removed unit stays removed): `h` and `n` are at most the fewest alive in a layer.

    Returns:
        `(head_keep, neuron_keep)`: per layer, bool keep-masks; a `ValueError` when no uniform shape fits.
    """

    def alive_only(scores, alive):
        if alive is None:
            return scores, min(s.numel() for s in scores)
        dead = torch.tensor(float("-inf"), dtype=torch.float64)
        masked = [torch.where(a.cpu().bool(), s.detach().double().cpu(), dead) for s, a in zip(scores, alive)]
        return masked, min(int(a.sum()) for a in alive)

    head_scores, heads = alive_only(head_scores, head_alive)
    neuron_scores, neurons = alive_only(neuron_scores, neuron_alive)

    def cumulative(scores, count):
        zero = torch.zeros(1, dtype=torch.float64)
        ranked = [torch.sort(s.detach().double().cpu(), descending=True).values[:count].cumsum(0) for s in scores]
        return sum(torch.cat([zero, r]) for r in ranked)

    head_cum, neuron_cum = cumulative(head_scores, heads), cumulative(neuron_scores, neurons)
    per_head, per_neuron = sum(costs.head), sum(costs.neuron)
    best, best_full = None, None
    for h in range(1, heads + 1):
        if allowed is not None and not allowed(h):
            continue
        left = budget - h * per_head
        n = min(neurons, int((left + 1e-6) // per_neuron)) if per_neuron > 0 else neurons
        if n < 1:
            continue
        value, spent = float(head_cum[h] + neuron_cum[n]), h * per_head + n * per_neuron
        if best is None or value > best[0]:
            best = (value, h, n)
        if spent >= budget - slack - 1e-6 and (best_full is None or value > best_full[0]):
            best_full = (value, h, n)
    chosen = best_full or best
    if chosen is None:
        raise ValueError(
            "No uniform shape (the same number of heads and of MLP neurons in every layer, at least one of each) fits "
            "the target; ask for a smaller target, or pass uniform=False."
        )
    _, h, n = chosen

    def top(scores, k):
        keep = []
        for s in scores:
            mask = torch.zeros(s.numel(), dtype=torch.bool)
            mask[torch.sort(s.detach().double().cpu(), descending=True, stable=True).indices[:k]] = True
            keep.append(mask)
        return keep

    return top(head_scores, h), top(neuron_scores, n)


def candidate_record(
    shape: dict,
    head_keep: list[torch.Tensor] | None = None,
    neuron_keep: list[torch.Tensor] | None = None,
    unit_loss: float | None = None,
    structure_loss: float | None = None,
    predicted_speedup: float | None = None,
    overshoots: bool = False,
    skipped: str | None = None,
) -> dict:
    """One candidate of a width or depth search, as a report shows it.

    Args:
        shape: what the candidate changes beyond units (`{"width": w}` or `{"dropped": [...]}`).
        head_keep / neuron_keep: the units it keeps (kept layers only).
        unit_loss: the estimated loss of the units it removes.
        structure_loss: the estimated loss of the dimensions or layers it removes.
        predicted_speedup: its speedup by the cost model.
        overshoots: whether every unit it keeps still leaves it past the target (chosen only when none fits).
        skipped: why no units were allocated (the candidate cannot reach the target).

    Returns:
        `shape` with `heads`, `ffn`, `unit_loss`, `structure_loss`, `loss` (their sum, on the scale of the unit
        scores: for Fisher scores, twice the predicted increase of the summed loss), `predicted_speedup` and
        `overshoots`; or with `skipped`.
    """
    if skipped is not None:
        return {**shape, "skipped": skipped}
    return {
        **shape,
        "heads": sum(int(k.sum()) for k in head_keep),
        "ffn": sum(int(k.sum()) for k in neuron_keep),
        "unit_loss": unit_loss,
        "structure_loss": structure_loss,
        "loss": unit_loss + structure_loss,
        "predicted_speedup": predicted_speedup,
        "overshoots": bool(overshoots),
    }


def removed_importance(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    head_keep: list[torch.Tensor],
    neuron_keep: list[torch.Tensor],
) -> float:
    """The estimated loss of the units keep-masks remove: the sum of their scores (for Fisher scores, the diagonal
    estimate of Kwon et al. 2022)."""
    removed = sum(float(s[~k].double().sum()) for s, k in zip(head_scores, head_keep))
    return removed + sum(float(s[~k].double().sum()) for s, k in zip(neuron_scores, neuron_keep))


def _note(candidates: list[dict] | None, shape: dict, *args, **kwargs) -> None:
    if candidates is not None:
        candidates.append(candidate_record(shape, *args, **kwargs))


def allocate_with_depth(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    costs: UnitCosts,
    target_speedup: float,
    layer_loss: torch.Tensor,
    allocate: Callable[..., tuple[list[torch.Tensor], list[torch.Tensor]]],
    max_dropped: int | None = None,
    candidates: list[dict] | None = None,
    layer_counts: list[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Keep-masks that may also remove whole layers, where that loses less than spending the budget on units alone.

    Candidate `d` removes the `d` layers of least `layer_loss` (their fixed cost, `costs.layer`, is then saved too)
    and spends what is left of the target on the other layers' units with `allocate`. Its estimated loss is the
    importance of the units removed from the kept layers plus `layer_loss` of the dropped ones; the candidate of least
    estimated loss wins (`d = 0` is the search without depth, so it is never worse by that estimate). `layer_loss`
    must be on the scale of the unit scores: for Fisher scores, the Fisher information of removing every unit of the
    layer together (`hf_prune.posttrain.fisher.layer_fisher`).

    Args:
        head_scores / neuron_scores: per layer, the importance of each unit.
        costs: the [`UnitCosts`] of the model, with `costs.layer` (what dropping a layer saves beyond its units).
        target_speedup: dense cost / pruned cost.
        layer_loss: `(layers,)`, the estimated loss of removing each layer whole.
        allocate: `(head_scores, neuron_scores, costs, budget) -> (head_keep, neuron_keep)`, e.g. `allocate_units`
            with its options bound; a `ValueError` from it skips the candidate.
        max_dropped: the most layers removed (default: all but one).
        candidates: a list that, when given, gains one record per candidate tried (see [`candidate_record`]), so a
            report can show why a depth won.
        layer_counts: the numbers of layers to keep that are tried (default: every number from all of them down to
            one, or to `layers - max_dropped`); one number fixes the depth, and its candidate is taken even where it
            overshoots the target.

    Returns:
        `(head_keep, neuron_keep, dropped)`: per layer (of the model), bool keep-masks (all False in a dropped
        layer), and the dropped layers' indices.
    """
    layers = len(head_scores)
    order = torch.argsort(layer_loss.double().cpu(), stable=True).tolist()
    most = layers - 1 if max_dropped is None else min(max_dropped, layers - 1)
    if layer_counts is not None and not all(0 < c <= layers for c in layer_counts):
        raise ValueError(f"layer_counts={layer_counts!r}: each must keep from 1 to the model's {layers} layers.")
    tried = range(most + 1) if layer_counts is None else [layers - c for c in layer_counts]
    allowed = costs.total / target_speedup
    best, error = None, None
    for d in tried:
        dropped = sorted(order[:d])
        kept = [i for i in range(layers) if i not in set(dropped)]
        sub = costs.without_layers(dropped)
        if allowed - sub.base <= 0:
            _note(candidates, {"dropped": dropped}, skipped="what the kept layers cannot remove exceeds the target")
            continue
        try:
            heads, neurons = [head_scores[i] for i in kept], [neuron_scores[i] for i in kept]
            hk, nk = allocate(heads, neurons, sub, allowed - sub.base)
        except ValueError as err:
            error = err
            _note(candidates, {"dropped": dropped}, skipped=str(err))
            continue
        removed = removed_importance(heads, neurons, hk, nk)
        structure = float(layer_loss.double()[dropped].sum())
        loss = removed + structure
        # dropping a layer can leave less to spend than its units cost: such candidates only when none fits
        spent = sub.flops([int(k.sum()) for k in hk], [int(k.sum()) for k in nk])
        overshoots = costs.total / spent > target_speedup * 1.02 + 1e-9
        _note(candidates, {"dropped": dropped}, hk, nk, removed, structure, costs.total / spent, overshoots)
        if best is None or (overshoots, loss) < best[:2]:
            best = (overshoots, loss, dropped, hk, nk)
    if best is None:
        raise error or ValueError(f"No candidate reaches target_speedup={target_speedup}.")
    _, _, dropped, hk, nk = best
    head_keep = [torch.zeros(s.shape, dtype=torch.bool) for s in head_scores]
    neuron_keep = [torch.zeros(s.shape, dtype=torch.bool) for s in neuron_scores]
    for j, i in enumerate(i for i in range(layers) if i not in set(dropped)):
        head_keep[i], neuron_keep[i] = hk[j], nk[j]
    return head_keep, neuron_keep, dropped


def allocate_with_width(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    hidden_scores: torch.Tensor,
    costs_at: Callable[[int], UnitCosts],
    reference: float,
    target_speedup: float,
    widths: list[int],
    allocate: Callable[..., tuple[list[torch.Tensor], list[torch.Tensor]]],
    candidates: list[dict] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Keep-masks that may also narrow the residual stream, where that loses less than spending the target on units
    at the full width (CoFi's hidden dimensions, chosen by the same estimate as the units).

    Candidate width `w` keeps the `w` residual dimensions of highest `hidden_scores`; what each head and neuron
    costs at that width (`costs_at(w)`: projections read and write fewer dimensions) leaves a budget that `allocate`
    spends on units. The estimated loss is the importance of the removed dimensions plus that of the removed units;
    the candidate of least estimated loss wins (the full width is the search without hidden dimensions).

    Args:
        head_scores / neuron_scores: per layer, the importance of each unit.
        hidden_scores: `(hidden,)`, the importance of each residual dimension, on the units' scale.
        costs_at: width -> the [`UnitCosts`] of the model at that residual width.
        reference: the dense model's cost (the target is `reference / target_speedup`).
        target_speedup: dense cost / pruned cost.
        widths: candidate widths (at most the current width).
        allocate: `(head_scores, neuron_scores, costs, budget) -> (head_keep, neuron_keep)`; a `ValueError` from it
            skips the candidate.
        candidates: a list that, when given, gains one record per width tried (see [`candidate_record`]), so a
            report can show why a width won.

    Returns:
        `(head_keep, neuron_keep, hidden_keep)`: per layer bool keep-masks, and the bool keep-mask `(hidden,)`.
    """
    order = torch.argsort(hidden_scores.double().cpu(), descending=True, stable=True)
    allowed = reference / target_speedup
    best, error = None, None
    for width in sorted({int(w) for w in widths}, reverse=True):
        if not 0 < width <= hidden_scores.numel():
            raise ValueError(f"Width {width} is out of range: the residual stream has {hidden_scores.numel()}.")
        keep = torch.zeros(hidden_scores.numel(), dtype=torch.bool)
        keep[order[:width]] = True
        costs = costs_at(width)
        if allowed - costs.base <= 0:
            _note(candidates, {"width": width}, skipped="what units cannot remove at this width exceeds the target")
            continue
        try:
            hk, nk = allocate(head_scores, neuron_scores, costs, allowed - costs.base)
        except ValueError as err:
            error = err
            _note(candidates, {"width": width}, skipped=str(err))
            continue
        structure = float(hidden_scores.double().cpu()[~keep].sum())
        removed = removed_importance(head_scores, neuron_scores, hk, nk)
        loss = structure + removed
        # a width whose every unit costs less than the target overshoots it: such candidates only when none fits
        spent = costs.flops([int(k.sum()) for k in hk], [int(k.sum()) for k in nk])
        overshoots = reference / spent > target_speedup * 1.02 + 1e-9
        _note(candidates, {"width": width}, hk, nk, removed, structure, reference / spent, overshoots)
        candidate = (overshoots, loss, hk, nk, keep)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        raise error or ValueError(f"No residual width reaches target_speedup={target_speedup}.")
    return best[2], best[3], best[4]
