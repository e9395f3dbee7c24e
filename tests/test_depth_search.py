"""Depth in the retraining-free search: the per-layer fixed costs of every cost model, the allocation that may drop
whole layers, and `prune_to_speedup(drop_layers=True)` on decoders whose empty layers are pass-throughs."""

import copy

import pytest
import torch
from test_llama import LAYERS, CausalBlocks, logits, non_embedding_parameters, tiny_decoder

from hf_prune import load_pruned, prune_ffn_neurons, prune_heads, prune_layers, prune_to_speedup, save_pruned
from hf_prune.models import structure
from hf_prune.models.costs import count_flops, measured_unit_costs, parameter_unit_costs, unit_costs
from hf_prune.pruning.allocation import allocate_units, allocate_with_depth


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_a_decoder_layer_emptied_of_units_is_a_pass_through(family):
    model = tiny_decoder(family).eval()
    assert structure.get_layers(model) and len(structure.get_layers(model)) == LAYERS
    emptied = copy.deepcopy(model)
    prune_heads(emptied, {1: list(range(structure.attention_units(model)[1]))})
    prune_ffn_neurons(emptied, {1: list(range(structure.ffn_size(model)[1]))})
    dropped = prune_layers(copy.deepcopy(model), [1])
    torch.testing.assert_close(logits(emptied), logits(dropped), rtol=0, atol=0)
    from hf_prune.models.auto import get_adapter

    assert get_adapter(model).empty_layer_is_identity(model)
    assert not get_adapter(model).empty_layer_is_identity(tiny_decoder("llama"))  # attention_bias: o_proj has a bias


def test_cost_models_say_what_removing_a_layer_saves():
    model = tiny_decoder("mistral").eval()
    flops, params = unit_costs(model, 12), parameter_unit_costs(model)
    assert len(flops.layer) == len(params.layer) == LAYERS and min(params.layer) > 0
    shallow = prune_layers(copy.deepcopy(model), [0, 2])
    assert flops.flops(dropped=[0, 2]) == count_flops(shallow, 12)
    assert params.flops(dropped=[0, 2]) == non_embedding_parameters(shallow)
    rest = params.without_layers([0, 2])
    assert rest.total == non_embedding_parameters(shallow) and rest.heads == [params.heads[1]]
    timed = measured_unit_costs(model, seq_len=12, batch_size=2, repeats=2)
    assert len(timed.layer) == LAYERS and all(0 <= c <= timed.base for c in timed.layer)


def _four_layers(seed: int):
    """Random unit scores and the parameter costs of a 4-layer decoder (4 heads, 8 neurons a layer)."""
    layers, heads, neurons = 4, 4, 8
    g = torch.Generator().manual_seed(seed)
    head_scores = [torch.rand(heads, generator=g) + 1 for _ in range(layers)]
    neuron_scores = [torch.rand(neurons, generator=g) + 1 for _ in range(layers)]
    model = tiny_decoder("mistral", num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=neurons)  # fmt: skip
    return head_scores, neuron_scores, parameter_unit_costs(model)


def test_allocation_drops_a_layer_only_when_it_loses_less():
    head_scores, neuron_scores, costs = _four_layers(seed=0)
    layers = len(head_scores)

    def allocate(h, n, c, budget):
        return allocate_units(h, n, c, budget)

    # a layer whose removal costs (almost) nothing goes, and frees its fixed cost for the others
    cheap = torch.full((layers,), 1e6)
    cheap[2] = 0.01
    tried = []
    hk, nk, dropped = allocate_with_depth(head_scores, neuron_scores, costs, 1.6, cheap, allocate, candidates=tried)
    assert dropped == [2] and not hk[2].any() and not nk[2].any()
    # every depth weighed is recorded with its estimate: none dropped, then [2], then [2] and the next cheapest...
    assert [c["dropped"] for c in tried][:2] == [[], [2]] and len(tried) == layers
    weighed = [c for c in tried if "skipped" not in c]
    assert min(weighed, key=lambda c: c["loss"])["dropped"] == [2]
    assert tried[1]["structure_loss"] == pytest.approx(0.01) and tried[0]["structure_loss"] == 0.0
    assert tried[1]["heads"] == sum(int(k.sum()) for k in hk) and tried[1]["predicted_speedup"] >= 1.6 - 1e-9
    kept_cost = costs.flops([int(k.sum()) for k in hk], [int(k.sum()) for k in nk], dropped=dropped)
    assert costs.total / kept_cost >= 1.6 - 1e-9
    # layers that cost more to remove than their units: the search without depth
    hk, nk, dropped = allocate_with_depth(head_scores, neuron_scores, costs, 1.6, torch.full((layers,), 1e6), allocate)
    plain = allocate_units(head_scores, neuron_scores, costs, costs.total / 1.6 - costs.base)
    assert dropped == [] and all(torch.equal(a, b) for a, b in zip(hk + nk, plain[0] + plain[1]))


