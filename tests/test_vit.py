"""Vision Transformers (vit, deit) on tiny configs built in code: heads, MLP neurons, hidden dimensions (the patch
projection's channels, the class token and position embeddings) and whole layers removed physically give the logits
of the masked model, a layer without heads and one without neurons included; exports reload with and without
hf_prune and as ONNX; the training-time pruners and the search take batches of `pixel_values`."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)
from utils import WITHOUT_HF_PRUNE, TinyDataset, mask_removed_units, train_args

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
from hf_prune.models.costs import count_flops, dummy_inputs, unit_costs
from hf_prune.models.hidden import hidden_mask, hidden_width

IMAGE, PATCH, CHANNELS, DIM, LAYERS, HEADS, WIDTH, LABELS = 16, 4, 3, 32, 2, 4, 48, 5
HEADS_GONE = {0: [0, 1, 2, 3], 1: [2]}  # layer 0 keeps no head
NEURONS_GONE = {0: [3, 7, 40], 1: list(range(WIDTH))}  # layer 1 keeps no neuron
DIMS_GONE = [0, 3, 4, 9, 17, 30]


def vit_config(model_type: str = "vit", **overrides):
    kwargs = dict(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=DIM, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=WIDTH, num_labels=LABELS)  # fmt: skip
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_vit(model_type: str = "vit", seed: int = 0, cls=None, **overrides):
    torch.manual_seed(seed)
    cls = cls or {"vit": ViTForImageClassification, "deit": DeiTForImageClassification}[model_type]
    model = cls(vit_config(model_type, **overrides)).eval()
    with torch.no_grad():  # weights larger than the default init, so a wrong cut shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def outputs(model, pixel_values=None):
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=images() if pixel_values is None else pixel_values)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class TinyImages(torch.utils.data.Dataset):
    """Random images whose label is the brightest of five regions of the first channel, so a tiny model can learn
    it; examples are dicts of `pixel_values` and `labels`, as an image processor's output is."""

    def __init__(self, n: int = 64, seed: int = 0):
        self.pixel_values = torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
        per = IMAGE * IMAGE // LABELS  # pixels of one region
        regions = self.pixel_values[:, 0].flatten(1)[:, : LABELS * per].reshape(n, LABELS, per).mean(dim=-1)
        self.labels = regions.argmax(dim=-1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def keep_mask(drop):
    keep = torch.ones(DIM, dtype=torch.bool)
    keep[drop] = False
    return keep


# ----------------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("model_type, attn", [("vit", "eager"), ("vit", "sdpa"), ("deit", "sdpa")])
def test_removing_heads_and_neurons_equals_masking_them(model_type, attn):
    model = tiny_vit(model_type, attn_implementation=attn)
    reference = mask_removed_units(tiny_vit(model_type, attn_implementation=attn), HEADS_GONE, NEURONS_GONE)
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    torch.testing.assert_close(outputs(model), outputs(reference), atol=1e-5, rtol=1e-4)
    assert structure.attention_units(model) == [0, 3] and structure.ffn_size(model) == [WIDTH - 3, 0]
    assert model.config.layer_num_attention_heads == [0, 3] and model.config.layer_intermediate_sizes == [45, 0]
    assert model.config.hf_prune_pruned_heads == {"0": [0, 1, 2, 3], "1": [2]}
    prune_heads(model, {1: [2]})  # indices of the current heads (0, 1, 3): original head 3 goes
    assert model.config.hf_prune_pruned_heads["1"] == [2, 3]


def test_an_empty_layer_is_no_pass_through_and_its_gate_at_zero_is_its_removal():
    from hf_prune.posttrain.fisher import layer_gates

    model = tiny_vit(num_hidden_layers=3)
    assert get_adapter(model).can_drop_layers and not get_adapter(model).empty_layer_is_identity(model)
    emptied = copy.deepcopy(model)
    prune_heads(emptied, {1: list(range(HEADS))})
    prune_ffn_neurons(emptied, {1: list(range(WIDTH))})
    dropped = prune_layers(copy.deepcopy(model), [1])
    assert not torch.allclose(outputs(emptied), outputs(dropped))  # the output projections' biases remain
    gates = torch.ones(3, 3)
    gates[:, 1] = 0.0
    with torch.no_grad(), layer_gates(model, gates):
        gated = model(pixel_values=images()).logits
    torch.testing.assert_close(outputs(dropped), gated)
    assert dropped.config.num_hidden_layers == 2 and dropped.config.hf_prune_kept_layers == [0, 2]
    with pytest.raises(ValueError, match="keep at least one"):
        prune_layers(dropped, [0, 1])


# ----------------------------------------------------------------------------------------------------- hidden
# DeiT's classifiers of the class and the distillation token; the base model's pooler
@pytest.mark.parametrize("model_type, cls", [("vit", None), ("deit", DeiTForImageClassificationWithTeacher),
                                             ("vit", ViTModel)])  # fmt: skip
def test_removing_hidden_dimensions_equals_masking_them(model_type, cls):
    model = tiny_vit(model_type, cls=cls)
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    with hidden_mask(model, keep_mask(DIMS_GONE)):
        masked = outputs(model)
    pruned = prune_hidden_dims(copy.deepcopy(model), DIMS_GONE)
    got = outputs(pruned)
    if cls is ViTModel:  # the stream itself: the pruned model has the kept dimensions only
        masked = masked[..., keep_mask(DIMS_GONE)]
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)
    embeddings = pruned.base_model.embeddings
    assert embeddings.patch_embeddings.projection.out_channels == DIM - len(DIMS_GONE) == hidden_width(pruned)
    assert embeddings.cls_token.shape[-1] == embeddings.position_embeddings.shape[-1] == DIM - len(DIMS_GONE)
    assert pruned.config.hf_prune_hidden_kept == [d for d in range(DIM) if d not in DIMS_GONE]


