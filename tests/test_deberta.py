"""DeBERTa-v2 / v3 (model_type "deberta-v2") on tiny configs built in code, with relative attention (p2c and c2p,
few position buckets) and both `share_att_key` values: heads (with their rows of the position projections), FFN
neurons, hidden dimensions and whole layers removed physically give the masked model's logits; exports reload with
and without hf_prune and as ONNX; the trainer and the search prune the family; what the adapter cannot cut (the
ConvLayer, relative embeddings without a LayerNorm) is refused before any work."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DebertaV2Config,
)
from utils import VOCAB, WITHOUT_HF_PRUNE, TinyDataset, batch, mask_removed_units, train_args

from hf_prune import (
    PruningTrainer,
    export_onnx,
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden_dims,
    prune_layers,
    prune_to_speedup,
    save_pruned,
)
from hf_prune.export.onnx import OnnxRuntimeModel
from hf_prune.models import structure
from hf_prune.models.costs import count_flops, unit_costs
from hf_prune.models.deberta import modeling_hf_prune
from hf_prune.models.hidden import HIDDEN_KEY, hidden_mask, hidden_width
from hf_prune.posttrain.fisher import layer_gates

LAYERS, HEADS, WIDTH = 3, 4, 48
# DeBERTa-v3's layout (keys shared with the content projections, no token types, no absolute positions) and
# DeBERTa-v2's (separate position projections), both with normalised relative embeddings
CONFIGS = {
    "v3": dict(share_att_key=True, type_vocab_size=0, position_biased_input=False),
    "separate": dict(share_att_key=False, type_vocab_size=2, position_biased_input=True),
}
HEADS_CUT = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # layer 1 keeps no head
NEURONS_CUT = {0: [0, 5, 47], 2: list(range(WIDTH))}  # layer 2 keeps no FFN neuron
DROP = [0, 3, 4, 9, 17, 30]


def tiny_deberta(kind="v3", cls=AutoModelForSequenceClassification, seed=0, **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=WIDTH,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        relative_attention=True, position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", pad_token_id=0, **CONFIGS[kind],
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = cls.from_config(DebertaV2Config(**kwargs)).eval()
    with torch.no_grad():  # weights larger than the default init, so a wrong cut shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs_for(model, n=4, seq_len=12, pad=3, seed=1):
    """A batch with padding, and two segments where the model has token types."""
    inputs = batch(n, seq_len, seed=seed, pad=pad)
    if model.config.type_vocab_size > 0:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        inputs["token_type_ids"][:, seq_len // 2 :] = 1
    return inputs


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.start_logits


def keep_mask(drop, width=32):
    keep = torch.ones(width, dtype=torch.bool)
    keep[drop] = False
    return keep


# ----------------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("kind", ["v3", "separate", "conv"])
def test_removing_heads_and_neurons_equals_masking_them(kind):
    overrides = {"conv_kernel_size": 3} if kind == "conv" else {}  # the ConvLayer does not stop heads and neurons
    model = tiny_deberta("v3" if kind == "conv" else kind, **overrides)
    reference = mask_removed_units(copy.deepcopy(model), HEADS_CUT, NEURONS_CUT)
    inputs = inputs_for(model)
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16)
    prune_heads(model, HEADS_CUT)
    prune_ffn_neurons(model, NEURONS_CUT)
    torch.testing.assert_close(outputs(model, inputs), outputs(reference, inputs), atol=1e-5, rtol=1e-4)
    heads = [HEADS - len(HEADS_CUT.get(i, [])) for i in range(LAYERS)]
    assert structure.attention_units(model) == model.config.layer_num_attention_heads == heads
    assert structure.ffn_size(model) == model.config.layer_intermediate_sizes == [48 - 3, 48, 0]
    attn = model.deberta.encoder.layer[2].attention.self
    assert (attn.num_attention_heads, attn.all_head_size) == (2, 16)
    if kind == "separate":  # the heads' rows of the separate position projections went with them
        assert attn.pos_key_proj.out_features == attn.pos_query_proj.out_features == 16
        paths = [s.path for s in structure.unit_groups(model, "attention")[0].inputs]
        assert paths[-2:] == ["attention.self.pos_key_proj", "attention.self.pos_query_proj"]
    # every head's relative-position scores are counted with it: the cost model stays exact
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == count_flops(model, 16)


@pytest.mark.parametrize("kind, overrides", [("v3", {}), ("separate", {}), ("v3", {"embedding_size": 16})])
def test_removing_hidden_dimensions_equals_masking_them(kind, overrides):
    model = tiny_deberta(kind, **overrides)
    prune_heads(model, HEADS_CUT)
    prune_ffn_neurons(model, NEURONS_CUT)
    inputs = inputs_for(model)
    with hidden_mask(model, keep_mask(DROP)):
        masked = outputs(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DROP)
    torch.testing.assert_close(outputs(pruned, inputs), masked, rtol=1e-5, atol=1e-5)
    assert hidden_width(pruned) == 32 - len(DROP) and pruned.config.hidden_size == 32
    assert pruned.deberta.encoder.rel_embeddings.embedding_dim == 32 - len(DROP)  # the table lost the same columns
    assert "deberta.encoder.LayerNorm" in pruned.config.hf_prune_hidden["norms"]


@pytest.mark.parametrize("cls", [AutoModelForTokenClassification, AutoModelForQuestionAnswering])
def test_token_heads_read_the_stream_and_lose_the_same_columns(cls):
    model = tiny_deberta("v3", cls=cls, num_labels=2)
    inputs = inputs_for(model)
    with hidden_mask(model, keep_mask(DROP)):
        masked = outputs(model, inputs)
    torch.testing.assert_close(outputs(prune_hidden_dims(copy.deepcopy(model), DROP), inputs), masked)


@pytest.mark.parametrize("kind", ["v3", "separate"])
def test_a_gated_off_layer_equals_the_layer_removed(kind):
    model = tiny_deberta(kind)
    prune_heads(model, {0: [0, 1, 2, 3]})
    inputs = inputs_for(model)
    gates = torch.ones(4, LAYERS)
    gates[:, 1] = 0.0
    with torch.no_grad(), layer_gates(model, gates):
        gated = model(**inputs).logits
    dropped = prune_layers(copy.deepcopy(model), [1])
    torch.testing.assert_close(outputs(dropped, inputs), gated)
    assert dropped.config.num_hidden_layers == 2 and dropped.config.hf_prune_kept_layers == [0, 2]
    assert dropped.config.layer_num_attention_heads == [0, HEADS]
    assert not structure.get_layers(dropped)[0].attention.self.num_attention_heads


# ----------------------------------------------------------------------------------------------------- exports
def test_exports_reload_with_and_without_hf_prune(tmp_path):
    folders, sent, expected = {}, {}, {}
    for kind in CONFIGS:
        model = tiny_deberta(kind)
        prune_heads(model, HEADS_CUT)
        prune_ffn_neurons(model, NEURONS_CUT)
        prune_hidden_dims(model, DROP)
        prune_layers(model, [0])  # after the hidden cut: the narrowed modules are recorded under their new names
        recorded = [n for names in model.config.hf_prune_hidden.values() if isinstance(names, list) for n in names]
        assert not [name for name in recorded if ".layer.2." in name]
        inputs = inputs_for(model)
        folders[kind] = str(save_pruned(model, tmp_path / kind, card=False, figure=False))
        sent[kind] = {name: t.tolist() for name, t in inputs.items()}
        expected[kind] = outputs(model, inputs)
        torch.testing.assert_close(outputs(load_pruned(folders[kind]), inputs), expected[kind])
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["auto_map"]["AutoModelForSequenceClassification"] == (
            "modeling_hf_prune.PrunedDebertaV2ForSequenceClassification"
        )
        assert config["layer_num_attention_heads"] == [0, 2] and config["hf_prune_layout"]["query"].endswith("_proj")
    (tmp_path / "inputs.json").write_text(json.dumps({"folders": folders, "inputs": sent}))
    # a fresh interpreter without hf_prune: transformers and the export's own modeling file
    script = (
        WITHOUT_HF_PRUNE
        + f"""
