"""Decoder cost models (prefill FLOPs with the last token's logits, decode time per token) and the importances the
decoder benchmark compares (activation contributions, weight magnitude), on tiny Llama models built in code."""

import pytest
import torch
from test_llama import KV, LAYERS, WIDTH, CausalBlocks, tiny_decoder
from utils import VOCAB

from hf_prune import prune_to_speedup
from hf_prune.models.costs import count_flops, measured_unit_costs, prefill_inputs, time_decode, unit_costs
from hf_prune.posttrain.importance import activation_importance, magnitude_importance
from hf_prune.posttrain.samples import pad_collate


def test_prefill_counts_the_output_projection_for_the_last_token_only():
    model = tiny_decoder("llama")
    inputs = prefill_inputs(model, 2, 10)
    assert inputs["logits_to_keep"] == 1 and inputs["input_ids"].shape == (2, 10)
    assert model(**inputs).logits.shape == (2, 1, VOCAB)
    hidden = model.config.hidden_size
    full = {k: v for k, v in inputs.items() if k != "logits_to_keep"}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.set_attn_implementation("eager")
        model(**{k: v[:1] for k, v in full.items()})
    # a full forward pass computes the vocabulary logits of every position; prefill those of the last only
    assert counter.get_total_flops() - count_flops(model, 10) == 2 * 9 * hidden * VOCAB
    assert unit_costs(model, 10).total == count_flops(model, 10)


class SleepingDecoder(torch.nn.Module):
    """A stand-in causal LM whose `generate` takes `prefill_s + k * step_s` for k new tokens."""

    def __init__(self, prefill_s: float, step_s: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = tiny_decoder("llama").config
        self.prefill_s, self.step_s, self.calls = prefill_s, step_s, []

    def generate(self, input_ids, attention_mask, generation_config):
        import time

        k = generation_config.max_new_tokens
        assert generation_config.min_new_tokens == k and not generation_config.do_sample  # no early stop
        self.calls.append((input_ids.shape, k))
        time.sleep(self.prefill_s + k * self.step_s)


def test_decode_time_is_the_time_per_new_token_without_the_prefill():
    fast, slow = SleepingDecoder(0.02, 0.002), SleepingDecoder(0.05, 0.006)
    times = time_decode([fast, slow], prompt_len=8, new_tokens=5, repeats=3, warmup=1)
    assert [len(t) for t in times] == [3, 3]
    # (t(5) - t(1)) / 4 is the step time whatever the prefill costs (sleeps are a little off either way)
    assert all(1.8 <= t < 3.5 for t in times[0]) and all(5.8 <= t < 7.5 for t in times[1])  # ms
    assert fast.calls[-2:] == [((1, 8), 1), ((1, 8), 5)]  # batch 1, the prompt length, then 1 and 5 new tokens
    with pytest.raises(ValueError, match="new_tokens=1 must be >= 2"):
        time_decode([fast], new_tokens=1)


def test_decode_cost_model_and_its_calibration_on_a_real_decoder():
    model = tiny_decoder("llama")
    costs = measured_unit_costs(model, 8, 1, repeats=2, phase="decode")
    assert costs.unit == "ms" and costs.heads == [KV] * LAYERS and costs.neurons == [WIDTH] * LAYERS
    with pytest.raises(ValueError, match="phase='train' is not known"):
        measured_unit_costs(model, 8, 1, phase="train")
    _, summary = prune_to_speedup(model, CausalBlocks(32), 1.2, num_samples=32, seq_len=8, tune=False,
                                  cost_model="decode", calibration_rounds=1)  # fmt: skip
    assert summary["cost_model"] == "decode (ms per token at batch 1 after 8 tokens)"
    (round_,) = summary["calibration"]
    assert round_["goal"] == 1.2 and round_["rounds"] >= 10 and len(round_["heads"]) == LAYERS


def test_decode_cost_model_needs_a_causal_lm():
    from test_posttrain import _model

    with pytest.raises(ValueError, match="needs a causal LM"):
        measured_unit_costs(_model(), 8, 1, phase="decode")


def test_activation_importance_is_each_unit_s_contribution_to_the_residual_stream():
    model = tiny_decoder("llama")
    data = CausalBlocks(4)
    batch = pad_collate(0)([data[i] for i in range(4)])
    heads, neurons = activation_importance(model, [batch], power=1)
    squared = activation_importance(model, [batch])  # the default: mean squared norms
    layer = model.model.layers[1]
    seen = {}
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0].detach())),
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0].detach())),
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    tokens = seen["mlp"].reshape(-1, WIDTH)
    by_hand = torch.stack([(tokens[:, [n]] @ layer.mlp.down_proj.weight[:, [n]].T).norm(dim=-1).mean()
                           for n in range(WIDTH)])  # fmt: skip
    torch.testing.assert_close(neurons[1].float(), by_hand, rtol=1e-4, atol=1e-6)
    by_hand_sq = torch.stack([(tokens[:, [n]] @ layer.mlp.down_proj.weight[:, [n]].T).norm(dim=-1).square().mean()
                              for n in range(WIDTH)])  # fmt: skip
    torch.testing.assert_close(squared[1][1].float(), by_hand_sq, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="power=3 must be 1"):
        activation_importance(model, [batch], power=3)
    width = layer.self_attn.o_proj.in_features // KV  # a key/value group's query heads
    ctx = seen["attn"].reshape(-1, KV, width)
    weight = layer.self_attn.o_proj.weight.reshape(-1, KV, width)
    by_hand = torch.stack([(ctx[:, g] @ weight[:, g].T).norm(dim=-1).mean() for g in range(KV)])
    torch.testing.assert_close(heads[1].float(), by_hand, rtol=1e-4, atol=1e-6)


