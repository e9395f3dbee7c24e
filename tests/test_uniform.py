"""Uniform shapes from the training-time pruners: the same key/value groups and MLP width in every layer, so a
decoder's export is its family's own config."""

import json

import pytest
import torch
from test_llama import KV, WIDTH, CausalBlocks, tiny_decoder
from transformers import AutoModelForCausalLM
from utils import train_args

from hf_prune import PruningArguments, PruningTrainer, save_pruned
from hf_prune.models import structure
from hf_prune.models.costs import unit_costs
from hf_prune.pruning.allocation import allocate_uniform_units


def test_uniform_allocation_keeps_removed_units_removed():
    costs = unit_costs(tiny_decoder("llama"), 12)
    layers = len(costs.heads)
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(KV, generator=g) for _ in range(layers)]
    neurons = [torch.rand(WIDTH, generator=g) for _ in range(layers)]
    alive_n = [torch.ones(WIDTH, dtype=torch.bool) for _ in range(layers)]
    alive_n[0][:5] = False  # removed earlier: these stay removed, and layer 0 has the fewest alive
    keep_h, keep_n = allocate_uniform_units(heads, neurons, costs, costs.total, neuron_alive=alive_n)
    assert {int(k.sum()) for k in keep_n} == {WIDTH - 5} and not bool(keep_n[0][:5].any())
    assert {int(k.sum()) for k in keep_h} == {KV}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_joint_pruning_with_uniform_shapes_exports_the_family_s_own_config(family, tmp_path):
    model = tiny_decoder(family)
    args = train_args(tmp_path / "run", per_device_train_batch_size=8, max_steps=12, pruning_method="taylor",
                      pruning_target="heads_and_ffn", target_speedup=1.4, taylor_iterations=3,
                      taylor_interval_steps=3, uniform_shapes=True, learning_rate=1e-3,
                      speedup_seq_len=12)  # fmt: skip
    trainer = PruningTrainer(model=model, args=args, train_dataset=CausalBlocks(64))
    trainer.train()
    trainer.prune()
    kv, widths = structure.attention_units(trainer.model), structure.ffn_size(trainer.model)
    assert len(set(kv)) == 1 and len(set(widths)) == 1 and (kv[0], widths[0]) != (KV, WIDTH)
    folder = save_pruned(trainer.model, tmp_path / "export", card=False, figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == widths[0]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = CausalBlocks(2)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_ffn_pruning_with_uniform_shapes(tmp_path):
    args = train_args(tmp_path, per_device_train_batch_size=8, max_steps=6, pruning_method="taylor",
                      pruning_target="ffn", target_sparsity=0.25, taylor_iterations=2, taylor_interval_steps=3,
                      uniform_shapes=True)  # fmt: skip
    trainer = PruningTrainer(model=tiny_decoder("llama"), args=args, train_dataset=CausalBlocks(48))
    trainer.train()
    trainer.prune()
    assert set(structure.ffn_size(trainer.model)) == {WIDTH - round(0.25 * WIDTH)}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pruning_target="ffn", ffn_sparsity_rule="global"), "ffn_sparsity_rule='global'"),
        (dict(pruning_target="ffn", sparsity_mode="global"), "sparsity_mode='global'"),
        (dict(pruning_method="movement", pruning_target="attention"), "attention_granularity='head'"),
        (dict(pruning_target="ffn", pruning_targets=[{"preset": "ffn", "layers": [0]}]), "pruning_targets"),
    ],
)
def test_uniform_shapes_refuses_options_that_size_layers_apart(overrides, match):
    kwargs = {"output_dir": "x", "pruning_method": "taylor", "uniform_shapes": True, "report_to": [], **overrides}
    with pytest.raises(ValueError, match=match):
        PruningArguments(**kwargs)