# ----------------------------------------------------------------------------------------------------- exports
def outputs_without_hf_prune(folders, pixel_values) -> list[tuple[str, torch.Tensor]]:
    """Per export, the module of the class `AutoModelForImageClassification` loaded it with (remote code) and its
    logits, in one fresh interpreter where `import hf_prune` fails."""
    script = WITHOUT_HF_PRUNE + f"""
import torch
from transformers import AutoModelForImageClassification
found = []
for folder in {[str(f) for f in folders]!r}:
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.tensor({pixel_values.tolist()})).logits
    found.append([type(model).__module__, out.tolist()])
print(json.dumps(found))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return [(module, torch.tensor(out)) for module, out in json.loads(run.stdout.strip().splitlines()[-1])]


def test_pruned_models_save_and_reload_with_and_without_hf_prune(tmp_path):
    folders, expected = [], []
    for model_type in ("vit", "deit"):
        model = tiny_vit(model_type, num_hidden_layers=3)
        prune_heads(model, HEADS_GONE)
        prune_ffn_neurons(model, NEURONS_GONE)
        prune_hidden_dims(model, DIMS_GONE)
        prune_layers(model, [2])  # after the hidden cut: the modules it rebuilds are renamed to the layers left
        folder = save_pruned(model, tmp_path / model_type, card=model_type == "vit", figure=False)
        config = json.loads((folder / "config.json").read_text())
        name = type(model).__name__
        assert config["auto_map"]["AutoModelForImageClassification"] == f"modeling_hf_prune.Pruned{name}"
        assert config["layer_num_attention_heads"] == [0, 3] and config["num_hidden_layers"] == 2
        torch.testing.assert_close(outputs(load_pruned(folder)), outputs(model))
        folders.append(folder)
        expected.append(outputs(model))
    assert "AutoModelForImageClassification" in (folders[0] / "README.md").read_text()
    for (module, got), want in zip(outputs_without_hf_prune(folders, images()), expected):
        assert module.startswith("transformers_modules."), module  # the export's own modeling file
        torch.testing.assert_close(got, want)


def test_onnx_gives_the_pytorch_logits_and_int8_runs(tmp_path):
    from hf_prune import export_onnx
    from hf_prune.export.onnx import OnnxRuntimeModel, read_export_info

    model = tiny_vit()
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    prune_hidden_dims(model, DIMS_GONE)
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    onnx_dir = export_onnx(folder)
    info = read_export_info(onnx_dir)
    assert info["inputs"] == ["pixel_values"] and info["dynamic_axes"]["pixel_values"] == {"0": "batch"}
    pixel_values = images(5, seed=3)  # another batch size than the traced one
    runner = OnnxRuntimeModel(onnx_dir / "model.onnx")
    torch.testing.assert_close(runner(pixel_values=pixel_values).logits, outputs(model, pixel_values), atol=1e-4,
                               rtol=0)  # fmt: skip
    export_onnx(folder, int8=True)
    int8 = OnnxRuntimeModel(onnx_dir / "model_int8.onnx")(pixel_values=pixel_values).logits
    assert int8.shape == (5, LABELS) and torch.isfinite(int8).all()
    with pytest.raises(ValueError, match="pixel_values not given"):
        runner(input_ids=torch.ones(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------- costs
def test_the_cost_model_counts_the_fixed_patches_exactly():
    model = tiny_vit()
    assert set(dummy_inputs(model, 2, 7)) == {"pixel_values"}
    assert count_flops(model, 16) == count_flops(model, 128)  # the patches, not a sequence length, set the size
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16) and costs.heads == [HEADS] * LAYERS
    prune_heads(model, HEADS_GONE)
    prune_ffn_neurons(model, NEURONS_GONE)
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == count_flops(model, 16)
    assert costs.flops(dropped=[1]) == count_flops(prune_layers(tiny_vit(), [1]), 16)


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("config", [
    {"pruning_target": "ffn", "target_sparsity": 0.5},
    {"pruning_target": "heads_and_ffn", "target_speedup": 1.5},
])  # fmt: skip
def test_the_training_time_pruners_mask_then_remove_units(tmp_path, config):
    args = dict(pruning_method="taylor", taylor_iterations=2, taylor_interval_steps=3, max_steps=8,
                pruning_warmup_steps=1, pruning_cooldown_steps=2, pruning_frequency=1, learning_rate=5e-3,
                **config)  # fmt: skip
    trainer = PruningTrainer(model=tiny_vit(), args=train_args(tmp_path, **args), train_dataset=TinyImages(64))
    trainer.train()
    before = outputs(trainer.model)
    summary = trainer.prune()
    assert summary["params_after"] < summary["params_before"]
    torch.testing.assert_close(outputs(trainer.model), before, atol=1e-5, rtol=1e-4)
    assert trainer.model.config.layer_intermediate_sizes == structure.ffn_size(trainer.model)


def test_training_with_a_hidden_mask_then_prune_changes_no_output(tmp_path):
    args = train_args(tmp_path, pruning_method="taylor", pruning_target="hidden", target_sparsity=0.25,
                      taylor_iterations=2, taylor_interval_steps=2, max_steps=6, pruning_warmup_steps=1,
                      pruning_cooldown_steps=1, pruning_frequency=1)  # fmt: skip
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages(64))
    trainer.train()
    masked = outputs(trainer.model)
    summary = trainer.prune()
    assert summary["hidden_after"] == hidden_width(trainer.model) == DIM * 3 // 4
    assert trainer.model.vit.embeddings.position_embeddings.shape[-1] == DIM * 3 // 4
    torch.testing.assert_close(outputs(trainer.model), masked, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("prune_hidden", [False, True])
def test_prune_to_speedup_reaches_the_target(prune_hidden, tmp_path):
    model = tiny_vit()
    dense = count_flops(model, 16)
    pruned, summary = prune_to_speedup(model, TinyImages(64), 1.6, num_samples=64, seq_len=16, tune_samples=64,
                                       batch_size=16, prune_hidden=prune_hidden)  # fmt: skip
    assert 1.6 <= dense / count_flops(pruned, 16) <= 1.02 * 1.6
    assert pruned.config.layer_num_attention_heads == structure.attention_units(pruned)
    assert summary["hidden_after"] == hidden_width(pruned) and summary["tuning"]
    assert torch.isfinite(outputs(pruned)).all()
    torch.testing.assert_close(outputs(load_pruned(save_pruned(pruned, tmp_path / "out", figure=False))),
                               outputs(pruned))  # fmt: skip


def test_activation_importance_and_layer_importance_read_every_patch():
    from hf_prune.posttrain.importance import activation_importance, layer_importance
    from hf_prune.posttrain.samples import pad_collate

    model, data = tiny_vit(), TinyImages(8)
    batches = [pad_collate(0)([data[i] for i in range(8)])]
    assert batches[0]["pixel_values"].shape == (8, CHANNELS, IMAGE, IMAGE)
    heads, neurons = activation_importance(model, batches)
    assert [h.shape[0] for h in heads] == [HEADS] * LAYERS and all(bool((h > 0).all()) for h in heads)
    assert layer_importance(model, batches, "loss").shape == (LAYERS,)


# ----------------------------------------------------------------------------------------------------- refusals
def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="image classification"):
        prune_hidden_dims(tiny_vit(cls=ViTForMaskedImageModeling), [0])

    class Unprocessed(TinyImages):
        def __getitem__(self, i):
            return {"image": self.pixel_values[i], "labels": self.labels[i]}

    with pytest.raises(ValueError, match="no `pixel_values` column.*run the image processor"):
        prune_to_speedup(tiny_vit(), Unprocessed(16), 1.5, num_samples=16, tune=False)
    with pytest.raises(ValueError, match="no `pixel_values` column"):  # token inputs for an image model
        prune_to_speedup(tiny_vit(), TinyDataset(16), 1.5, num_samples=16, tune=False)
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(tiny_vit(), {0: [HEADS]})
