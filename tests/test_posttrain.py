"""The cost model, the speed budget and the retraining-free pruner on tiny models built in code."""

import copy
import os
import statistics

import pytest
import torch
from utils import VOCAB, TinyDataset, mask_removed_units, tiny_model

from hf_prune import PruningArguments, load_pruned, prune_ffn_neurons, prune_heads, prune_to_speedup, save_pruned
from hf_prune.models import structure
from hf_prune.models.costs import count_flops, unit_costs
from hf_prune.posttrain.calibration import speedup_estimate
from hf_prune.posttrain.fisher import mask_fisher, mask_gradients, rearrange_layer, unit_masks
from hf_prune.posttrain.samples import pad_collate
from hf_prune.pruning.allocation import allocate_units, speedup_budget

SEQ = 16
ARCHS = ["bert", "roberta", "xlm-roberta", "electra"]


def _model(model_type="bert", **overrides):
    kwargs = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
    kwargs.update(overrides)
    return tiny_model(model_type, seed=0, **kwargs).eval()


class RaggedDataset(TinyDataset):
    """TinyDataset with rows of different lengths (so batches carry padding)."""

    def __getitem__(self, i):
        n = 6 + i % 7
        return {"input_ids": self.input_ids[i, :n].tolist(), "labels": int(self.labels[i])}


# ----------------------------------------------------------------------------------------------------- costs
@pytest.mark.parametrize("model_type", ARCHS)
def test_unit_costs_predict_the_counted_flops_of_any_pruned_shape(model_type):
    model = _model(model_type)
    costs = unit_costs(model, SEQ)
    assert costs.total == count_flops(model, SEQ)
    prune_heads(model, {0: [0, 1, 2, 3], 2: [1]})
    prune_ffn_neurons(model, {1: list(range(20)), 2: list(range(64))})
    assert costs.flops([0, 4, 3], [64, 44, 0]) == count_flops(model, SEQ) == unit_costs(model, SEQ).total


def test_allocation_spends_the_budget_and_keeps_the_most_importance():
    model = _model()
    costs = unit_costs(model, SEQ)
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(4, generator=g) * 10 for _ in range(3)]
    neurons = [torch.rand(64, generator=g) for _ in range(3)]
    budget = speedup_budget(costs, 2.0)
    keep_h, keep_n = allocate_units(heads, neurons, costs, budget, slack=0.01 * costs.total)
    used = costs.flops([int(k.sum()) for k in keep_h], [int(k.sum()) for k in keep_n]) - costs.base
    assert budget - 0.01 * costs.total <= used <= budget
    kept = sum(float(s[k].sum()) for s, k in zip(heads + neurons, keep_h + keep_n))
    # one ranking by importance per FLOP is among the candidates searched, so it never keeps more importance
    units = [(float(s) / costs.head[0], costs.head[0], float(s)) for h in heads for s in h]
    units += [(float(s) / costs.neuron[0], costs.neuron[0], float(s)) for n in neurons for s in n]
    spent = greedy = 0.0
    for _, cost, score in sorted(units, reverse=True):
        if spent + cost <= budget:
            spent, greedy = spent + cost, greedy + score
    assert kept >= greedy - 1e-9
    # removed units stay removed
    alive_h = [torch.tensor([False, True, True, True])] + [torch.ones(4, dtype=torch.bool)] * 2
    keep_h, _ = allocate_units(heads, neurons, costs, budget, alive_h, None)
    assert not keep_h[0][0]


def test_speedup_budget_names_what_is_reachable():
    costs = unit_costs(_model(), SEQ)
    with pytest.raises(ValueError, match="must be > 1"):
        speedup_budget(costs, 1.0)
    with pytest.raises(ValueError, match=r"out of reach.*leaves"):
        speedup_budget(costs, costs.max_speedup * 1.01)