def test_magnitude_importance_is_the_norm_of_every_weight_a_unit_owns():
    model = tiny_decoder("llama")
    heads, neurons = magnitude_importance(model)
    mlp = model.model.layers[0].mlp
    n = 5
    with torch.no_grad():
        by_hand = (mlp.gate_proj.weight[n].square().sum() + mlp.up_proj.weight[n].square().sum()
                   + mlp.down_proj.weight[:, n].square().sum()).sqrt()  # fmt: skip
    assert float(neurons[0][n]) == pytest.approx(float(by_hand), rel=1e-5)
    assert [h.shape[0] for h in heads] == [KV] * LAYERS


def test_report_of_a_depth_and_width_pruned_decoder():
    import copy

    from hf_prune import prune_ffn_neurons, prune_layers
    from hf_prune.export.report import build_report
    from hf_prune.export.report_format import format_report

    dense = tiny_decoder("llama")
    pruned = prune_layers(copy.deepcopy(dense), [1])
    prune_ffn_neurons(pruned, {1: list(range(10))})  # the dense model's layer 2
    report = build_report(dense, pruned, seq_len=8, batch_sizes=(1,), repeats=2, warmup=1)
    layers = report["layers"]
    assert [r["layer"] for r in layers] == list(range(LAYERS)) and [r["removed"] for r in layers].count(True) == 1
    assert layers[1]["removed"] and layers[1]["heads_kept"] == 0 and layers[1]["ffn_kept"] == 0
    assert layers[2]["ffn_kept"] == WIDTH - 10 and layers[0]["ffn_kept"] == WIDTH
    assert report["ffn"] == {"dense": LAYERS * WIDTH, "kept": (LAYERS - 1) * WIDTH - 10}
    assert report["latency"]["forward"] == "prefill (logits of the last token)"
    decode = report["decode"]
    assert decode["batch_size"] == 1 and decode["prompt_len"] == 8
    assert decode["speedup"] == pytest.approx(decode["pruned_tokens_per_s"] / decode["dense_tokens_per_s"])
    text = format_report(report)
    assert "layer removed" in text and "decode tokens/s" in text


def test_a_cut_that_would_break_the_grouped_query_layout_is_refused_with_the_unit_named():
    from hf_prune import prune_heads

    model = tiny_decoder("llama")  # 4 key/value groups of 2 query heads: query head 7 is no unit of its own
    with pytest.raises(ValueError, match=r"key/value groups index \[7\] out of range .* one query head alone cannot"):
        prune_heads(model, {0: [7]})


def test_pruning_in_rounds_reaches_the_target_and_measures_importance_each_round(monkeypatch):
    import hf_prune.posttrain.rounds as rounds_module
    from hf_prune import prune_in_rounds
    from hf_prune.models.costs import parameter_unit_costs

    model = tiny_decoder("llama")
    calls = []
    search = rounds_module.prune_to_speedup

    def counted(current, *args, **kwargs):
        calls.append(parameter_unit_costs(current).total)
        return search(current, *args, **kwargs)

    monkeypatch.setattr(rounds_module, "prune_to_speedup", counted)
    dense = parameter_unit_costs(model).total
    pruned, summary = prune_in_rounds(model, CausalBlocks(64), 1.4, 3, cost_model="params", num_samples=64,
                                      seq_len=12, tune_samples=64)  # fmt: skip
    kept = parameter_unit_costs(pruned).total
    assert 1.4 <= dense / kept <= 1.4 * 1.02 and summary["predicted_speedup"] == pytest.approx(dense / kept)
    # every round starts from the model the round before left, smaller each time
    assert len(calls) == len(summary["rounds"]) == 3 and calls[0] == dense and calls[0] > calls[1] > calls[2]
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3] and summary["rounds"][-1]["reached"] >= 1.4
    assert summary["heads_before"] == [KV] * LAYERS and "in 3 rounds" in summary["method"]
    with pytest.raises(ValueError, match="rounds need a counted cost model"):
        prune_in_rounds(model, CausalBlocks(8), 1.4, 2, cost_model="latency")
    with pytest.raises(ValueError, match="rounds=0 must be a positive integer"):
        prune_in_rounds(model, CausalBlocks(8), 1.4, 0)
