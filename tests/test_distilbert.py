"""DistilBERT on tiny configs built in code: heads, FFN neurons, hidden dimensions and whole layers removed physically
give the outputs of the masked model (a layer without heads and one without neurons included, with padding); exports
reload with hf_prune and with transformers alone; the training-time pruners, the search, the cost model and ONNX
work on the family unchanged; the heads whose hidden dimensions cannot be pruned are refused."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
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
from hf_prune.models.auto import get_adapter
from hf_prune.models.costs import count_flops, unit_costs
from hf_prune.models.distilbert.adapter import DistilBertAdapter
from hf_prune.models.distilbert.modeling_hf_prune import EmptyDistilBertAttention, KeptWidthEmbeddings
from hf_prune.models.hidden import hidden_mask, hidden_width
from hf_prune.posttrain.fisher import layer_gates

LAYERS, HEADS, DIM, WIDTH = 3, 4, 32, 48
HEADS_GONE = {0: [1, 3], 1: [0, 1, 2, 3]}  # layer 1 keeps no head
NEURONS_GONE = {0: [0, 5, 47], 2: list(range(WIDTH))}  # layer 2 keeps no FFN neuron
DIMS_GONE = [0, 3, 4, 9, 17, 30]
AUTO = {
    "sequence": AutoModelForSequenceClassification,
    "token": AutoModelForTokenClassification,
    "qa": AutoModelForQuestionAnswering,
    "choice": AutoModelForMultipleChoice,
    "base": AutoModel,
    "mlm": AutoModelForMaskedLM,
}


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, hidden_dim=WIDTH, max_position_embeddings=64,
        num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0, pad_token_id=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return AutoConfig.for_model("distilbert", **kwargs)


def tiny_distilbert(head: str = "sequence", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(num_labels=2 if head == "qa" else 3, **overrides)
    model = AUTO[head].from_config(config).eval()
    with torch.no_grad():  # weights larger than the default init, so a wrong cut shows in the outputs
        for name, p in model.named_parameters():
            if "position_embeddings" not in name or not config.sinusoidal_pos_embds:
                p.add_(0.05 * torch.randn_like(p))
    return model


def inputs_for(head: str, n: int = 4, seq_len: int = 12, pad: int = 3):
    inputs = batch(n, seq_len, pad=pad)
    if head == "choice":  # (batch, choices, length)
        return {k: v.view(2, n // 2, seq_len) for k, v in inputs.items()}
    return inputs


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise AssertionError(f"no output in {list(out)}")


def keep_mask(drop):
    keep = torch.ones(DIM, dtype=torch.bool)
    keep[drop] = False
    return keep


# ----------------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("head", ["sequence", "mlm"])
def test_removing_heads_and_neurons_equals_masking_them(head):
    model = tiny_distilbert(head)
    reference = mask_removed_units(tiny_distilbert(head), HEADS_GONE, NEURONS_GONE)
    assert get_adapter(model).__class__ is DistilBertAdapter
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    inputs = inputs_for(head)
    torch.testing.assert_close(outputs(model, inputs), outputs(reference, inputs), atol=1e-5, rtol=1e-4)
    heads = [HEADS - len(HEADS_GONE.get(i, [])) for i in range(LAYERS)]
    assert structure.attention_units(model) == model.config.layer_num_attention_heads == heads
    assert structure.ffn_size(model) == model.config.layer_intermediate_sizes == [45, WIDTH, 0]
    layers = structure.get_layers(model)
    assert isinstance(layers[1].attention, EmptyDistilBertAttention) and layers[0].attention.n_heads == 2
    assert model.config.hf_prune_pruned_heads == {"0": [1, 3], "1": [0, 1, 2, 3]}
    # indices are those of the current heads: layer 0's heads 0 and 2 are now 0 and 1
    prune_heads(model, {0: [1]})
    assert model.config.hf_prune_pruned_heads["0"] == [1, 2, 3]


def test_cost_model_is_exact_after_pruning():
    model = tiny_distilbert()
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16)
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == pytest.approx(
        count_flops(model, 16), rel=1e-9
    )


# ----------------------------------------------------------------------------------------------------- hidden
@pytest.mark.parametrize("head", ["sequence", "token", "qa", "choice", "base"])
def test_removing_hidden_dimensions_equals_masking_them(head):
    model = tiny_distilbert(head)
    inputs = inputs_for(head)
    with hidden_mask(model, keep_mask(DIMS_GONE)):
        masked = outputs(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DIMS_GONE)
    if head == "base":  # the hidden states themselves: the masked model's are zero on the removed dimensions
        assert (masked[..., DIMS_GONE] == 0).all()
        masked = masked[..., keep_mask(DIMS_GONE)]
    torch.testing.assert_close(outputs(pruned, inputs), masked, rtol=1e-5, atol=1e-5)
    assert hidden_width(pruned) == DIM - len(DIMS_GONE) and pruned.config.dim == DIM
    assert pruned.config.hf_prune_hidden_kept == [d for d in range(DIM) if d not in DIMS_GONE]


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_hidden_dimensions_with_heads_neurons_and_empty_layers(sinusoidal):
    model = tiny_distilbert(sinusoidal_pos_embds=sinusoidal)
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    inputs = inputs_for("sequence")
    with hidden_mask(model, keep_mask(DIMS_GONE)):
        masked = outputs(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DIMS_GONE)
    torch.testing.assert_close(outputs(pruned, inputs), masked, rtol=1e-5, atol=1e-5)
    if sinusoidal:  # the fixed table keeps the kept dimensions' columns
        table = model.distilbert.embeddings.position_embeddings.weight
        kept = pruned.config.hf_prune_hidden_kept
        torch.testing.assert_close(pruned.distilbert.embeddings.position_embeddings.weight, table[:, kept])


# ----------------------------------------------------------------------------------------------------- layers
def test_a_gated_off_layer_equals_the_layer_removed():
    model = tiny_distilbert()
    prune_heads(model, {1: [0, 1, 2, 3]})  # the layer removed has no head left; the others keep theirs
    prune_ffn_neurons(model, {2: list(range(WIDTH))})
    inputs = inputs_for("sequence")
    gates = torch.ones(4, LAYERS)
    gates[:, 1] = 0.0
    with torch.no_grad(), layer_gates(model, gates):
        gated = model(**inputs).logits
    dropped = prune_layers(copy.deepcopy(model), [1])
    torch.testing.assert_close(outputs(dropped, inputs), gated, rtol=1e-5, atol=1e-5)
    assert dropped.config.n_layers == len(structure.get_layers(dropped)) == dropped.distilbert.transformer.n_layers
    assert dropped.config.hf_prune_kept_layers == [0, 2]
    assert dropped.config.layer_num_attention_heads == [HEADS, HEADS]
    assert dropped.config.layer_intermediate_sizes == [WIDTH, 0]
    assert not get_adapter(model).empty_layer_is_identity(model)  # post-LayerNorm: an empty layer still normalises


# ----------------------------------------------------------------------------------------------------- exports
def outputs_without_hf_prune(runs: list[tuple]) -> list[torch.Tensor]:
    """In one fresh interpreter where `import hf_prune` fails, the output of each `(folder, auto class, inputs)`
    loaded with `trust_remote_code=True` (by the export's own modeling file, which this checks)."""
    script = WITHOUT_HF_PRUNE + "import torch\nimport transformers\nresults = []\n"
    for folder, auto, inputs in runs:
        tensors = {k: v.tolist() for k, v in inputs.items()}
        script += f"""
model = transformers.{auto.__name__}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(**{{k: torch.tensor(v) for k, v in {tensors!r}.items()}})
results.append([type(model).__module__, (out.logits if "logits" in out else out[0]).tolist()])
"""
    script += "print(json.dumps(results))\n"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module, _ in results), results
    return [torch.tensor(out) for _, out in results]


