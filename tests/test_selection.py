import logging

import pytest
import torch
from utils import TinyDataset, tiny_model, train_args

from hf_prune import PruningArguments, PruningTrainer, structure


def _trainer(tmp_path, model=None, **overrides):
    kwargs = dict(
        pruning_method="magnitude",
        target_sparsity=0.5,
        max_steps=4,
        pruning_frequency=1,
        per_device_train_batch_size=4,
    )
    kwargs.update(overrides)
    return PruningTrainer(
        model=model or tiny_model(seed=0, num_hidden_layers=3),
        args=train_args(tmp_path, **kwargs),
        train_dataset=TinyDataset(32),
    )


def _masked(trainer):
    return {t.name: 1.0 - m.float().mean().item() for t, m in zip(trainer.pruner.targets, trainer.pruner.block_masks)}


def test_nni_seed_example_linear_except_output_layer(tmp_path):
    """NNI: config_list = [{'op_types': ['Linear'], 'sparsity': 0.5}, {'op_names': ['classifier'], 'exclude': True}]"""
    trainer = _trainer(
        tmp_path, pruning_targets=[{"preset": "linear", "sparsity": 0.5}], pruning_exclude=[{"names": ["classifier"]}]
    )
    trainer.train()
    model = trainer.model
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sparsity = _masked(trainer)
    assert set(sparsity) == linears - {"classifier"}
    assert all(v == pytest.approx(0.5) for v in sparsity.values())
    for t in trainer.pruner.targets:
        assert torch.count_nonzero(t.module.weight) == t.module.weight.numel() // 2
    assert torch.count_nonzero(model.classifier.weight) == model.classifier.weight.numel()


def test_per_layer_sparsities_and_layer_selection(tmp_path):
    before = {k: v.clone() for k, v in tiny_model(seed=0, num_hidden_layers=3).state_dict().items()}
    trainer = _trainer(
        tmp_path,
        pruning_targets=[
            {"preset": "attention", "layers": [0], "sparsity": 0.25},
            {"preset": "ffn", "layers": [2], "sparsity": 0.75, "block_shape": [8, 8]},
        ],
    )
    trainer.train()
    sparsity = _masked(trainer)
    layer_of = {n: structure.layer_of(trainer.model, n) for n in sparsity}
    assert {layer_of[n] for n in sparsity} == {0, 2}
    assert all(v == pytest.approx(0.25 if layer_of[n] == 0 else 0.75) for n, v in sparsity.items())
    # layer 1 is untouched by the masks: no zero appears in its weights, yet they trained
    state = trainer.model.state_dict()
    layer1 = [n for n in state if ".layer.1." in n and n.endswith("weight") and "LayerNorm" not in n]
    assert layer1
    for name in layer1:
        w = trainer.model.state_dict()[name]
        assert torch.count_nonzero(w) == w.numel(), name
        assert not torch.equal(w.cpu(), before[name]), f"{name} did not train"


def test_global_mode_reaches_total_sparsity(tmp_path):
    trainer = _trainer(
        tmp_path,
        pruning_targets=[{"preset": "attention"}, {"preset": "ffn"}],
        sparsity_mode="global",
        target_sparsity=0.5,
    )
    trainer.train()
    total = sum(t.module.weight.numel() for t in trainer.pruner.targets)
    removed = sum(int((t.module.weight == 0).sum()) for t in trainer.pruner.targets)
    assert removed == pytest.approx(total * 0.5, rel=0.02)
    per_module = list(_masked(trainer).values())
    assert max(per_module) - min(per_module) > 0  # one ranking: modules end at different sparsities


def test_excluded_module_keeps_every_weight(tmp_path):
    trainer = _trainer(
        tmp_path,
        pruning_targets=[{"preset": "attention"}],
        pruning_exclude=[{"layers": [2]}, {"patterns": [r"attention\.output"]}],
    )
    trainer.train()
    names = [t.name for t in trainer.pruner.targets]
    assert all(structure.layer_of(trainer.model, n) in (0, 1) and "attention.output" not in n for n in names)
    for layer in range(2, len(structure.get_layers(trainer.model))):
        for lin in structure.projections(trainer.model, layer, "attention").values():
            assert torch.count_nonzero(lin.weight) == lin.weight.numel()


