"""ModernBERT on tiny configs built in code: heads (three slices of the fused Wqkv), gated MLP neurons, hidden
dimensions and whole layers removed physically give the masked model's logits (a layer without heads and one without
neurons included, with padding, with a sliding window that matters at these lengths); exports reload with and without
hf_prune and export to ONNX; the training-time pruners and the search prune it; what cannot be pruned is refused."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from utils import VOCAB, WITHOUT_HF_PRUNE, TinyDataset, batch, mask_removed_units, train_args

from hf_prune import (
    PruningTrainer,
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden_dims,
    prune_layers,
    prune_to_speedup,
    save_pruned,
)
from hf_prune.models import structure
from hf_prune.models.adapter import ATTENTION, MLP
from hf_prune.models.auto import get_adapter
from hf_prune.models.costs import count_flops, unit_costs
from hf_prune.models.hidden import hidden_mask, hidden_width
from hf_prune.models.modernbert.modeling_hf_prune import EmptyAttention
from hf_prune.posttrain.fisher import layer_gates

LAYERS, HEADS, WIDTH, HIDDEN = 3, 4, 48, 32
# layers 0 and 2 global, layer 1 sliding; a window of 4 tokens (2 each side), so it matters at 12 tokens
TYPES = ["full_attention", "sliding_attention", "full_attention"]
DROP = [0, 3, 4, 9, 17, 30]


def tiny_modernbert(cls=AutoModelForSequenceClassification, seed=0, attn_implementation="eager", **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=WIDTH, max_position_embeddings=64, num_labels=3, global_attn_every_n_layers=2,
        local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = AutoConfig.for_model("modernbert", **kwargs)
    model = cls.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # weights larger than the default init, so a wrong cut shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logits(model, inputs=None):
    model.eval()
    with torch.no_grad():
        return model(**(inputs or batch(pad=3))).logits


def keep_mask(drop, width=HIDDEN):
    keep = torch.ones(width, dtype=torch.bool)
    keep[drop] = False
    return keep


def logits_without_hf_prune(folder, inputs):
    """The logits from the export loaded by `AutoModelForSequenceClassification` with its remote code in a fresh
    interpreter where `import hf_prune` fails, and the module of the class that loaded it."""
    script = (
        WITHOUT_HF_PRUNE
        + f"""
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True,
                                                           attn_implementation="eager").eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor({inputs["input_ids"].tolist()}),
                attention_mask=torch.tensor({inputs["attention_mask"].tolist()})).logits
