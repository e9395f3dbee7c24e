"""Calibration of a measured speed target under timing noise: the shapes a cost model chose are timed against the dense
model, searched again toward the target, and accepted only when the target holds with a margin for the noise the
timings themselves show.

One timing round runs the dense model and a candidate back to back (interleaved, so a change of machine load falls on
both); each round gives one ratio `dense_ms / candidate_ms`. A candidate's speedup is the median of its rounds' ratios
and its noise the standard error of that median (`1.2533 * 1.4826 * MAD / sqrt(rounds)`, relative). Keeping the
slowest candidate whose *single* median clears the target favours timings that came out fast by chance: a rerun of
the chosen shapes then lands below the target, or, when the search overshot, far past it. Here a candidate is
accepted only when `speedup * (1 - 2 * noise) >= target` and
`speedup <= target * (1 + tolerance) + 2 * noise * speedup` (the window widens with the noise measured, never with
luck), and the chosen shapes are re-timed with fresh rounds at the end: that independent timing, not the one that
chose them, is the speedup reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "TOLERANCE",
    "MAX_CORRECTION",
    "MARGIN",
    "NOISE_GOAL",
    "MAX_TIMINGS",
    "speedup_estimate",
    "holds",
    "choose_candidate",
    "timed_estimate",
    "calibrate",
]

# How far past the target an accepted candidate may measure, beyond its noise.
TOLERANCE = 0.05
# Standard errors of margin: a candidate is accepted when the target holds two of them below its median.
MARGIN = 2.0
# A candidate is timed again (another call of its timing, 10 rounds on the timed cost models) while the standard error
# of its median is above this, up to MAX_TIMINGS calls: on a noisy machine, more rounds instead of a wider window.
NOISE_GOAL = 0.01
MAX_TIMINGS = 4
# How far a measured speedup may miss the cost model's prediction for calibration to follow it. The fitted line missed
# measured speedups by 7-12% on MiniLM at batch 32 on a CPU; a miss several times larger comes from a busy machine
# (threads of other processes slow a small model more than a big one), and following it would prune far past the
# target.
MAX_CORRECTION = 1.25


def speedup_estimate(ratios: list[float]) -> dict:
    """The median of per-round speedups and its relative standard error.

    Args:
        ratios: per interleaved round, dense time / candidate time.

    Returns:
        `{"speedup": median, "noise": relative standard error of the median, "rounds": len(ratios)}`; the noise of a
        single round is taken as 5% (one number says nothing of its spread).
    """
    if not ratios:
        raise ValueError("No timing rounds: time the candidate at least once.")
    median = statistics.median(ratios)
    if len(ratios) < 2 or median <= 0:
        return {"speedup": median, "noise": 0.05, "rounds": len(ratios)}
    mad = statistics.median(abs(r - median) for r in ratios)
    # 1.4826 * MAD estimates the standard deviation of normal noise; the median's standard error is 1.2533 times
    # that of the mean
    noise = 1.2533 * 1.4826 * mad / (len(ratios) ** 0.5) / median
    return {"speedup": median, "noise": noise, "rounds": len(ratios)}


def holds(estimate: dict, target: float, tolerance: float = TOLERANCE) -> bool:
    """Whether an estimate reaches `target` with the noise margin and passes it by at most the tolerance plus the
    margin."""
    speedup, noise = estimate["speedup"], estimate["noise"]
    return speedup * (1 - MARGIN * noise) >= target and speedup <= target * (1 + tolerance) + MARGIN * noise * speedup


def choose_candidate(candidates: list[dict], target: float) -> dict:
    """The timed candidate to keep: the slowest one whose speedup reaches the target with the noise margin; else the
    slowest whose median reaches it; else the fastest."""
    sure = [c for c in candidates if c["speedup"] * (1 - MARGIN * c["noise"]) >= target]
    if sure:
        return min(sure, key=lambda c: c["speedup"])
    reached = [c for c in candidates if c["speedup"] >= target]
    if reached:
        return min(reached, key=lambda c: c["speedup"])
    return max(candidates, key=lambda c: c["speedup"])


def timed_estimate(time_shapes: Callable[[object], list[float]], shapes) -> dict:
    """[`speedup_estimate`] of `shapes`, timed again while its noise is above `NOISE_GOAL` (at most `MAX_TIMINGS`
    timings)."""
    ratios = list(time_shapes(shapes))
    estimate = speedup_estimate(ratios)
    for _ in range(MAX_TIMINGS - 1):
        if estimate["noise"] <= NOISE_GOAL:
            break
        ratios += time_shapes(shapes)
        estimate = speedup_estimate(ratios)
    return estimate


def calibrate(
    search: Callable[[float], object],
    time_shapes: Callable[[object], list[float]],
    target: float,
    rounds: int,
    first: object,
    max_speedup: float = float("inf"),
    describe: Callable[[object], dict] | None = None,
) -> tuple[object, list[dict], dict]:
    """Times the shapes `first` (what the cost model chose for `target`) and, until one holds, searches again for the
    goal that the cost model's last miss (measured / goal) puts in the middle of the accepted window.

    Args:
        search: goal -> shapes (keep-masks) the cost model predicts to reach that goal.
        time_shapes: shapes -> per-round speedups against the dense model (interleaved rounds).
        target: the speedup to reach.
        rounds: timings at most (each searched shape is timed once).
        first: the shapes searched for `target`.
        max_speedup: the cost model's largest reachable speedup (the goal stays below it).
        describe: shapes -> a JSON-able summary of them, recorded with each round.

    Returns:
        `(shapes, records, final)`: the chosen shapes, one record per round (goal, speedup, noise, rounds, accepted,
        the shapes described) and the final re-timing of the chosen shapes (speedup, noise, rounds).
    """
    goal, keep = float(target), first
    candidates = []
    for _ in range(rounds):
        estimate = timed_estimate(time_shapes, keep)
        accepted = holds(estimate, target)
        record = {"goal": goal, **estimate, "accepted": accepted, **(describe(keep) if describe else {})}
        candidates.append({**record, "keep": keep})
        logger.info(
            "Calibration: shapes searched for %.3fx measure %.3fx (noise %.1f%%)%s.",
            goal,
            estimate["speedup"],
            100 * estimate["noise"],
            ", accepted" if accepted else "",
        )
        if accepted:
            break
        miss = estimate["speedup"] / goal  # measured over what the cost model predicted for these shapes
        if not 1 / MAX_CORRECTION <= miss <= MAX_CORRECTION:
            logger.warning(
                "Calibration stops: shapes predicted to run %.2fx faster measure %.2fx, further from the cost model "
                "than a busy machine's noise usually puts them. Time on an otherwise idle machine (a shared one slows "
                "small models more than big ones), or pass calibration_rounds=0.",
                goal,
                estimate["speedup"],
            )
            break
        # aim at the middle of the accepted window
        goal = (1 + TOLERANCE / 2 + MARGIN * estimate["noise"]) * target / miss
        if goal * 1.02 >= max_speedup:
            logger.warning(
                "Calibration stops: a measured %.2fx needs more than the %.2fx the cost model can reach.",
                target,
                max_speedup,
            )
            break
        keep = search(goal)
    chosen = choose_candidate(candidates, target)
    final = timed_estimate(time_shapes, chosen["keep"])
    if final["speedup"] * (1 + MARGIN * final["noise"]) < target:
        logger.warning(
            "The chosen shapes re-time at %.3fx (noise %.1f%%), under the %.2fx target: the machine's timings moved "
            "during calibration.",
            final["speedup"],
            100 * final["noise"],
            target,
        )
    records = [{k: v for k, v in c.items() if k != "keep"} for c in candidates]
    return chosen["keep"], records, final
