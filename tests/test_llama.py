"""Llama-family decoders (llama, mistral, qwen2, qwen3) on tiny configs built in code: key/value groups and gated MLP
neurons removed physically give the logits and the greedy generation (with the KV cache) of the masked model, for any
subset, a layer without attention or without MLP included; exports reload with and without hf_prune."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from utils import VOCAB, WITHOUT_HF_PRUNE, mask_removed_units

from hf_prune import load_pruned, prune_ffn_neurons, prune_heads, prune_layers, prune_to_speedup, save_pruned
from hf_prune.models import structure
from hf_prune.models.costs import count_flops, unit_costs

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
LAYERS, HEADS, KV, WIDTH = 3, 8, 4, 40


def tiny_decoder(model_type: str, seed: int = 0, **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV, intermediate_size=WIDTH, max_position_embeddings=64, head_dim=8,
        tie_word_embeddings=model_type in ("qwen2", "qwen3"), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if model_type == "qwen2":
        kwargs["head_dim"] = 4  # hidden / heads, which qwen2 always uses
    if model_type == "qwen3":
        kwargs["head_dim"] = 16  # wider than hidden / heads, as Qwen3 allows
    if model_type == "llama":
        kwargs["attention_bias"] = True
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    with torch.no_grad():  # weights larger than the default init, so a wrong cut shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(n=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as generation pads
    return ids, mask


def logits(model):
    ids, mask = tokens()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def generate(model, steps=6):
    ids, mask = tokens()
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=True)


def logits_without_hf_prune(folder, trust_remote_code: bool = False):
    """The logits of `tokens()` from the export loaded by `AutoModelForCausalLM` in a fresh interpreter where
    `import hf_prune` fails, and the module of the class that loaded it."""
    ids, mask = tokens()
    script = (
        WITHOUT_HF_PRUNE
        + f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code={trust_remote_code}).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor({ids.tolist()}), attention_mask=torch.tensor({mask.tolist()})).logits
print(json.dumps([type(model).__module__, out.tolist()]))
"""
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    module, out = json.loads(run.stdout.strip().splitlines()[-1])
    return torch.tensor(out), module


