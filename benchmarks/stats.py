"""The statistics of the benchmarks, as pure functions of numbers, tensors and dicts (no models, no files, no clock).

Imported by the benchmark scripts, which put their own folder on `sys.path` first:

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stats import mcnemar  # noqa: E402
"""

from __future__ import annotations

import math

import torch


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict:
    """McNemar's exact test of two classifiers on the same examples (boolean tensors: each one right or not).

    Only the pairs where they disagree count: under the null hypothesis each of those is won by either side with
    probability 1/2, so the two-sided p-value is twice the binomial tail of the smaller count. The accuracy difference
    comes with a 95% interval from the paired per-example differences (normal approximation).

    Args:
        correct_a / correct_b: per example, whether classifier A / B predicted it right (same examples, same order).

    Returns:
        `{"examples", "a_only_right", "b_only_right", "p_value", "accuracy_difference", "ci95"}`: the pairs only A and
        only B got right, the two-sided p-value (at most 1), A's accuracy minus B's and its 95% interval
        `mean +- 1.96 * std / sqrt(examples)` of the per-example differences (sample standard deviation).
    """
    a_only, b_only = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)) for i in
               range(k + 1)) if n else 1.0  # fmt: skip
    diff = correct_a.float() - correct_b.float()
    half = 1.96 * float(diff.std()) / math.sqrt(diff.numel())
    return {
        "examples": diff.numel(), "a_only_right": a_only, "b_only_right": b_only, "p_value": min(1.0, 2 * tail),
        "accuracy_difference": float(diff.mean()), "ci95": [float(diff.mean()) - half, float(diff.mean()) + half],
    }  # fmt: skip


def same_shape_spread(shapes: dict, timed: dict, when: str) -> dict:
    """The timing noise of one retime, read off the rows that share their shapes (per-layer heads and FFN widths:
    the same computation, whatever weights they hold): per batch size, the largest relative spread of their
    speedups.

    Args:
        shapes: per row key, its shape (any hashable, e.g. `(heads per layer, FFN widths per layer)`); rows only, not
            the model they are timed against.
        timed: per row key, its timings: a list of `{"batch_size": int, "speedup": float, ...}`, one per batch size.
        when: the time of the retime, recorded as is.

    Returns:
        `{"at": when, "groups": [...], "largest_relative_spread": {"b1": ..., "b32": ...}}`: the groups of two or more
        rows of one shape (each sorted), and per batch size the largest `max / min - 1` of the speedups within a
        group (rounded to 4 decimals; 0.0 when no two rows share a shape).
    """
    groups: dict[object, list[str]] = {}
    for key, shape in shapes.items():
        groups.setdefault(shape, []).append(key)
    shared = [keys for keys in groups.values() if len(keys) > 1]
    spread = {}
    for batch in ("1", "32"):
        worst = 0.0
        for keys in shared:
            speedups = [b["speedup"] for key in keys for b in timed[key] if str(b["batch_size"]) == batch]
            worst = max(worst, max(speedups) / min(speedups) - 1)
        spread[f"b{batch}"] = round(worst, 4)
    return {"at": when, "groups": [sorted(keys) for keys in shared], "largest_relative_spread": spread}


def retimed_speedups(row: dict, batches: list[dict]) -> dict:
    """A result row with the speedups of a retime in place of its own, the speedups of the row's own run kept.

    Args:
        row: a result row, with `speedup_b<batch size>` per timed batch size (and, once retimed,
            `speedup_b<batch size>_at_run`).
        batches: the retime's timings of the row: a list of `{"batch_size": int, "speedup": float, ...}`.

    Returns:
        A copy of `row` whose `speedup_b<batch size>` are the retime's; `speedup_b<batch size>_at_run` holds the
        speedup the row's own run measured, set the first time the row is retimed and kept by later retimes.
    """
    row = dict(row)
    for batch in batches:
        name = f"speedup_b{batch['batch_size']}"
        row.setdefault(f"{name}_at_run", row[name])
        row[name] = batch["speedup"]
    return row