def test_a_fixed_depth_drops_that_many_layers_even_where_the_estimate_prefers_none():
    head_scores, neuron_scores, costs = _four_layers(seed=1)
    layer_loss = torch.tensor([500.0, 300.0, 400.0, 200.0])  # dearer than any units: a free search keeps every layer
    free = allocate_with_depth(head_scores, neuron_scores, costs, 1.6, layer_loss, allocate_units)
    assert free[2] == []
    tried = []
    hk, nk, dropped = allocate_with_depth(head_scores, neuron_scores, costs, 1.6, layer_loss, allocate_units,
                                          candidates=tried, layer_counts=[2])  # fmt: skip
    assert dropped == [1, 3] and [c["dropped"] for c in tried] == [[1, 3]]  # the two of least loss, nothing else
    assert not any(hk[i].any() or nk[i].any() for i in dropped) and all(hk[i].any() for i in (0, 2))
    assert tried[0]["structure_loss"] == pytest.approx(500.0)
    spent = costs.flops([int(k.sum()) for k in hk], [int(k.sum()) for k in nk], dropped=dropped)
    assert costs.total / spent >= 1.6 - 1e-9
    # several depths: the one of least estimated loss among them
    hk, nk, dropped = allocate_with_depth(head_scores, neuron_scores, costs, 1.6, layer_loss, allocate_units,
                                          layer_counts=[4, 3])  # fmt: skip
    assert dropped in ([], [3])


def test_prune_to_speedup_drops_a_layer_the_fisher_says_is_cheap(monkeypatch, tmp_path):
    import hf_prune.posttrain.search as search

    model = tiny_decoder("mistral").eval()
    real = search.layer_fisher

    def layer_fisher(head_grads, neuron_grads):
        loss = real(head_grads, neuron_grads)
        loss[1] = 0.0  # removing layer 1 is free: the search must take it
        return loss

    monkeypatch.setattr(search, "layer_fisher", layer_fisher)
    pruned, summary = prune_to_speedup(model, CausalBlocks(64), 1.5, num_samples=64, seq_len=12, tune_samples=64,
                                       cost_model="params", drop_layers=True)  # fmt: skip
    assert summary["dropped_layers"] == [1]
    assert len(structure.get_layers(pruned)) == LAYERS - 1 and pruned.config.hf_prune_kept_layers == [0, 2]
    kept = parameter_unit_costs(pruned).total / parameter_unit_costs(model).total
    assert 1 / (1.5 * 1.02) <= kept <= 1 / 1.5 + 1e-9
    save_pruned(pruned, tmp_path / "out")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out")), logits(pruned))


def test_layer_counts_fix_the_depth_of_an_encoder(tmp_path):
    from utils import TinyDataset, batch, tiny_model

    model = tiny_model("bert", num_hidden_layers=3).eval()
    pruned, summary = prune_to_speedup(model, TinyDataset(64), 1.8, num_samples=64, seq_len=12, tune_samples=64,
                                       batch_size=16, drop_layers=True, layer_counts=[1])  # fmt: skip
    assert len(summary["dropped_layers"]) == 2 and len(structure.get_layers(pruned)) == 1
    assert [c["dropped"] for c in summary["structure_search"][0]["candidates"]] == [summary["dropped_layers"]]
    save_pruned(pruned, tmp_path / "out")
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).logits, pruned(**inputs).logits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_counts": [2]}, "pass drop_layers=True too"),
        ({"drop_layers": True, "layer_counts": [0]}, r"from 1 to the model's 3, e.g. \[1\]"),
        ({"drop_layers": True, "layer_counts": [4]}, "from 1 to the model's 3"),
        ({"drop_layers": True, "layer_counts": []}, "give one or more integer numbers of layers"),
    ],
)
def test_layer_counts_that_cannot_be_kept_are_refused(kwargs, message):
    from utils import TinyDataset, tiny_model

    with pytest.raises(ValueError, match=message):
        prune_to_speedup(tiny_model("bert", num_hidden_layers=3), TinyDataset(16), 1.5, num_samples=16, **kwargs)