def test_selection_logged_once_as_table(tmp_path):
    from transformers.utils import logging as hf_logging

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = hf_logging.get_logger("hf_prune.trainer")
    handler = Grab()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        _trainer(tmp_path, pruning_targets=[{"preset": "attention", "layers": [1]}]).train()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    tables = [r for r in records if "module" in r and "sparsity" in r and "block" in r]
    assert len(tables) == 1
    assert "bert.encoder.layer.1.attention.self.query" in tables[0] and "8x8" in tables[0]


def test_ffn_neuron_layers_from_entries(tmp_path):
    trainer = _trainer(
        tmp_path,
        pruning_method="taylor",
        pruning_target="ffn",
        taylor_iterations=1,
        taylor_interval_steps=2,
        pruning_targets=[{"preset": "ffn", "layers": [1], "sparsity": 0.5}],
    )
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx([0.0, 0.5, 0.0])


def test_entries_from_json_string(tmp_path):
    args = PruningArguments(output_dir=str(tmp_path), pruning_targets='[{"preset": "attention", "sparsity": 0.3}]')
    assert args.pruning_targets == [{"preset": "attention", "sparsity": 0.3}]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"pruning_targets": [{"patterns": ["atention"]}]},
            r"matches no Linear module. Nearest module names: .*attention",
        ),
        ({"pruning_targets": [{"names": ["bert.pooler.dens"]}]}, "Nearest module names: bert.pooler.dense"),
        (
            {"pruning_targets": [{"preset": "attention"}], "pruning_exclude": [{"preset": "attention"}]},
            "removes every module",
        ),
        (
            {
                "pruning_targets": [
                    {"preset": "attention", "sparsity": 0.5},
                    {"preset": "attention", "layers": [0], "sparsity": 0.3},
                ]
            },
            "one sparsity",
        ),
        ({"pruning_targets": [{"preset": "attention", "layers": [7]}]}, "out of range"),
    ],
)
def test_bad_selection_fails_before_training(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_targets": [{"preset": "attention", "sparsity": 1.0}]}, r"outside \[0, 1\)"),
        ({"pruning_targets": [{"sparsity": 0.5}]}, "selects nothing"),
        ({"pruning_targets": [{"preset": "mlp"}]}, "preset"),
        ({"pruning_targets": [{"preset": "attention", "op_types": ["Linear"]}]}, "unknown keys"),
        ({"pruning_exclude": [{"preset": "ffn", "sparsity": 0.2}]}, "unknown keys"),
        ({"sparsity_mode": "total"}, "sparsity_mode"),
    ],
)
def test_bad_entries_in_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningArguments(output_dir=str(tmp_path), **kwargs)


def test_target_entries_in_recipe_stages(tmp_path):
    from hf_prune.pipeline.schema import check_recipe, load_recipe

    text = """
model: builtin:tiny-bert
task: demo
stages:
  - stage: finetune
  - stage: movement
    args:
      pruning_targets:
        - {preset: attention, layers: [0], sparsity: 0.5}
        - {patterns: ['intermediate'], sparsity: 0.3, block_shape: [8, 8]}
      pruning_exclude: [{names: [classifier]}]
      sparsity_mode: global
  - stage: export
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = load_recipe(str(path), output_dir=str(tmp_path / "out"))
    args = recipe.stage_arguments(2)
    assert args.pruning_targets[1] == {"patterns": ["intermediate"], "sparsity": 0.3, "block_shape": [8, 8]}
    assert args.sparsity_mode == "global"
    path.write_text(text.replace("sparsity: 0.3", "sparsity: 1.3"))
    with pytest.raises(ValueError, match=r"Stage 2 \(movement\): pruning_targets\[1\]: sparsity=1.3"):
        check_recipe(load_recipe(str(path), output_dir=str(tmp_path / "out2")))