def test_pruned_models_save_and_reload_with_and_without_hf_prune(tmp_path):
    model = tiny_distilbert()
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    prune_layers(model, [0])
    prune_hidden_dims(model, DIMS_GONE)
    sinusoidal = tiny_distilbert("token", sinusoidal_pos_embds=True)
    prune_heads(sinusoidal, {2: [0, 1, 2, 3]})
    prune_hidden_dims(sinusoidal, DIMS_GONE)
    runs, expected = [], []
    for name, pruned, auto in (("sequence", model, AutoModelForSequenceClassification),
                               ("token", sinusoidal, AutoModelForTokenClassification)):  # fmt: skip
        folder = save_pruned(pruned, tmp_path / name, card=False, figure=False)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"][auto.__name__] == f"modeling_hf_prune.Pruned{type(pruned).__name__}"
        assert config["layer_num_attention_heads"] == structure.attention_units(pruned)
        inputs = inputs_for(name)
        loaded = load_pruned(folder).eval()
        torch.testing.assert_close(outputs(loaded, inputs), outputs(pruned, inputs))
        runs.append((folder, auto, inputs))
        expected.append(outputs(pruned, inputs))
    # the sinusoidal table is loaded from the weights, never recomputed at the dense width
    assert isinstance(loaded.distilbert.embeddings, KeptWidthEmbeddings)
    assert model.config.n_layers == LAYERS - 1 and model.config.hf_prune_kept_layers == [1, 2]
    for got, want in zip(outputs_without_hf_prune(runs), expected):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("config", [
    {"pruning_target": "ffn", "target_sparsity": 0.5},
    {"pruning_target": "heads_and_ffn", "target_speedup": 1.5},
])  # fmt: skip
def test_the_training_time_pruners_mask_then_remove_units(tmp_path, config):
    args = dict(pruning_method="taylor", taylor_iterations=2, taylor_interval_steps=3, max_steps=8,
                pruning_warmup_steps=1, pruning_cooldown_steps=2, pruning_frequency=1, learning_rate=5e-3,
                speedup_seq_len=12, **config)  # fmt: skip
    trainer = PruningTrainer(model=tiny_distilbert(), args=train_args(tmp_path, **args), train_dataset=TinyDataset(64))
    trainer.train()
    inputs = inputs_for("sequence")
    before = outputs(trainer.model, inputs)
    summary = trainer.prune()
    assert summary["params_after"] < summary["params_before"]
    torch.testing.assert_close(outputs(trainer.model, inputs), before, atol=1e-5, rtol=1e-4)
    assert trainer.model.config.layer_intermediate_sizes == structure.ffn_size(trainer.model)