def test_drop_layers_needs_the_fisher():
    with pytest.raises(ValueError, match="importance='fisher' or 'hybrid'"):
        prune_to_speedup(tiny_decoder("mistral"), CausalBlocks(16), 1.5, num_samples=16, seq_len=12, drop_layers=True,
                         importance="activation")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_a_gated_off_encoder_layer_equals_the_layer_removed(arch):
    from utils import batch, tiny_model

    from hf_prune.posttrain.fisher import layer_gates

    model = tiny_model(arch, num_hidden_layers=3).eval()
    inputs = batch(pad=2)
    gates = torch.ones(4, 3)
    gates[:, 1] = 0.0
    with torch.no_grad(), layer_gates(model, gates):
        gated = model(**inputs).logits
    dropped = prune_layers(copy.deepcopy(model), [1])
    with torch.no_grad():
        torch.testing.assert_close(dropped(**inputs).logits, gated)
    assert dropped.config.num_hidden_layers == 2 and dropped.config.hf_prune_kept_layers == [0, 2]


def test_prune_to_speedup_drops_an_encoder_layer_its_gate_says_is_cheap(monkeypatch, tmp_path):
    import json
    import subprocess
    import sys

    from utils import WITHOUT_HF_PRUNE, TinyDataset, batch, tiny_model

    import hf_prune.posttrain.search as search

    model = tiny_model("bert", num_hidden_layers=3).eval()
    real = search.mask_fisher

    def mask_fisher(grads):  # the layer gates' Fisher (one (examples, layers) tensor): layer 1 is free to remove
        scores = real(grads)
        if len(grads) == 1 and grads[0].shape[1] == 3:
            scores[0][1] = 0.0
        return scores

    monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    pruned, summary = prune_to_speedup(model, TinyDataset(64), 1.8, num_samples=64, seq_len=12, tune_samples=64,
                                       batch_size=16, drop_layers=True)  # fmt: skip
    assert summary["dropped_layers"] == [1] and len(structure.get_layers(pruned)) == 2
    assert {"layer": 1, "dropped": True} in summary["tuning"]
    assert count_flops(model, 12) / count_flops(pruned, 12) >= 1.8
    save_pruned(pruned, tmp_path / "out")
    inputs = batch()
    with torch.no_grad():
        expected = pruned(**inputs).logits
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).logits, expected)
    script = WITHOUT_HF_PRUNE + f"""
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor({inputs["input_ids"].tolist()}),
                attention_mask=torch.tensor({inputs["attention_mask"].tolist()})).logits
print(json.dumps(out.tolist()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), expected)


def test_hidden_dimensions_then_a_dropped_layer_reload(tmp_path):
    from utils import batch, tiny_model

    from hf_prune import prune_hidden_dims

    model = tiny_model("bert", num_hidden_layers=3).eval()
    prune_hidden_dims(model, [0, 5, 7])
    prune_layers(model, [0])
    assert all(".layer.2." not in name for names in model.config.hf_prune_hidden.values() if isinstance(names, list)
               for name in names)  # fmt: skip
    save_pruned(model, tmp_path / "out")
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).logits, model(**inputs).logits)


def test_tuning_a_decoder_that_keeps_every_unit_leaves_it_as_it_was():
    from hf_prune.posttrain.mask_tuning import tune_masks
    from hf_prune.posttrain.samples import pad_collate

    dense = tiny_decoder("mistral").eval()
    rows = [CausalBlocks(8, length=12)[i] for i in range(8)]
    for r in rows[::2]:  # padded batches: half the rows are shorter
        r["attention_mask"] = r["attention_mask"].clone()
        r["attention_mask"][-3:] = 0
    batches = [pad_collate(0)(rows[i : i + 4]) for i in (0, 4)] * 3
    student = copy.deepcopy(dense)
    keep_heads = [torch.ones(n, dtype=torch.bool) for n in structure.attention_units(dense)]
    keep_neurons = [torch.ones(n, dtype=torch.bool) for n in structure.ffn_size(dense)]
    tune_masks(student, dense, batches, keep_heads, keep_neurons, False)
    torch.testing.assert_close(logits(student), logits(dense), atol=1e-4, rtol=1e-4)