print(json.dumps([type(model).__module__, out.tolist()]))
"""
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    module, out = json.loads(run.stdout.strip().splitlines()[-1])
    return torch.tensor(out), module


# ----------------------------------------------------------------------------------------------------- units
def test_a_head_owns_three_slices_of_wqkv_and_a_neuron_two_rows_of_wi():
    model = tiny_modernbert()
    assert model.config.layer_types == TYPES
    (q, k, v), o = structure.unit_groups(model, ATTENTION)[0].inputs, structure.unit_groups(model, ATTENTION)[0].output
    assert q.channels([1]) == list(range(8, 16)) and k.channels([1]) == list(range(40, 48))
    assert v.channels([1]) == list(range(72, 80)) and o.channels([1]) == list(range(8, 16))
    (inp, gate), down = structure.unit_groups(model, MLP)[0].inputs, structure.unit_groups(model, MLP)[0].output
    assert inp.channels([5]) == [5] and gate.channels([5]) == [WIDTH + 5] and down.channels([5]) == [5]
    assert structure.attention_units(model) == [HEADS] * LAYERS and structure.ffn_size(model) == [WIDTH] * LAYERS


CASES = [
    ({0: [1], 2: [0, 3]}, {0: [0, 5, 47], 2: [7]}),
    ({1: [0, 1, 2, 3]}, {0: list(range(WIDTH)), 1: [3]}),  # layer 1 keeps no head, layer 0 no neuron
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("heads, neurons", CASES)
def test_removing_heads_and_neurons_equals_masking_them(attn, heads, neurons):
    model = tiny_modernbert(attn_implementation=attn)
    reference = mask_removed_units(tiny_modernbert(attn_implementation=attn), heads, neurons)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert structure.attention_units(model) == [HEADS - len(heads.get(i, [])) for i in range(LAYERS)]
    assert model.config.layer_num_attention_heads == structure.attention_units(model)
    assert model.config.layer_intermediate_sizes == [WIDTH - len(neurons.get(i, [])) for i in range(LAYERS)]
    for layer, kept in zip(model.model.layers, structure.attention_units(model)):
        assert isinstance(layer.attn, EmptyAttention) == (kept == 0)


def test_cost_model_is_exact_after_pruning():
    model = tiny_modernbert()
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16)
    prune_heads(model, {0: [0, 2], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {2: list(range(15))})
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == pytest.approx(
        count_flops(model, 16), rel=1e-9
    )


# ----------------------------------------------------------------------------------------------------- hidden
@pytest.mark.parametrize(
    "cls, overrides",
    [
        (AutoModelForSequenceClassification, {}),
        (AutoModelForSequenceClassification, {"classifier_pooling": "mean", "attention_bias": True, "mlp_bias": True,
                                               "norm_bias": True, "classifier_bias": True}),
        (AutoModelForTokenClassification, {}),
        (AutoModelForMaskedLM, {"tie_word_embeddings": False}),
    ],
)  # fmt: skip
def test_removing_hidden_dimensions_equals_masking_them(cls, overrides):
    model = tiny_modernbert(cls, **overrides)
    prune_heads(model, {1: [0, 1, 2, 3], 2: [1]})  # a layer without heads reads and writes the stream too
    prune_ffn_neurons(model, {0: list(range(10))})
    inputs = batch(pad=3)
    with hidden_mask(model, keep_mask(DROP)):
        masked = logits(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DROP)
    torch.testing.assert_close(logits(pruned, inputs), masked, rtol=1e-5, atol=1e-5)
    assert hidden_width(pruned) == HIDDEN - len(DROP) and pruned.model.embeddings.tok_embeddings.embedding_dim == 26
    assert pruned.head.norm.normalized_shape == (HIDDEN,)  # the head's own width is not the stream's


# ----------------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("drop", [[0], [1], [0, 2]])
def test_removing_whole_layers_equals_gating_them_off(drop):
    model = tiny_modernbert()
    prune_heads(model, {1: [2]})
    inputs = batch(pad=3)
    gates = torch.ones(inputs["input_ids"].shape[0], LAYERS)
    gates[:, drop] = 0.0
    with torch.no_grad(), layer_gates(model, gates):
        gated = model(**inputs).logits
    dropped = prune_layers(copy.deepcopy(model), drop)
    kept = [i for i in range(LAYERS) if i not in drop]
    torch.testing.assert_close(logits(dropped, inputs), gated, atol=1e-5, rtol=1e-4)
    # each kept layer keeps its attention type and its attention norm (the dense layer 0 has none)
    assert dropped.config.layer_types == [TYPES[i] for i in kept] and dropped.config.hf_prune_kept_layers == kept
    assert [isinstance(la.attn_norm, torch.nn.LayerNorm) for la in dropped.model.layers] == [i > 0 for i in kept]
    assert dropped.config.layer_num_attention_heads == [[HEADS, HEADS - 1, HEADS][i] for i in kept]


def test_an_emptied_layer_is_a_pass_through_only_without_output_biases():
    model = tiny_modernbert()
    emptied = copy.deepcopy(model)
    prune_heads(emptied, {1: list(range(HEADS))})
    prune_ffn_neurons(emptied, {1: list(range(WIDTH))})
    torch.testing.assert_close(logits(emptied), logits(prune_layers(copy.deepcopy(model), [1])), rtol=0, atol=0)
    assert get_adapter(model).empty_layer_is_identity(model)
    assert not get_adapter(model).empty_layer_is_identity(tiny_modernbert(attention_bias=True))
    assert not get_adapter(model).empty_layer_is_identity(tiny_modernbert(mlp_bias=True))


# ----------------------------------------------------------------------------------------------------- exports
def test_pruned_model_saves_and_reloads_with_and_without_hf_prune(tmp_path):
    model = tiny_modernbert()
    prune_heads(model, {1: [0, 1, 2, 3], 2: [0]})
    prune_ffn_neurons(model, {2: list(range(WIDTH)), 1: [4, 9]})
    prune_layers(model, [0])  # the new first layer has an attention norm the family would not build there
    prune_hidden_dims(model, DROP)
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_attn_norms"] == [True, True] and config["layer_types"] == TYPES[1:]
    auto = config["auto_map"]["AutoModelForSequenceClassification"]
    assert auto == "modeling_hf_prune.PrunedModernBertForSequenceClassification"
    inputs = batch(pad=3)
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(load_pruned(folder, attn_implementation="eager"), inputs), expected)
    got, module = logits_without_hf_prune(folder, inputs)
    assert module.startswith("transformers_modules."), module  # the export's own modeling file
    torch.testing.assert_close(got, expected)


def test_onnx_export_gives_the_pytorch_logits_at_other_shapes(tmp_path):
    from hf_prune import export_onnx
    from hf_prune.export.onnx import OnnxRuntimeModel

    model = tiny_modernbert()
    prune_heads(model, {0: [1, 3], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {2: list(range(WIDTH)), 0: [1]})
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    onnx_dir = export_onnx(folder)
    runner = OnnxRuntimeModel(onnx_dir / "model.onnx")
    assert runner.input_names == ["input_ids", "attention_mask"]
    for n, seq_len, pad in ((1, 5, 0), (5, 23, 4)):  # neither is the traced shape; the window matters at 23 tokens
        inputs = batch(n, seq_len, seed=n, pad=pad)
        torch.testing.assert_close(runner(**inputs).logits, logits(model, inputs), atol=1e-4, rtol=0)
    int8 = OnnxRuntimeModel(export_onnx(folder, int8=True) / "model_int8.onnx")
    assert torch.isfinite(int8(**batch(3, 9, pad=2)).logits).all()


# ----------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("config", [
    {"pruning_target": "ffn", "target_sparsity": 0.5},
    {"pruning_target": "heads_and_ffn", "target_speedup": 1.5},
])  # fmt: skip
def test_the_training_time_pruners_mask_then_remove_units(tmp_path, config):
    args = dict(max_steps=6, pruning_warmup_steps=1, pruning_cooldown_steps=1, pruning_frequency=1)
    args.update(per_device_train_batch_size=8, learning_rate=5e-3, speedup_seq_len=12, pruning_method="taylor")
    args.update(taylor_iterations=2, taylor_interval_steps=3, **config)
    trainer = PruningTrainer(model=tiny_modernbert(), args=train_args(tmp_path, **args), train_dataset=TinyDataset(64))
    trainer.train()
    before = logits(trainer.model)
    summary = trainer.prune()
    assert summary["params_after"] < summary["params_before"]
    torch.testing.assert_close(logits(trainer.model), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"prune_hidden": True}, {"drop_layers": True}])
def test_prune_to_speedup_reaches_the_target(options, tmp_path):
    model = tiny_modernbert()
    dense = count_flops(model, 12)
    pruned, summary = prune_to_speedup(model, TinyDataset(32), 1.6, num_samples=32, seq_len=12, tune_samples=32,
                                       batch_size=8, **options)  # fmt: skip
    assert 1.6 <= dense / count_flops(pruned, 12) <= 1.02 * 1.6
    assert pruned.config.layer_num_attention_heads == structure.attention_units(pruned)
    if options.get("prune_hidden"):
        assert summary["hidden_after"] == hidden_width(pruned)
    folder = save_pruned(pruned, tmp_path / "export", card=False, figure=False)
    torch.testing.assert_close(logits(load_pruned(folder, attn_implementation="eager")), logits(pruned))


def test_tuning_runs_each_layer_with_its_own_mask_and_rotary_table():
    """Sliding and global layers get other arguments from the model; the fit must replay each layer's own."""
    from hf_prune.models.structure import get_layers
    from hf_prune.posttrain.mask_tuning import _call_layer, _layer_inputs

    model, inputs = tiny_modernbert(), batch(pad=3)
    seen = {}
    hooks = [la.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i, la in
             enumerate(get_layers(model))]  # fmt: skip
    with torch.no_grad():
        model(**inputs)
        for h in hooks:
            h.remove()
        first, extras = _layer_inputs(model, [inputs])
        torch.testing.assert_close(first[0], seen[0])
        for i in range(LAYERS - 1):
            torch.testing.assert_close(_call_layer(get_layers(model)[i], seen[i], extras[0][i]), seen[i + 1])


# ----------------------------------------------------------------------------------------------------- refusals
def test_what_cannot_be_pruned_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        prune_hidden_dims(tiny_modernbert(AutoModelForMaskedLM), [0])
    # transformers 5.0's attention reshapes with a head count from the config and picks its window by layer index
    old = tiny_modernbert()
    old.model.layers[1].attn.num_heads = HEADS
    with pytest.raises(ValueError, match=r"transformers>=5.1"):
        prune_heads(old, {1: [0]})
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(tiny_modernbert(), {0: [HEADS]})
    with pytest.raises(ValueError, match="keep at least one"):
        prune_layers(tiny_modernbert(), range(LAYERS))