# ----------------------------------------------------------------------------------------------------- importance
def test_mask_fisher_is_the_sum_of_squared_per_example_mask_gradients():
    model = _model()
    rows = [RaggedDataset(8)[i] for i in range(8)]
    batch = pad_collate(0)(rows)
    assert (batch["attention_mask"] == 0).any()  # padded rows in the batch
    heads, neurons = mask_gradients(model, [batch])
    # directly: one example at a time, unpadded, one mask per head and neuron
    direct = []
    for i, row in enumerate(rows):
        single = pad_collate(0)([row])
        hm = [torch.ones(1, 4, requires_grad=True) for _ in range(3)]
        nm = [torch.ones(1, 64, requires_grad=True) for _ in range(3)]
        with unit_masks(model, hm, nm):
            loss = model(**single).loss
        grads = torch.autograd.grad(loss, hm + nm)
        direct.append(grads)
        for layer in range(3):
            torch.testing.assert_close(heads[layer][i], grads[layer][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(neurons[layer][i], grads[3 + layer][0], atol=1e-5, rtol=1e-4)
    fisher = mask_fisher(heads + neurons)
    for unit_kind in range(6):
        expected = sum(g[unit_kind][0].pow(2) for g in direct)
        torch.testing.assert_close(fisher[unit_kind], expected, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_rearrangement_lowers_the_block_fisher_estimate_and_keeps_the_count():
    # Units act on disjoint examples (no cross terms), except units 3 and 7, whose gradients cancel in part: 7 is
    # too costly alone for the diagonal to remove it, but cheap together with 3.
    grads = torch.zeros(65, 12)
    others = [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    for unit, diag in zip(others, [6, 7, 8, 9, 10, 12, 13, 14, 15, 16]):
        grads[5 * unit : 5 * unit + 5, unit] = (diag / 5) ** 0.5
    grads[60:65, 3], grads[60:65, 7] = 1.0, -1.5  # diagonals 5 and 11.25; together 1.25
    diag = grads.pow(2).sum(0)
    keep = torch.ones(12, dtype=torch.bool)
    keep[torch.argsort(diag)[:4]] = False
    assert sorted((~keep).nonzero().flatten().tolist()) == [0, 1, 2, 3]

    def loss(k):
        return float(grads[:, ~k].sum(dim=1).pow(2).sum())

    new = rearrange_layer(keep, grads)
    assert sorted((~new).nonzero().flatten().tolist()) == [0, 1, 3, 7]
    assert loss(new) == pytest.approx(1.25 + 6 + 7) and loss(keep) == pytest.approx(5 + 6 + 7 + 8)
    g = torch.Generator().manual_seed(0)
    random = torch.randn(40, 30, generator=g)
    start = torch.ones(30, dtype=torch.bool)
    start[torch.argsort(random.pow(2).sum(0))[:12]] = False
    assert int((~rearrange_layer(start, random)).sum()) == 12
    assert loss_of(random, rearrange_layer(start, random)) <= loss_of(random, start)


def loss_of(grads, keep):
    return float(grads[:, ~keep].sum(dim=1).pow(2).sum())


# ----------------------------------------------------------------------------------------------------- the path
@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("target", [1.5, 2.0, 3.0])
def test_prune_to_speedup_meets_the_target_and_matches_the_masked_model(model_type, target, tmp_path):
    model = _model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, summary = prune_to_speedup(model, RaggedDataset(128), target, num_samples=128, seq_len=SEQ, tune=False)
    ratio = count_flops(model, SEQ) / count_flops(pruned, SEQ)
    assert target <= ratio <= 1.02 * target
    assert summary["flops_ratio"] == pytest.approx(ratio)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    # the masked dense model and the physically pruned one compute the same function
    kept = {int(k): v for k, v in summary["pruned_heads"].items()}
    neurons = {layer: sorted(set(range(64)) - set(_kept_neuron_ids(model, pruned, layer))) for layer in range(3)}
    masked = mask_removed_units(_model(model_type), kept, neurons)
    batch = pad_collate(1 if model_type != "bert" else 0)([RaggedDataset(4)[i] for i in range(4)])
    batch.pop("labels")
    torch.testing.assert_close(pruned(**batch).logits, masked(**batch).logits, atol=1e-5, rtol=1e-4)
    # and it saves and reloads as any pruned export
    save_pruned(pruned, tmp_path / "export")
    torch.testing.assert_close(load_pruned(tmp_path / "export")(**batch).logits, pruned(**batch).logits)


def _kept_neuron_ids(dense, pruned, layer):
    """Which dense neurons a pruned layer kept: rows of the up projection are copied unchanged."""
    up_d = _ffn_in(dense, layer).weight
    up_p = _ffn_in(pruned, layer).weight
    return [int((up_d == row).all(dim=1).nonzero()[0]) for row in up_p]


def _ffn_in(model, layer):
    return structure.projections(model, layer, "mlp")["ffn_in"]


def test_mask_tuning_lowers_the_error_on_examples_it_did_not_see():
    model = _model(num_hidden_layers=2)
    data = RaggedDataset(400)
    kwargs = dict(num_samples=256, seq_len=SEQ, tune_samples=256, seed=0)
    untuned, s0 = prune_to_speedup(model, data, 2.0, tune=False, **kwargs)
    tuned, s1 = prune_to_speedup(model, data, 2.0, tune=True, **kwargs)
    assert s0["pruned_heads"] == s1["pruned_heads"] and s0["ffn_after"] == s1["ffn_after"]
    assert any(e.get("neurons", {}).get("tuned") for e in s1["tuning"])
    # examples outside the sample: what the classifier reads (the last layer's first token) against the dense model
    fresh = TinyDataset(64, seed=123)
    batch = {"input_ids": fresh.input_ids, "attention_mask": torch.ones_like(fresh.input_ids)}
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states[-1][:, 0]
        err = {
            name: float((m(**batch, output_hidden_states=True).hidden_states[-1][:, 0] - ref).pow(2).mean())
            for name, m in (("untuned", untuned), ("tuned", tuned))
        }
    assert err["tuned"] < err["untuned"]


def test_bad_input_fails_before_any_work():
    model = _model()
    data = RaggedDataset(64)
    with pytest.raises(ValueError, match="must be > 1"):
        prune_to_speedup(model, data, 0.9)
    with pytest.raises(ValueError, match="out of reach"):
        prune_to_speedup(model, data, 1000.0, seq_len=SEQ)
    with pytest.raises(ValueError, match="Too few samples for the least-squares"):
        prune_to_speedup(model, data, 2.0, num_samples=4, seq_len=SEQ)
    with pytest.raises(ValueError, match="needs at least 2 batches .* tune_samples=64 at batch_size=64 gives one"):
        prune_to_speedup(model, TinyDataset(64), 2.0, num_samples=64, tune_samples=64, batch_size=64, seq_len=SEQ)
    unlabeled = [{"input_ids": [5, 6, 7]}] * 8
    with pytest.raises(ValueError, match="no `labels`"):
        prune_to_speedup(model, unlabeled, 2.0, seq_len=SEQ)
    with pytest.raises(ValueError, match="Both target_speedup=2.0 and target_sparsity=0.5"):
        PruningArguments(output_dir="x", target_speedup=2.0, target_sparsity=0.5, report_to=[])
    with pytest.raises(ValueError, match="pruning_target='heads_and_ffn'"):
        PruningArguments(output_dir="x", target_speedup=2.0, pruning_method="movement", report_to=[])
    with pytest.raises(ValueError, match="set target_speedup"):
        PruningArguments(output_dir="x", pruning_method="taylor", pruning_target="heads_and_ffn", report_to=[])


def test_vocab_of_the_ragged_rows_fits_the_model():
    assert max(max(RaggedDataset(8)[i]["input_ids"]) for i in range(8)) < VOCAB


# How far the linear latency model may miss a measured speedup beyond the timing noise: the fitted line missed
# measured speedups by 7-12% on MiniLM (see `hf_prune.posttrain.calibration`), and by up to 15% on the model below.
LINEAR_MISS = 0.2


def _shaped(model, heads, neurons):
    """A copy of `model` with the first `heads[l]` / `neurons[l]` units of each layer `l` kept."""
    shaped = copy.deepcopy(model).eval()
    full_h, full_n = structure.attention_units(model), structure.ffn_size(model)
    prune_heads(shaped, {i: list(range(k, h)) for i, (k, h) in enumerate(zip(heads, full_h)) if k < h})
    prune_ffn_neurons(shaped, {i: list(range(k, n)) for i, (k, n) in enumerate(zip(neurons, full_n)) if k < n})
    return shaped


def _speedup_miss(predicted, ratios):
    """How far `predicted` misses the median of the paired `ratios`, and what the test allows: `LINEAR_MISS` plus
    three standard errors of that median (the rounds' spread, see `speedup_estimate`)."""
    estimate = speedup_estimate(ratios)
    return abs(predicted / estimate["speedup"] - 1), LINEAR_MISS + 3 * estimate["noise"]


def test_latency_costs_fit_their_timings_and_predict_the_speedup_of_held_out_shapes(monkeypatch):
    import hf_prune.models.costs as costs_module
    from hf_prune.models.costs import measured_unit_costs, prefill_inputs, time_interleaved
    from hf_prune.posttrain.timing import paired_speedups, timing_threads

    # Big enough that the units' matmuls, not Python's per-module overhead, dominate the time. One thread: another
    # process on the machine then delays a timing by what it takes, not a thread pool waiting on its slowest thread.
    model = _model(hidden_size=256, num_attention_heads=8, intermediate_size=1024, num_hidden_layers=2)
    seq, batch, layers = 64, 8, 2
    fitted = []

    def recorded(models, inputs, repeats, warmup=1):
        times = time_interleaved(models, inputs, repeats, warmup)
        for m, t in zip(models, times):
            fitted.append((structure.attention_units(m), structure.ffn_size(m), statistics.median(t)))
        return times

    monkeypatch.setattr(costs_module, "time_interleaved", recorded)
    with timing_threads(1):
        costs = measured_unit_costs(model, seq, batch_size=batch, repeats=5)
    monkeypatch.undo()
    assert costs.unit == "ms" and costs.heads == [8, 8] and costs.neurons == [1024, 1024]
    # the six timed copies: all units, no heads, no neurons, half of each, none, and half the layers
    assert [(h, n) for h, n, _ in fitted] == [
        ([8] * layers, [1024] * layers), ([0] * layers, [1024] * layers), ([8] * layers, [0] * layers),
        ([4] * layers, [512] * layers), ([0] * layers, [0] * layers), ([8], [1024]),
    ]  # fmt: skip
    assert len(costs.layer) == layers and all(0 <= c <= costs.base for c in costs.layer)
    # the fitted line passes near each copy's median (its residuals are a small part of the dense time) ...
    dense_ms = fitted[0][2]
    for heads, neurons, median in fitted:
        gone = list(range(len(heads), layers))
        predicted = costs.flops(heads + [0] * len(gone), neurons + [0] * len(gone), dropped=gone)
        assert abs(predicted - median) <= 0.15 * dense_ms, (heads, neurons, median)
    # ... and predicts the speedup of shapes it was not fitted on, timed interleaved with the dense model
    held_out = [([6, 6], [256, 256]), ([2, 2], [768, 768]), ([8, 3], [128, 896])]
    shapes = [_shaped(model, h, n) for h, n in held_out]
    with timing_threads(1):
        dense, *timed = time_interleaved([model, *shapes], prefill_inputs(model, batch, seq), repeats=15)
    for (heads, neurons), times in zip(held_out, timed):
        miss, allowed = _speedup_miss(costs.total / costs.flops(heads, neurons), [d / t for d, t in zip(dense, times)])
        assert miss <= allowed, (heads, neurons, miss, allowed)

    # the search spends the fitted costs' budget, and the shapes it chooses measure the speedup they predict
    pruned, summary = prune_to_speedup(
        model, RaggedDataset(128), 1.5, num_samples=128, seq_len=seq, tune=False, cost_model="latency",
        latency_batch_size=batch, calibration_rounds=0, cost_threads=1,
    )  # fmt: skip
    assert summary["cost_model"] == f"latency (ms at {batch} x {seq})"
    assert summary["timing"] == {"device": "cpu", "threads": 1}
    assert 1.5 <= summary["predicted_speedup"] <= 1.5 * 1.02
    assert summary["measured_speedup"] is None and summary["calibration"] == []
    assert summary["flops_ratio"] == pytest.approx(count_flops(model, seq) / count_flops(pruned, seq))
    with timing_threads(1):
        miss, allowed = _speedup_miss(summary["predicted_speedup"], paired_speedups(model, pruned, batch, seq, 15))
    assert miss <= allowed, (summary["heads_after"], summary["ffn_after"], miss, allowed)
    with pytest.raises(ValueError, match="cost_model='watts' is not known"):
        prune_to_speedup(model, RaggedDataset(16), 1.5, seq_len=SEQ, cost_model="watts")


def test_calibration_searches_again_until_the_measured_speedup_reaches_the_target(monkeypatch):
    import hf_prune.posttrain.search as posttrain

    model = _model()
    dense_flops = count_flops(model, SEQ)
    # A machine on which every pruned shape runs 10% slower than its FLOPs ratio, and whose fitted unit costs are the
    # FLOPs: the cost model alone lands 10% short of the target. Rounds jitter by +-1%.
    monkeypatch.setattr(posttrain, "measured_unit_costs", lambda m, seq, batch: unit_costs(m, seq))
    timed = []

    def paired(dense, pruned, batch_size, seq_len, phase="prefill"):
        true = 0.9 * dense_flops / count_flops(pruned, SEQ)
        timed.append(true)
        return [true * (1 + 0.01 * j) for j in (-1, 0, 1, 0, -1, 1, 0, 0, 1, -1)]

    monkeypatch.setattr(posttrain, "paired_speedups", paired)
    data = RaggedDataset(128)
    kwargs = dict(num_samples=128, seq_len=SEQ, tune=False, cost_model="latency", latency_batch_size=16)
    pruned, summary = prune_to_speedup(model, data, 1.5, calibration_rounds=3, **kwargs)
    rounds = summary["calibration"]
    assert 2 <= len(rounds) <= 3 and len(timed) == len(rounds) + 1  # every round, then the final re-timing
    assert rounds[0]["goal"] == 1.5 and rounds[0]["speedup"] < 1.5 and not rounds[0]["accepted"]
    layers = model.config.num_hidden_layers
    # the noise of the rounds' spread: a median absolute deviation of 1% over 10 rounds, relative to the median
    noise = 1.2533 * 1.4826 * 0.01 / 10**0.5
    assert all(r["noise"] == pytest.approx(noise) and len(r["heads"]) == len(r["ffn"]) == layers for r in rounds)
    accepted = [r for r in rounds if r["accepted"]]
    assert accepted and accepted[-1] is rounds[-1]
    # the reported speedup is the final re-timing of the returned shapes, not the timing that chose them
    assert summary["measured_speedup"] == pytest.approx(timed[-1]) and summary["measured_noise"] == pytest.approx(
        noise
    )
    assert 0.9 * dense_flops / count_flops(pruned, SEQ) == pytest.approx(summary["measured_speedup"])
    assert 1.5 <= summary["measured_speedup"] <= 1.5 * 1.03 + 0.1
    assert summary["timing"] == {"device": "cpu", "threads": os.cpu_count()}
    # the FLOPs cost model is exact by construction and is not timed; 0 rounds trusts the cost model
    timed.clear()
    assert prune_to_speedup(model, data, 1.5, **{**kwargs, "cost_model": "flops"})[1]["calibration"] == []
    assert prune_to_speedup(model, data, 1.5, calibration_rounds=0, **kwargs)[1]["measured_speedup"] is None
    assert timed == []
    with pytest.raises(ValueError, match="calibration_rounds=-1 must be >= 0"):
        prune_to_speedup(model, data, 1.5, calibration_rounds=-1, **kwargs)


def test_calibration_does_not_follow_timings_far_from_the_cost_model(monkeypatch, caplog):
    import hf_prune.posttrain.search as posttrain

    model = _model()
    dense_flops = count_flops(model, SEQ)
    monkeypatch.setattr(posttrain, "measured_unit_costs", lambda m, seq, batch: unit_costs(m, seq))
    # a busy machine: every pruned shape measures half its speedup
    monkeypatch.setattr(
        posttrain, "paired_speedups", lambda d, p, b, s, phase: [0.5 * dense_flops / count_flops(p, SEQ)] * 10
    )
    kwargs = dict(num_samples=128, seq_len=SEQ, tune=False, cost_model="latency", latency_batch_size=16)
    pruned, summary = prune_to_speedup(model, RaggedDataset(128), 1.5, calibration_rounds=3, **kwargs)
    assert len(summary["calibration"]) == 1 and "Calibration stops" in caplog.text
    assert 1.5 <= dense_flops / count_flops(pruned, SEQ) <= 1.53  # the cost model's shapes, not twice as small


def test_targets_that_leave_no_attention_or_no_mlp_are_refused_unless_asked_for():
    model = _model()
    with pytest.raises(ValueError, match=r"largest target that keeps some of each is [0-9.]+x") as err:
        prune_to_speedup(model, RaggedDataset(16), 300.0, seq_len=SEQ)  # reachable (~396x) with nothing left
    assert "allow_empty_kinds=True" in str(err.value)
    largest = float(str(err.value).split("keeps some of each is ")[1].split("x")[0])
    _, summary = prune_to_speedup(model, RaggedDataset(64), 0.98 * largest, num_samples=64, seq_len=SEQ, tune=False)
    assert sum(summary["heads_after"]) >= 1 and sum(summary["ffn_after"]) >= 1
    pruned, _ = prune_to_speedup(model, RaggedDataset(64), 1.05 * largest, num_samples=64, seq_len=SEQ, tune=False,
                                 allow_empty_kinds=True)  # fmt: skip
    assert sum(structure.attention_units(pruned)) == 0 or sum(structure.ffn_size(pruned)) == 0


def test_measured_speedup_is_the_first_models_time_over_the_seconds():
    from hf_prune.posttrain.timing import measured_speedup, timing_threads

    # a model whose matmuls dominate its time, and a copy with a quarter of its heads and an eighth of its neurons
    # (about 4x faster on a CPU)
    model = _model(hidden_size=256, num_attention_heads=8, intermediate_size=1024, num_hidden_layers=2)
    pruned = _shaped(model, [2, 2], [128, 128])
    with timing_threads(1):
        assert measured_speedup(model, pruned, 8, 64, repeats=5) > 2
        assert measured_speedup(pruned, model, 8, 64, repeats=5) < 0.5