import torch
from transformers import AutoModelForSequenceClassification
task, out = json.load(open({str(tmp_path / "inputs.json")!r})), {{}}
for kind, folder in task["folders"].items():
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**{{k: torch.tensor(v) for k, v in task["inputs"][kind].items()}}).logits
    out[kind] = [type(model).__module__, logits.tolist()]
print(json.dumps(out))
"""
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for kind, (module, logits) in json.loads(run.stdout.strip().splitlines()[-1]).items():
        assert module.startswith("transformers_modules."), module
        torch.testing.assert_close(torch.tensor(logits), expected[kind])


def test_the_remote_code_file_reads_the_keys_hf_prune_writes():
    from hf_prune.export.persistence import standalone_source
    from hf_prune.models.remote_common import FFN_KEY, HEADS_KEY

    namespace = {}
    exec(compile(standalone_source(modeling_hf_prune), "modeling_hf_prune.py", "exec"), namespace)
    assert (namespace["HIDDEN_KEY"], namespace["HEADS_KEY"], namespace["FFN_KEY"]) == (HIDDEN_KEY, HEADS_KEY, FFN_KEY)


@pytest.mark.parametrize("kind", ["v3", "separate"])
def test_onnx_gives_pytorch_s_logits_and_int8_runs(kind, tmp_path):
    model = tiny_deberta(kind)
    prune_heads(model, HEADS_CUT)
    prune_ffn_neurons(model, NEURONS_CUT)
    folder = save_pruned(model, tmp_path / kind, card=False, figure=False)
    onnx_dir = export_onnx(folder, int8=True)
    runner = OnnxRuntimeModel(onnx_dir / "model.onnx")
    # token_type_ids is an input only where the embeddings have a token-type table (DeBERTa-v3 has none)
    assert runner.input_names == ["input_ids", "attention_mask"] + (["token_type_ids"] if kind == "separate" else [])
    inputs = inputs_for(model, 3, 9, pad=2)  # neither the traced shape nor the checked one
    expected = outputs(model, inputs)
    # ONNX Runtime's fp32 kernels differ from torch's by CPU: up to 2e-4 on logits of ~0.2 on an AVX-512 Xeon, with
    # every graph optimization off too (the kernels, not a fusion)
    torch.testing.assert_close(runner(**inputs).logits, expected, atol=5e-4, rtol=0)
    int8 = OnnxRuntimeModel(onnx_dir / "model_int8.onnx")(**inputs).logits
    assert int8.shape == expected.shape and torch.isfinite(int8).all()


# ----------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("target, extra", [
    ("ffn", {"target_sparsity": 0.5}),
    ("heads_and_ffn", {"target_speedup": 1.5}),
])  # fmt: skip
def test_taylor_pruning_while_training_then_prune_changes_no_output(target, extra, tmp_path):
    args = dict(max_steps=6, pruning_warmup_steps=1, pruning_cooldown_steps=2, pruning_frequency=1,
                per_device_train_batch_size=8, learning_rate=5e-3, speedup_seq_len=12, pruning_method="taylor",
                pruning_target=target, taylor_iterations=2, taylor_interval_steps=2, **extra)  # fmt: skip
    trainer = PruningTrainer(model=tiny_deberta("separate"), args=train_args(tmp_path, **args),
                             train_dataset=TinyDataset(48))  # fmt: skip
    trainer.train()
    inputs = inputs_for(trainer.model)
    before = outputs(trainer.model, inputs)
    summary = trainer.prune()
    assert summary["params_after"] < summary["params_before"]
    torch.testing.assert_close(outputs(trainer.model, inputs), before, atol=1e-5, rtol=1e-4)
    assert trainer.model.config.layer_intermediate_sizes == structure.ffn_size(trainer.model)


@pytest.mark.parametrize("mode", ["units", "hidden", "layers"])
def test_prune_to_speedup_reaches_the_target(mode, monkeypatch):
    import hf_prune.posttrain.search as search

    real = search.mask_fisher

    def mask_fisher(grads):
        scores = real(grads)
        if mode == "hidden" and len(grads) == 1 and grads[0].shape[1] == 32:  # the stream's dimensions made cheap
            return [s * 1e-6 for s in scores]
        if mode == "layers" and len(grads) == 1 and grads[0].shape[1] == LAYERS:  # the gates: layer 1 is free
            scores[0][1] = 0.0
        return scores

    monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    model = tiny_deberta("v3")
    dense = count_flops(model, 12)
    options = {"hidden": {"prune_hidden": True}, "layers": {"drop_layers": True}}.get(mode, {})
    pruned, summary = prune_to_speedup(model, TinyDataset(32), 1.6, num_samples=32, seq_len=12, tune_samples=32,
                                       batch_size=16, **options)  # fmt: skip
    assert 1.6 <= dense / count_flops(pruned, 12) <= 1.02 * 1.6
    assert pruned.config.layer_num_attention_heads == structure.attention_units(pruned)
    if mode == "hidden":
        assert summary["hidden_after"] == hidden_width(pruned) < 32
    if mode == "layers":
        assert summary["dropped_layers"] == [1] and len(structure.get_layers(pruned)) == LAYERS - 1
    assert torch.isfinite(outputs(pruned, inputs_for(pruned))).all()


# ----------------------------------------------------------------------------------------------------- refusals
def test_what_the_adapter_cannot_cut_is_refused_before_any_work(monkeypatch):
    import hf_prune.posttrain.search as search

    conv = tiny_deberta("v3", conv_kernel_size=3)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match="ConvLayer.*conv_kernel_size=3.*prune_hidden=False"):
        prune_hidden_dims(conv, [0])
    with pytest.raises(ValueError, match="Removing layer 0.*ConvLayer.*layers other than 0"):
        prune_layers(conv, [0, 2])
    monkeypatch.setattr(search, "mask_gradients", lambda *a, **k: pytest.fail("importance computed first"))
    for option in ({"drop_layers": True}, {"prune_hidden": True}):
        with pytest.raises(ValueError, match=f"ConvLayer.*{next(iter(option))}=False"):
            prune_to_speedup(conv, TinyDataset(16), 1.5, num_samples=16, seq_len=12, tune=False, **option)
    assert len(structure.get_layers(conv)) == LAYERS and hidden_width(conv) == 32
    assert all(torch.equal(v, state[k]) for k, v in conv.state_dict().items())  # nothing was changed
    prune_layers(conv, [2])  # layers after the first can go
    assert conv.config.hf_prune_kept_layers == [0, 1]

    raw = tiny_deberta("v3", norm_rel_ebd="none")
    with pytest.raises(ValueError, match="norm_rel_ebd='none'.*Prune its heads, FFN neurons or layers"):
        prune_hidden_dims(raw, [0])
    with pytest.raises(ValueError, match="head is not one hf_prune knows"):
        prune_hidden_dims(tiny_deberta("v3", cls=AutoModelForMaskedLM), [0])
