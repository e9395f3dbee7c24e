"""Least-squares mask tuning checks its scales on a seeded random fifth of the batches (not the last fifth: batches
come sorted by length, so that would be the longest examples), and refuses fewer than two batches."""

import copy

import pytest
import torch
from utils import VOCAB, mask_removed_units, tiny_model

from hf_prune.models import structure
from hf_prune.models.adapter import ATTENTION
from hf_prune.posttrain.mask_tuning import held_out_batches, tune_masks
from hf_prune.posttrain.samples import pad_collate
from hf_prune.pruning.units import layer_units

REMOVED_HEADS, REMOVED_NEURONS = {0: [1, 3], 1: [0]}, {0: list(range(0, 48, 3)), 1: list(range(20))}


def _models():
    dense = tiny_model("bert", seed=0).eval()
    student = mask_removed_units(copy.deepcopy(dense), REMOVED_HEADS, REMOVED_NEURONS)
    keep_heads = [torch.ones(n, dtype=torch.bool) for n in structure.attention_units(dense)]
    keep_neurons = [torch.ones(n, dtype=torch.bool) for n in structure.ffn_size(dense)]
    for layer, units in REMOVED_HEADS.items():
        keep_heads[layer][units] = False
    for layer, units in REMOVED_NEURONS.items():
        keep_neurons[layer][units] = False
    return dense, student, keep_heads, keep_neurons


def _sorted_batches(count: int, size: int = 4) -> list[dict]:
    """Batches of rows sorted by length (3 to 22 tokens), as the search makes them: the last are the longest."""
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, VOCAB, (3 + i % 20,), generator=g).tolist(), "labels": i % 3}
        for i in range(count * size)
    ]
    rows.sort(key=lambda r: len(r["input_ids"]))
    return [pad_collate(0)(rows[i : i + size]) for i in range(0, len(rows), size)]


def _first_layer_errors(dense, student, batches) -> list[float]:
    """Per batch, the squared error of the student's first attention output against the dense model's, over the
    real tokens: what the first layer's head scales are fitted to remove (at scales of one)."""
    outputs = {}
    handles = [
        layer_units(m, ATTENTION)[0].output_linear.register_forward_hook(
            lambda mod, args, out, key=key: outputs.__setitem__(key, out)
        )
        for key, m in (("dense", dense), ("student", student))
    ]
    errors = []
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            dense(**inputs), student(**inputs)
            real = b["attention_mask"].bool()
            errors.append(float((outputs["student"] - outputs["dense"])[real].double().pow(2).sum()))
    for h in handles:
        h.remove()
    return errors


def test_held_out_batches_are_a_seeded_random_fifth():
    assert held_out_batches(10) == held_out_batches(10, seed=0)  # the default seed
    draws = {seed: held_out_batches(10, seed) for seed in range(8)}
    for chosen in draws.values():
        assert len(chosen) == 2 and chosen == sorted(chosen) and set(chosen) <= set(range(10))
    assert len({tuple(c) for c in draws.values()}) > 4  # the seed decides
    assert any(c != [8, 9] for c in draws.values()) and held_out_batches(10, 0) != [8, 9]
    assert len(held_out_batches(2, 3)) == 1 and len(held_out_batches(23, 1)) == 4


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_batches_are_refused_with_the_fix(count):
    dense, student, keep_heads, keep_neurons = _models()
    with pytest.raises(ValueError, match=rf"at least 2 batches .*got {count}: raise tune_samples or lower batch_size"):
        tune_masks(student, dense, _sorted_batches(4)[:count], keep_heads, keep_neurons, True)
    with pytest.raises(ValueError, match="raise tune_samples or lower batch_size"):
        held_out_batches(count)


def test_the_held_out_error_is_measured_on_the_seeded_batches():
    dense, student, keep_heads, keep_neurons = _models()
    batches = _sorted_batches(10)
    errors = _first_layer_errors(dense, student, batches)
    last_fifth = sum(errors[-2:])
    for seed in (0, 5):
        tuned = copy.deepcopy(student)
        if seed == 0:  # the positional call of the search, seed left at its default
            report = tune_masks(tuned, dense, batches, keep_heads, keep_neurons, True)
        else:
            report = tune_masks(tuned, dense, batches, keep_heads, keep_neurons, True, seed=seed)
        before = report[0]["heads"]["held_out_error"][0]
        expected = sum(errors[i] for i in held_out_batches(len(batches), seed))
        assert before == pytest.approx(expected, rel=1e-5)
        assert held_out_batches(len(batches), seed) != [8, 9] and before != pytest.approx(last_fifth, rel=1e-3)
        assert set(report[0]) == {"layer", "heads", "neurons"}
    # the same seed, the same split and the same scales
    again = [copy.deepcopy(student) for _ in range(2)]
    reports = [tune_masks(m, dense, batches, keep_heads, keep_neurons, True, seed=5) for m in again]
    for a, b in zip(*reports):
        assert a["heads"]["tuned"] == b["heads"]["tuned"] and a["neurons"]["tuned"] == b["neurons"]["tuned"]
        assert a["heads"]["held_out_error"] == pytest.approx(b["heads"]["held_out_error"], rel=1e-9)
        assert a["neurons"]["held_out_error"] == pytest.approx(b["neurons"]["held_out_error"], rel=1e-9)
    for a, b in zip(again[0].parameters(), again[1].parameters()):
        torch.testing.assert_close(a, b)