# ----------------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("target, prune_hidden", [(1.6, False), (2.0, True)])
def test_prune_to_speedup_reaches_the_target(target, prune_hidden, monkeypatch):
    import hf_prune.posttrain.search as search

    real = search.mask_fisher

    def mask_fisher(grads):  # the hidden dimensions' Fisher (one (examples, hidden) tensor) made nearly free
        scores = real(grads)
        return [s * 1e-6 for s in scores] if len(grads) == 1 and grads[0].shape[1] == DIM else scores

    if prune_hidden:  # so that the search narrows the stream (with real scores a tiny model keeps its width)
        monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    model = tiny_distilbert()
    dense = count_flops(model, 12)
    pruned, summary = prune_to_speedup(model, TinyDataset(32), target, num_samples=32, seq_len=12, tune_samples=32,
                                       batch_size=16, prune_hidden=prune_hidden)  # fmt: skip
    assert target <= dense / count_flops(pruned, 12) <= 1.02 * target
    assert pruned.config.layer_num_attention_heads == structure.attention_units(pruned)
    assert summary["hidden_after"] == hidden_width(pruned)
    assert hidden_width(pruned) < DIM if prune_hidden else hidden_width(pruned) == DIM
    assert any(entry.get("neurons", {}).get("tuned") is not None for entry in summary["tuning"])
    assert torch.isfinite(outputs(pruned, inputs_for("sequence"))).all()


# ----------------------------------------------------------------------------------------------------- onnx
def test_onnx_gives_the_pytorch_logits_and_int8_runs(tmp_path):
    from hf_prune import export_onnx
    from hf_prune.export.onnx import OnnxRuntimeModel, read_export_info

    model = tiny_distilbert(sinusoidal_pos_embds=True)
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    prune_hidden_dims(model, DIMS_GONE)
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    onnx_dir = export_onnx(folder, int8=True)
    assert read_export_info(onnx_dir)["inputs"] == ["input_ids", "attention_mask"]  # no token types
    inputs = batch(3, 9, pad=2)
    torch.testing.assert_close(OnnxRuntimeModel(onnx_dir / "model.onnx")(**inputs).logits, outputs(model, inputs),
                               atol=1e-4, rtol=0)  # fmt: skip
    logits = OnnxRuntimeModel(onnx_dir / "model_int8.onnx")(**inputs).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------- refusals
def test_hidden_dimensions_of_the_masked_lm_are_refused_naming_the_heads_that_can():
    model = tiny_distilbert("mlm")
    with pytest.raises(ValueError, match="vocabulary projector shares its weight") as err:
        prune_hidden_dims(model, [0])
    for name in ("DistilBertModel", "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
                 "DistilBertForQuestionAnswering", "DistilBertForMultipleChoice"):  # fmt: skip
        assert name in str(err.value)
    with pytest.raises(ValueError, match="vocabulary projector shares its weight"):
        prune_to_speedup(model, TinyDataset(16), 1.5, num_samples=16, prune_hidden=True)
    with pytest.raises(ValueError, match="keep at least one"):
        prune_layers(tiny_distilbert(), range(LAYERS))
