"""What units cost at a narrower residual stream: the cost models of `prune_to_speedup` at each candidate hidden
width (CoFi's hidden dimensions), and the widths the search tries."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ..models.costs import UnitCosts, measured_unit_costs, parameter_unit_costs, unit_costs
from ..models.hidden import hidden_width, prune_hidden_dims

__all__ = ["candidate_widths", "width_costs"]


def candidate_widths(width: int, steps: int = 8, smallest: float = 0.5) -> list[int]:
    """Residual widths the search tries: from `width` down to `smallest * width` in `steps` equal steps."""
    step = max(1, round(width * (1.0 - smallest) / steps))
    return sorted({max(1, width - i * step) for i in range(steps + 1)}, reverse=True)


def _narrowed(model: nn.Module, width: int) -> nn.Module:
    narrow = copy.deepcopy(model).eval()
    current = hidden_width(model)
    if width < current:
        prune_hidden_dims(narrow, range(width, current))  # which dimensions go does not change what units cost
    return narrow


def width_costs(
    model: nn.Module, costs: UnitCosts, cost_model: str, seq_len: int, timing_model: nn.Module | None = None,
    latency_batch_size: int = 32,
) -> Callable[[int], UnitCosts]:
    """`width -> UnitCosts` of `model` at that residual width, in the unit of `costs` (the model's costs now).

    FLOPs and parameters are counted on a narrowed copy (exact). Timed costs are measured once more at half the width
    and interpolated linearly in the width between that and `costs` (timing every candidate would take minutes).

    Args:
        model: the model (left unchanged).
        costs: its costs at the current width.
        cost_model: "flops", "params", "latency" or "decode".
        seq_len: the cost model's sequence length.
        timing_model: the copy the timed costs are measured on (default `model`).
        latency_batch_size: the batch size of the latency costs.

    Returns:
        The function, caching what it computed.
    """
    full = hidden_width(model)
    cache: dict[int, UnitCosts] = {full: costs}
    if cost_model in ("latency", "decode"):
        half = max(1, full // 2)
        narrow = _narrowed(timing_model if timing_model is not None else model, half)
        if cost_model == "latency":
            measured = measured_unit_costs(narrow, seq_len, latency_batch_size)
        else:
            measured = measured_unit_costs(narrow, seq_len, 1, phase="decode")

        def interpolate(width: int) -> UnitCosts:
            t = (full - width) / (full - half) if full > half else 0.0

            def mix(a, b):
                return [x + t * (y - x) for x, y in zip(a, b)]

            return UnitCosts(
                seq_len, mix(costs.head, measured.head), mix(costs.neuron, measured.neuron),
                max(costs.base + t * (measured.base - costs.base), 1e-9), costs.heads, costs.neurons, costs.unit,
                mix(costs.layer, measured.layer) if costs.layer and measured.layer else [],
            )  # fmt: skip

        compute = interpolate
    else:

        def compute(width: int) -> UnitCosts:
            narrow = _narrowed(model, width)
            return unit_costs(narrow, seq_len) if cost_model == "flops" else parameter_unit_costs(narrow)

    def at(width: int) -> UnitCosts:
        if width not in cache:
            cache[width] = compute(width)
        return cache[width]

    return at
