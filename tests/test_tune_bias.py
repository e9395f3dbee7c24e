"""Bias compensation in the least-squares tuning (`tune_bias`): the constant per output dimension fitted with the
scales, folded into the output projections' biases, added through the family's config flags where there are none."""

import json

import torch
from test_llama import CausalBlocks, tiny_decoder
from transformers import AutoModelForCausalLM
from utils import TinyDataset, tiny_model

from hf_prune import prune_to_speedup, save_pruned
from hf_prune.models.auto import get_adapter
from hf_prune.posttrain.mask_tuning import _Stats


def _stats_of(parts: torch.Tensor, r: torch.Tensor, held_out: list[bool]) -> _Stats:
    """Statistics of `r ~ sum_u s_u parts[u] + c` over batches (`parts`: (batches, k, tokens, dims))."""
    stats = _Stats(parts.shape[1], "cpu")
    for b, (p, rb) in enumerate(zip(parts, r)):
        flat = p.flatten(1).double()
        rb = rb.double()
        stats.add(held_out[b], flat @ flat.t(), flat @ rb.flatten(), rb.pow(2).sum(), p.sum(dim=1), rb.sum(dim=0),
                  rb.shape[0])  # fmt: skip
    return stats


def test_the_joint_fit_recovers_scales_and_constant():
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(5, 3, 40, 6, generator=g, dtype=torch.float64) + 0.5  # units with a non-zero mean
    scales = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    const = torch.randn(6, generator=g, dtype=torch.float64)
    r = torch.einsum("bktd,k->btd", parts, scales) + const
    s, c, before, after = _stats_of(parts, r, [False] * 4 + [True]).solve(intercept=True)
    torch.testing.assert_close(s, scales)
    torch.testing.assert_close(c, const)
    assert after < 1e-12 < before
    # without the intercept the scales alone cannot absorb the constant: the held-out error stays above zero
    s_plain, c_plain, _, after_plain = _stats_of(parts, r, [False] * 4 + [True]).solve(intercept=False)
    assert c_plain is None and after_plain > 1e-3


def test_a_constant_alone_stands_in_for_a_block_with_no_unit_left():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 30, 5, generator=g, dtype=torch.float64) * 0.1 + 3.0
    s, c, before, after = _stats_of(torch.zeros(4, 0, 30, 5, dtype=torch.float64), r, [False, True] * 2).solve(True)
    assert s.numel() == 0 and after < before
    torch.testing.assert_close(c, r[[0, 2]].mean(dim=(0, 1)))


def test_a_constant_that_does_not_help_on_held_out_batches_is_refused():
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(2, 2, 20, 4, generator=g, dtype=torch.float64)
    r = parts.sum(dim=1)
    r[0] += 5.0  # the fitted batch has an offset the held-out one has not
    s, c, _, _ = _stats_of(parts, r, [False, True]).solve(intercept=True)
    assert c is None


def test_llama_gets_biases_through_its_config_and_reloads_as_its_own_class(tmp_path):
    model = tiny_decoder("llama", attention_bias=False)
    assert not model.config.attention_bias and not model.config.mlp_bias
    data = CausalBlocks(64)
    options = dict(num_samples=64, seq_len=12, tune_samples=64, batch_size=8, cost_model="params", uniform=True)
    plain, plain_summary = prune_to_speedup(model, data, 1.4, **options)
    pruned, summary = prune_to_speedup(model, data, 1.4, tune_bias=True, **options)
    assert not model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias is None  # the input is unchanged
    assert summary["tune_bias"] and summary["biased_outputs"] == ["attention", "mlp"]
    assert pruned.config.attention_bias and pruned.config.mlp_bias
    assert any(e.get("neurons", {}).get("bias") or e.get("heads", {}).get("bias") for e in summary["tuning"])
    # same shapes, and where the first layer's fit is compared on the same inputs, never a worse held-out error
    assert summary["pruned_neurons"] == plain_summary["pruned_neurons"]
    for kind in ("heads", "neurons"):
        assert summary["tuning"][0][kind]["held_out_error"][1] <= plain_summary["tuning"][0][kind]["held_out_error"][1]
    folder = save_pruned(pruned, tmp_path / "export", card=False, figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["mlp_bias"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = data[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned.eval()(input_ids=ids).logits)
    assert plain.model.layers[0].mlp.down_proj.bias is None  # without the option nothing is added


def test_families_without_a_flag_are_tuned_without_a_bias():
    model = tiny_decoder("qwen2")
    assert get_adapter(model).add_output_bias(model) == []
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_an_encoder_folds_the_constant_into_its_existing_biases():
    model = tiny_model("bert")
    before = {n: p.clone() for n, p in model.named_parameters()}
    pruned, summary = prune_to_speedup(model, TinyDataset(64), 1.5, num_samples=64, tune_samples=64, batch_size=8,
                                       seq_len=12, tune_bias=True)  # fmt: skip
    assert summary["biased_outputs"] == ["attention", "mlp"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(dict(pruned.named_parameters())) == set(before)  # no parameter added
