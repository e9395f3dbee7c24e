"""Retraining-free pruning in several rounds: `prune_to_speedup` reaches the target a step at a time, its importance
measured again on the pruned and tuned model of the round before.

The mask Fisher is a second-order estimate around the current weights: it predicts the loss of removing a few units
well and of removing many together badly, since every unit's importance changes once its neighbours are gone (and once
the least-squares tuning has rescaled the rest). Gradual schedules with importance recomputed in between are what
makes magnitude and Taylor pruning work at high sparsity (Zhu & Gupta 2017; Molchanov et al. 2019); here the rounds
cost one Fisher pass and one tuning each, and no training.
"""

from __future__ import annotations

import time

from torch import nn
from transformers.utils import logging

from ..models.costs import parameter_unit_costs, unit_costs
from .search import prune_to_speedup

logger = logging.get_logger(__name__)

__all__ = ["prune_in_rounds"]

_COUNTED = ("flops", "params")


def prune_in_rounds(
    model: nn.Module, dataset, target_speedup: float, rounds: int = 3, *, cost_model: str = "flops", **kwargs
) -> tuple[nn.Module, dict]:
    """[`hf_prune.posttrain.search.prune_to_speedup`] in `rounds` steps of equal ratio: round `i` prunes the model of
    round `i - 1` to `target_speedup ** (i / rounds)` of the dense cost, measuring importance and tuning again.

    Args:
        model: the dense model (left unchanged).
        dataset: as for `prune_to_speedup`; the same sample is drawn every round.
        target_speedup: dense / pruned cost at the end, in the units of `cost_model`.
        rounds: steps (1 is `prune_to_speedup` itself).
        cost_model: a counted cost model, `"flops"` or `"params"` (each round's target is computed from the cost of
            the model so far; a timed cost model would time every round).
        kwargs: the other arguments of `prune_to_speedup` (`num_samples`, `seq_len`, `tune_samples`, `importance`,
            `uniform`, ...).

    Returns:
        `(pruned_model, summary)`: the summary of the last round with the totals against the dense model, and every
        round's target, shapes and wall time in `rounds`.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be a positive integer (1 prunes in one step).")
    if cost_model not in _COUNTED:
        raise ValueError(
            f"cost_model={cost_model!r}: rounds need a counted cost model ({', '.join(_COUNTED)}); a timed one would "
            "time every round. Prune in rounds to a FLOPs or parameter target, or use prune_to_speedup."
        )
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup={target_speedup} must be > 1.")
    seq_len = kwargs.get("seq_len", 128)

    def cost(m: nn.Module) -> float:
        return parameter_unit_costs(m).total if cost_model == "params" else unit_costs(m, seq_len).total

    started = time.perf_counter()
    dense_cost, current, steps = cost(model), model, []
    for i in range(1, rounds + 1):
        goal = dense_cost / target_speedup ** (i / rounds)  # this round ends at that cost
        step = cost(current) / goal
        if step <= 1.0:  # an earlier round's overshoot already got there
            continue
        current, summary = prune_to_speedup(current, dataset, step, cost_model=cost_model, **kwargs)
        reached = dense_cost / cost(current)
        steps.append(
            {
                "round": i,
                "step_target": step,
                "reached": reached,
                "heads_after": summary["heads_after"],
                "ffn_after": summary["ffn_after"],
                "wall_time_s": summary["wall_time_s"],
            }
        )
        logger.info("Round %d of %d: %.3fx of the dense %s (this round %.3fx).", i, rounds, reached, cost_model, step)
    first = unit_costs(model, seq_len)
    after = unit_costs(current, seq_len)
    summary = {
        **summary,
        "method": f"{summary['method']}, in {rounds} rounds",
        "target_speedup": float(target_speedup),
        "predicted_speedup": dense_cost / cost(current),
        "flops_before": first.total,
        "flops_after": after.total,
        "flops_ratio": first.total / after.total,
        "heads_before": first.heads,
        "ffn_before": first.neurons,
        "pruned_neurons": {str(i): b - a for i, (b, a) in enumerate(zip(first.neurons, after.neurons)) if b > a},
        "rounds": steps,
    }
    summary.pop("pruned_heads", None)  # indices of one round's model; the export records the original ones
    summary["wall_time_s"] = {"total_s": round(time.perf_counter() - started, 3)}
    return current, summary

