"""Argument checks of `prune_to_speedup`: each refuses what would fail late or silently give a useless model, with
the fix in its message."""

from __future__ import annotations

from ..models.auto import get_adapter
from ..models.hidden import hidden_width
from .width import candidate_widths

__all__ = [
    "check_drop_layers",
    "check_layer_counts",
    "check_prune_hidden",
    "check_samples",
    "check_some_of_each",
    "check_uniform_reachable",
    "check_widths",
]


def check_drop_layers(model, importance: str) -> None:
    if not get_adapter(model).can_drop_layers:
        raise ValueError(
            f"drop_layers=True needs a family whose layers can be removed; {type(model).__name__} "
            f"({model.config.model_type}) has not. Prune its units with drop_layers=False."
        )
    if importance not in ("fisher", "hybrid"):
        raise ValueError(
            f"drop_layers=True weighs layers by the Fisher information of their units: use importance='fisher' or "
            f"'hybrid', not {importance!r}."
        )


def check_widths(model, prune_hidden: bool, hidden_widths: list[int] | None) -> list[int] | None:
    """The residual widths the search tries (None without `prune_hidden`)."""
    if hidden_widths is not None and not prune_hidden:
        raise ValueError("hidden_widths names the widths a narrowing search tries: pass prune_hidden=True with it.")
    if not prune_hidden:
        return None
    hidden = hidden_width(model)
    if hidden_widths is None:
        return candidate_widths(hidden)
    return _sizes("hidden_widths", hidden_widths, hidden, "integer widths from 1 to the model's residual width "
                  f"({hidden}), e.g. [{hidden * 3 // 4}] to fix it")  # fmt: skip


def check_prune_hidden(model, importance: str, drop_layers: bool, uniform: bool) -> None:
    get_adapter(model).hidden_modules(model)  # a family or task head without hidden-dimension pruning fails here
    if importance != "fisher":
        raise ValueError(f"prune_hidden=True weighs dimensions by their Fisher information: use importance='fisher', "
                         f"not {importance!r}.")  # fmt: skip
    if drop_layers or uniform:
        raise ValueError("prune_hidden=True searches widths on its own: pass drop_layers=False and uniform=False.")


def check_some_of_each(costs, budget: float, target_speedup: float, allow_empty_kinds: bool) -> None:
    """Refuses a target that only removing every attention unit or every MLP neuron of the model reaches: a typo in
    a target would otherwise give a model that predicts a constant."""
    if allow_empty_kinds:
        return
    one_head = min((c for c, h in zip(costs.head, costs.heads) if h > 0), default=0.0)
    one_neuron = min((c for c, n in zip(costs.neuron, costs.neurons) if n > 0), default=0.0)
    if one_head + one_neuron > budget + 1e-6:
        largest = costs.total / (costs.base + one_head + one_neuron)
        raise ValueError(
            f"target_speedup={target_speedup} leaves no attention unit or no MLP neuron in the whole model: the "
            f"largest target that keeps some of each is {largest:.3g}x ({costs.unit}). Ask for less, or pass "
            "allow_empty_kinds=True if a model without attention (or without MLPs) is what you want."
        )


def check_uniform_reachable(model, costs, budget: float, target_speedup: float) -> None:
    accepts = get_adapter(model).accepts_uniform
    heads = [h for h in range(1, min(costs.heads) + 1) if accepts(model.config, h)]
    cheapest = heads[0] * sum(costs.head) + sum(costs.neuron) if heads else None
    if cheapest is None or cheapest > budget + 1e-6:
        raise ValueError(
            f"target_speedup={target_speedup} is out of reach with uniform shapes: one attention unit and one MLP "
            "neuron in every layer (of the head counts the family's config accepts) already cost more. Ask for less, "
            "or pass uniform=False."
        )


def check_samples(
    rows: list[dict], tune_rows: int, hidden: int, units: int, batch_size: int, fixed: int | None = None
) -> None:
    # `fixed`: the positions of every example where the config fixes them (images), else the length of `input_ids`
    tokens = sum(len(r["input_ids"]) if "input_ids" in r else fixed for r in rows[:tune_rows])
    needed = 10 * units
    if tune_rows < 5 or tokens * hidden * 4 // 5 < needed:
        raise ValueError(
            f"Too few samples for the least-squares mask tuning: {tune_rows} examples ({tokens} tokens) give "
            f"{tokens * hidden * 4 // 5} equations on the 80% fitted, for up to {units} scales per layer (at least "
            f"{needed} and 5 examples are needed). Raise num_samples / tune_samples, or pass tune=False."
        )
    if -(-tune_rows // batch_size) < 2:
        raise ValueError(
            "The least-squares mask tuning needs at least 2 batches (one to fit the scales on, one to check them on); "
            f"tune_samples={tune_rows} at batch_size={batch_size} gives one. Raise tune_samples or lower batch_size, "
            "or pass tune=False."
        )


def check_layer_counts(model, drop_layers: bool, layer_counts: list[int] | None) -> list[int] | None:
    """The numbers of layers a depth search may keep (None: any from all of them down to one)."""
    if layer_counts is None:
        return None
    if not drop_layers:
        raise ValueError("layer_counts names the depths a search that drops layers tries: pass drop_layers=True too.")
    layers = len(get_adapter(model).layers(model))
    counts = _sizes("layer_counts", layer_counts, layers, f"integer numbers of layers to keep, from 1 to the model's "
                    f"{layers}, e.g. [{max(1, layers // 2)}] to fix the depth")  # fmt: skip
    return sorted(set(counts), reverse=True)


def _sizes(name: str, values, most: int, expected: str) -> list[int]:
    """`values` as a list of integers from 1 to `most`, else an error that names `expected`."""
    sizes = list(values)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= most for n in sizes):
        raise ValueError(f"{name}={values!r}: give one or more {expected}.")
    return sizes