CASES = [
    ({0: [1], 2: [0, 3]}, {0: [0, 5, 39], 2: [7]}),
    ({1: [0, 1, 2, 3]}, {0: list(range(WIDTH)), 1: [3]}),  # layer 1 keeps no attention, layer 0 no MLP
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("groups, neurons", CASES)
def test_removing_groups_and_neurons_equals_masking_them(family, groups, neurons):
    model, reference = tiny_decoder(family), mask_removed_units(tiny_decoder(family), groups, neurons)
    prune_heads(model, groups)
    prune_ffn_neurons(model, neurons)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(model), generate(reference))
    group = HEADS // KV
    assert structure.attention_units(model) == [KV - len(groups.get(i, [])) for i in range(LAYERS)]
    assert structure.num_heads(model) == [group * n for n in structure.attention_units(model)]
    assert model.config.layer_num_key_value_heads == structure.attention_units(model)
    assert model.config.layer_intermediate_sizes == [WIDTH - len(neurons.get(i, [])) for i in range(LAYERS)]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_decoder_saves_and_reloads_with_and_without_hf_prune(family, tmp_path):
    groups, neurons = CASES[1]
    model = tiny_decoder(family)
    prune_heads(model, groups)
    prune_ffn_neurons(model, neurons)
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [f"{type(model).__name__}"]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_hf_prune.Pruned{type(model).__name__}"
    loaded = load_pruned(folder).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
    assert torch.equal(generate(loaded), generate(model))
    got, module = logits_without_hf_prune(folder, trust_remote_code=True)
    assert module.startswith("transformers_modules."), module  # the export's own modeling file
    torch.testing.assert_close(got, logits(model))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cost_model_of_a_decoder_is_exact_after_pruning(family):
    model = tiny_decoder(family)
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16)
    prune_heads(model, {0: [0, 2], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {2: list(range(15))})
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == pytest.approx(
        count_flops(model, 16), rel=1e-9
    )


class CausalBlocks(torch.utils.data.Dataset):
    """Token blocks labelled with themselves, as a causal-LM loss takes them."""

    def __init__(self, n=64, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(3, VOCAB, (n, 1), generator=g)
        self.ids = (base + torch.arange(length)) % (VOCAB - 3) + 3  # a learnable progression, not noise

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_prune_to_speedup_prunes_a_decoder_without_training():
    model = tiny_decoder("qwen3")
    dense = count_flops(model, 12)
    pruned, summary = prune_to_speedup(model, CausalBlocks(96), 1.5, num_samples=96, seq_len=12, tune_samples=96)
    assert 1.5 <= dense / count_flops(pruned, 12) <= 1.02 * 1.5
    assert pruned.config.layer_num_key_value_heads == structure.attention_units(pruned)
    assert torch.isfinite(logits(pruned)).all()
    assert generate(pruned).shape == (3, 16)


def depth_masked(model, drop):
    """Skipping layers, done by masks: their attention and MLP outputs set to zero leave the residual stream as is."""
    with torch.no_grad():
        for i in drop:
            layer = structure.get_layers(model)[i]
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removing_whole_layers_equals_skipping_them(family, tmp_path):
    model, reference = tiny_decoder(family), depth_masked(tiny_decoder(family), [0, 2])
    prune_heads(model, {1: [3]})
    prune_heads(reference, {1: [3]})
    prune_layers(model, [0, 2])
    assert len(structure.get_layers(model)) == 1 and model.config.num_hidden_layers == 1
    assert model.config.hf_prune_kept_layers == [1] and model.config.hf_prune_pruned_heads == {"0": [3]}
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(model), generate(reference))
    loaded = load_pruned(save_pruned(model, tmp_path / "export", card=False, figure=False)).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="keep at least one"):
        prune_layers(model, [0])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_uniform_shapes_load_as_the_family_s_own_model_without_remote_code(family, tmp_path):
    model = tiny_decoder(family)
    prune_heads(model, {i: [1, 2] for i in range(LAYERS)})
    prune_ffn_neurons(model, {i: list(range(10)) for i in range(LAYERS)})
    prune_layers(model, [1])
    folder = save_pruned(model, tmp_path / "export", figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and not (folder / "modeling_hf_prune.py").exists()
    assert (config["num_key_value_heads"], config["num_attention_heads"]) == (KV - 2, (KV - 2) * HEADS // KV)
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (WIDTH - 10, LAYERS - 1)
    assert "layer_num_key_value_heads" not in config and "layer_intermediate_sizes" not in config
    assert config["hf_prune_dense_shape"] == {
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "intermediate_size": WIDTH
    }  # fmt: skip
    assert "trust_remote_code" not in (folder / "README.md").read_text().split("With transformers only")[1]
    got, module = logits_without_hf_prune(folder)
    assert module.startswith("transformers.models."), module  # the family's own class, no remote code
    torch.testing.assert_close(got, logits(model))
    # pruned further, unevenly: per-layer sizes again, with the remote code
    prune_heads(model, {0: [0]})
    again = save_pruned(model, tmp_path / "again", card=False, figure=False)
    config = json.loads((again / "config.json").read_text())
    assert config["layer_num_key_value_heads"] == [KV - 3, KV - 2] and "auto_map" in config
    torch.testing.assert_close(logits(load_pruned(again).eval()), logits(model))


def test_uniform_shapes_the_family_s_config_refuses_stay_per_layer(tmp_path):
    """LlamaConfig wants the query heads to divide the hidden size: 3 groups of 2 heads (6) do not divide 32."""
    model = tiny_decoder("llama")
    prune_heads(model, {i: [1] for i in range(LAYERS)})
    config = json.loads(
        (save_pruned(model, tmp_path / "export", card=False, figure=False) / "config.json").read_text()
    )
    assert config["layer_num_key_value_heads"] == [KV - 1] * LAYERS and config["num_key_value_heads"] == KV
    assert "auto_map" in config
    torch.testing.assert_close(logits(load_pruned(tmp_path / "export").eval()), logits(model))


def non_embedding_parameters(model) -> int:
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embeddings)


def test_parameter_cost_model_counts_non_embedding_parameters_exactly():
    from hf_prune.models.costs import parameter_unit_costs

    for family in FAMILIES:
        model = tiny_decoder(family)
        costs = parameter_unit_costs(model)
        assert costs.total == non_embedding_parameters(model)
        prune_heads(model, {0: [1, 2], 2: [0, 1, 2, 3]})
        prune_ffn_neurons(model, {1: list(range(17))})
        assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == non_embedding_parameters(
            model
        )


@pytest.mark.parametrize("importance", ["fisher", "activation", "hybrid"])
def test_prune_to_a_share_of_parameters_with_either_importance(importance):
    from hf_prune.models.costs import parameter_unit_costs

    model = tiny_decoder("llama")
    pruned, summary = prune_to_speedup(model, CausalBlocks(64), 1.25, num_samples=64, seq_len=12, tune_samples=64,
                                       cost_model="params", importance=importance)  # fmt: skip
    kept = parameter_unit_costs(pruned).total / parameter_unit_costs(model).total
    assert 0.8 / 1.02 <= kept <= 0.8 + 1e-9  # 20% of the non-embedding parameters removed, within the 2% slack
    assert summary["importance"] == importance and summary["cost_model"] == "params"
    assert torch.isfinite(logits(pruned)).all()


def test_hybrid_importance_keeps_the_fisher_shapes_and_the_most_active_units():
    from hf_prune.posttrain.importance import activation_importance
    from hf_prune.posttrain.samples import pad_collate
    from hf_prune.posttrain.search import keep_top

    assert keep_top(torch.tensor([True, False, True, False]), torch.tensor([0.1, 3.0, 2.0, 2.0])).tolist() == [
        False, True, True, False,
    ]  # fmt: skip
    model, data = tiny_decoder("llama"), CausalBlocks(64)
    options = dict(num_samples=64, seq_len=12, cost_model="params", tune=False)
    _, fisher = prune_to_speedup(model, data, 1.4, **options)
    _, hybrid = prune_to_speedup(model, data, 1.4, importance="hybrid", **options)
    assert hybrid["heads_after"] == fisher["heads_after"] and hybrid["ffn_after"] == fisher["ffn_after"]
    batches = [pad_collate(0)([data[i] for i in range(j, j + 32)]) for j in (0, 32)]
    groups = activation_importance(model, batches, power=1)[0]
    for layer, scores in enumerate(groups):
        removed = hybrid["pruned_heads"].get(str(layer), [])
        kept = [u for u in range(len(scores)) if u not in removed]
        assert not removed or min(scores[kept]) >= max(scores[removed])


def test_activation_and_layer_importance():
    from hf_prune.posttrain.importance import activation_importance, layer_importance
    from hf_prune.posttrain.samples import pad_collate

    model = tiny_decoder("llama")
    data = CausalBlocks(8)
    batches = [pad_collate(0)([data[i] for i in range(8)])]
    heads, neurons = activation_importance(model, batches)
    assert [h.shape[0] for h in heads] == [KV] * LAYERS and [n.shape[0] for n in neurons] == [WIDTH] * LAYERS
    assert all(bool((h > 0).all()) for h in heads)
    # a unit whose output is zero has no importance; masking its output projection columns does not change that
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3] = 0  # silu(0) * up = 0
    assert float(activation_importance(model, batches)[1][0][3]) == 0.0
    cosine = layer_importance(model, batches, "cosine")
    loss = layer_importance(model, batches, "loss")
    assert cosine.shape == loss.shape == (LAYERS,) and bool((cosine >= 0).all())
    # a layer whose attention and MLP outputs are zero passes the residual stream unchanged: no influence, no loss
    depth_masked(model, [1])
    assert float(layer_importance(model, batches, "cosine")[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(layer_importance(model, batches, "loss")[1]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="method"):
        layer_importance(model, batches, "norm")


def test_uniform_search_exports_the_family_s_own_config(tmp_path, monkeypatch):
    model = tiny_decoder("qwen3")
    pruned, summary = prune_to_speedup(model, CausalBlocks(64), 1.3, num_samples=64, seq_len=12, tune_samples=64,
                                       cost_model="params", uniform=True)  # fmt: skip
    kv, widths = structure.attention_units(pruned), structure.ffn_size(pruned)
    assert len(set(kv)) == 1 and len(set(widths)) == 1 and summary["uniform"] is True
    assert (kv[0], widths[0]) != (KV, WIDTH)
    config = json.loads(
        (save_pruned(pruned, tmp_path / "export", card=False, figure=False) / "config.json").read_text()
    )
    assert "auto_map" not in config and (config["num_key_value_heads"], config["intermediate_size"]) == (
        kv[0],
        widths[0],
    )
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()), logits(pruned)
    )
    # a target no uniform shape reaches is refused before any importance is computed
    import hf_prune.posttrain.search as search

    monkeypatch.setattr(search, "mask_gradients", lambda *a: pytest.fail("importance computed before the refusal"))
    with pytest.raises(ValueError, match="out of reach with uniform shapes"):
        prune_to_speedup(tiny_decoder("llama"), CausalBlocks(64), 8.0, num_samples=64, seq_len=12, cost_model="params",
                         uniform=True, tune=False)  # fmt: skip
