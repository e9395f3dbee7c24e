"""The benchmarks' statistics (`benchmarks/stats.py`) against values computed by hand."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from stats import mcnemar, retimed_speedups, same_shape_spread  # noqa: E402


def _pairs(a_only: int, b_only: int, both_right: int = 0, both_wrong: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness of two classifiers with the given counts of each of the four outcomes."""
    a = [True] * a_only + [False] * b_only + [True] * both_right + [False] * both_wrong
    b = [False] * a_only + [True] * b_only + [True] * both_right + [False] * both_wrong
    return torch.tensor(a), torch.tensor(b)


# ----------------------------------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(
    "a_only, b_only, p_value",
    [
        (8, 2, 2 * (1 + 10 + 45) / 2**10),  # 2 * P(X <= 2 | n = 10, 1/2) = 0.109375
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # the test is two-sided: either side's lead counts alike
        (10, 0, 2 / 2**10),
        (6, 1, 2 * (1 + 7) / 2**7),
        (3, 3, 1.0),  # 2 * P(X <= 3 | n = 6) = 2 * 42/64 > 1: capped
        (1, 2, 1.0),  # 2 * P(X <= 1 | n = 3) = 2 * 4/8
        (0, 0, 1.0),  # no discordant pair: nothing tells the two apart
    ],
)
def test_mcnemar_p_value_is_the_exact_two_sided_binomial_tail(a_only, b_only, p_value):
    test = mcnemar(*_pairs(a_only, b_only, both_right=5, both_wrong=3))
    assert test["a_only_right"] == a_only and test["b_only_right"] == b_only
    assert test["examples"] == a_only + b_only + 8
    assert test["p_value"] == pytest.approx(p_value, rel=1e-12)


def test_mcnemar_p_value_of_many_pairs_matches_the_binomial_sum():
    # 100 discordant pairs, 40 / 60: the lgamma form against exact integer binomial coefficients
    tail = sum(math.comb(100, i) for i in range(41)) / 2**100
    assert mcnemar(*_pairs(40, 60, both_right=900))["p_value"] == pytest.approx(2 * tail, rel=1e-9)
    assert 0.05 < 2 * tail < 0.06


def test_mcnemar_interval_is_the_paired_differences_mean_and_normal_half_width():
    # 20 examples: 8 won by A alone (+1), 2 by B alone (-1), 10 tied (0)
    test = mcnemar(*_pairs(8, 2, both_right=6, both_wrong=4))
    mean = (8 - 2) / 20
    variance = (8 + 2 - 20 * mean**2) / 19  # sample variance of the per-example differences
    half = 1.96 * math.sqrt(variance) / math.sqrt(20)
    assert test["accuracy_difference"] == pytest.approx(0.3)
    assert test["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-6)  # float32 differences
    assert test["ci95"] == pytest.approx([0.3 - 0.28792, 0.3 + 0.28792], abs=1e-5)
    # swapping the two classifiers flips the difference and its interval
    swapped = mcnemar(*reversed(_pairs(8, 2, both_right=6, both_wrong=4)))
    assert swapped["accuracy_difference"] == pytest.approx(-0.3)
    assert swapped["ci95"] == pytest.approx([-0.3 - half, -0.3 + half], abs=1e-6)
    assert swapped["p_value"] == test["p_value"]


def test_mcnemar_of_identical_predictions_has_a_zero_width_interval():
    right = torch.tensor([True, False, True, True])
    test = mcnemar(right, right.clone())
    assert test["p_value"] == 1.0 and test["accuracy_difference"] == 0.0 and test["ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------- retime
def _timed(b1: float, b32: float) -> list[dict]:
    return [{"batch_size": 1, "speedup": b1, "ms": 1.0}, {"batch_size": 32, "speedup": b32, "ms": 2.0}]


def test_same_shape_spread_is_the_largest_relative_spread_within_a_group_of_one_shape():
    small, large = ((2, 3), (100, 120)), ((4, 4), (300, 300))
    shapes = {"naive-b": small, "fisher": small, "naive-a": small, "staged": large, "joint": large, "alone": "other"}
    timed = {
        "naive-b": _timed(2.0, 3.0),
        "fisher": _timed(2.2, 3.0),
        "naive-a": _timed(2.1, 3.3),
        "staged": _timed(1.5, 2.0),
        "joint": _timed(1.8, 2.02),
        "alone": _timed(9.0, 0.1),  # in no group: its speedups say nothing of the noise
    }
    noise = same_shape_spread(shapes, timed, "2024-01-01T00:00:00Z")
    assert noise["at"] == "2024-01-01T00:00:00Z"
    assert noise["groups"] == [["fisher", "naive-a", "naive-b"], ["joint", "staged"]]
    # batch 1: 2.2 / 2.0 - 1 = 0.1 in the first group, 1.8 / 1.5 - 1 = 0.2 in the second; batch 32: 0.1 and 0.01
    assert noise["largest_relative_spread"] == {"b1": 0.2, "b32": 0.1}


def test_same_shape_spread_without_shared_shapes_is_zero_with_no_groups():
    noise = same_shape_spread({"a": (1,), "b": (2,)}, {"a": _timed(2.0, 3.0), "b": _timed(1.0, 5.0)}, "now")
    assert noise == {"at": "now", "groups": [], "largest_relative_spread": {"b1": 0.0, "b32": 0.0}}


def test_same_shape_spread_rounds_to_four_decimals():
    noise = same_shape_spread({"a": (1,), "b": (1,)}, {"a": _timed(3.0, 7.0), "b": _timed(3.1, 7.0)}, "now")
    assert (
        noise["largest_relative_spread"] == {"b1": round(3.1 / 3.0 - 1, 4), "b32": 0.0} == {"b1": 0.0333, "b32": 0.0}
    )


def test_retimed_speedups_replace_the_rows_and_keep_the_first_runs_own():
    row = {"row": "fisher", "speedup_b1": 1.9, "speedup_b32": 2.4, "heads": 36}
    once = retimed_speedups(row, _timed(2.0, 2.5))
    assert once == {
        "row": "fisher", "speedup_b1": 2.0, "speedup_b32": 2.5, "heads": 36,
        "speedup_b1_at_run": 1.9, "speedup_b32_at_run": 2.4,
    }  # fmt: skip
    assert row == {"row": "fisher", "speedup_b1": 1.9, "speedup_b32": 2.4, "heads": 36}  # the input is not changed
    # a second retime replaces the speedups again, but the run's own stay those of the run, not of the first retime
    twice = retimed_speedups(once, _timed(2.1, 2.6))
    assert (twice["speedup_b1"], twice["speedup_b32"]) == (2.1, 2.6)
    assert (twice["speedup_b1_at_run"], twice["speedup_b32_at_run"]) == (1.9, 2.4)
