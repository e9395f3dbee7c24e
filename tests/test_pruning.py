import pytest
import torch
from transformers import TrainerCallback
from utils import TinyDataset, batch, tiny_model, train_args

from hf_prune import PruningArguments, PruningTrainer, structure
from hf_prune.pruning.masks import cubic_sparsity


def _eval_logits(model):
    model.eval()
    with torch.no_grad():
        return model(**batch(pad=2)).logits


class SparsityRecorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.history = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        # runs after the pruning callback (registered first) updated the masks for this step
        self.history[state.global_step] = self.trainer.pruner.sparsity()


def _movement_trainer(tmp_path, data=None, **overrides):
    kwargs = dict(
        pruning_method="movement",
        pruning_target="attention",
        target_sparsity=0.5,
        max_steps=20,
        pruning_warmup_steps=2,
        pruning_cooldown_steps=4,
        pruning_frequency=2,
        weight_decay=0.1,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
    )
    kwargs.update(overrides)
    return PruningTrainer(
        model=tiny_model(seed=0), args=train_args(tmp_path, **kwargs), train_dataset=data or TinyDataset(64)
    )


def test_block_masks_forecast_what_prune_removes(tmp_path, caplog):
    """Only heads masked in all of Q/K/V/O are removed: the forecast says how much of the masked weights that is and
    the FLOPs ratio it gives, both equal to what prune() then does."""
    from hf_prune.models.costs import count_flops

    trainer = _movement_trainer(tmp_path, target_sparsity=0.9, sparsity_mode="global", speedup_seq_len=16)
    dense_flops = count_flops(trainer.model, 16)
    with caplog.at_level("WARNING", logger="hf_prune.trainer"):
        trainer.train()
    assert "Block masks give a speedup only where they empty whole heads" in caplog.text
    assert "prune() will remove" in caplog.text and "Expected FLOPs ratio after prune()" in caplog.text
    forecast = trainer.removal_forecast()
    masked = sum(int((~m).sum()) for m in trainer.pruner.element_masks())
    assert forecast["masked_weights"] == masked
    assert forecast["heads_removed"] > 0 and 0 < forecast["removable_share"] < 1
    summary = trainer.prune()
    removed_heads = sum(len(v) for v in summary["pruned_heads"].values())
    assert removed_heads == forecast["heads_removed"]
    # the weights prune() removed are the forecast ones, plus the Q/K/V biases of the removed heads (8 each)
    assert summary["params_before"] - summary["params_after"] == forecast["removable_weights"] + 3 * 8 * removed_heads
    assert forecast["removable_share"] == pytest.approx(forecast["removable_weights"] / masked)
    assert forecast["expected_flops_ratio"] == pytest.approx(dense_flops / count_flops(trainer.model, 16))


def test_movement_follows_cubic_schedule_and_zeroes_weights(tmp_path):
    trainer = _movement_trainer(tmp_path)
    rec = SparsityRecorder(trainer)
    trainer.add_callback(rec)
    trainer.train()
    blocks = 16  # 32x32 weights in 8x8 blocks (one head's width)
    for step, sparsities in rec.history.items():
        last_update = max([s for s in range(step + 1) if trainer.pruner.schedule.fraction(s) is not None], default=0)
        expected = round(cubic_sparsity(last_update, 20, 0.5, 2, 4) * blocks) / blocks if last_update else 0.0
        assert sparsities == pytest.approx([expected] * len(sparsities)), step
    assert trainer.pruner.sparsity() == pytest.approx([0.5] * 8)
    for target, mask in zip(trainer.pruner.targets, trainer.pruner.element_masks()):
        w = target.module.weight
        assert torch.count_nonzero(w[~mask]) == 0
        assert torch.count_nonzero(w[mask]) == mask.sum()  # kept weights still train


def test_magnitude_uses_same_machinery(tmp_path):
    trainer = _movement_trainer(tmp_path, pruning_method="magnitude", target_sparsity=0.25)
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx([0.25] * 8)


def test_head_masks_and_prune_keep_logits(tmp_path):
    trainer = _movement_trainer(tmp_path, target_sparsity=0.9, pruning_cooldown_steps=2)
    trainer.train()
    heads = trainer.head_masks()
    assert heads, "at 90% block sparsity some heads lose every block"
    expected = _eval_logits(trainer.model)
    summary = trainer.prune()
    assert summary["heads_after"] == [4 - len(heads.get(i, [])) for i in range(2)]
    assert summary["params_after"] < summary["params_before"]
    assert structure.num_heads(trainer.model) == summary["heads_after"]
    torch.testing.assert_close(_eval_logits(trainer.model), expected, atol=1e-5, rtol=1e-5)
    trainer.train()  # trains on without pruning, with a new optimizer on the smaller weights


def _taylor_args(tmp_path, **overrides):
    kwargs = dict(
        pruning_method="taylor",
        pruning_target="ffn",
        target_sparsity=0.5,
        taylor_iterations=3,
        taylor_interval_steps=3,
        max_steps=12,
        per_device_train_batch_size=4,
    )
    kwargs.update(overrides)
    return train_args(tmp_path, **kwargs)


def test_taylor_gradual_ffn_pruning(tmp_path):
    trainer = PruningTrainer(model=tiny_model(seed=0), args=_taylor_args(tmp_path), train_dataset=TinyDataset(64))
    rec = SparsityRecorder(trainer)
    trainer.add_callback(rec)
    trainer.train()
    assert rec.history[2] == [0.0, 0.0]
    # three equal iterations towards 0.5 of 48 neurons: 8, 16, then 24 removed, each after training in between
    assert rec.history[3] == rec.history[5] == pytest.approx([8 / 48] * 2)
    assert rec.history[6] == pytest.approx([16 / 48] * 2)
    assert rec.history[9] == rec.history[12] == pytest.approx([24 / 48] * 2)
    assert trainer.pruner.sparsity() == pytest.approx([0.5, 0.5])
    expected = _eval_logits(trainer.model)
    summary = trainer.prune()
    assert summary["ffn_after"] == [24, 24]
    torch.testing.assert_close(_eval_logits(trainer.model), expected, atol=1e-5, rtol=1e-5)


def test_ffn_sparsity_rules(tmp_path):
    from hf_prune import prune_heads

    model = tiny_model(seed=0)
    prune_heads(model, {0: [0, 1]})
    args = _taylor_args(tmp_path, ffn_sparsity_rule="heads", taylor_iterations=1)
    trainer = PruningTrainer(model=model, args=args, train_dataset=TinyDataset(64))
    assert trainer.pruner.layer_sparsities == pytest.approx([1 - 0.5 * 0.5, 1 - 1.0 * 0.5])
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx([36 / 48, 24 / 48])

    args = _taylor_args(tmp_path / "g", ffn_sparsity_rule="global", target_sparsity=0.25, taylor_iterations=1)
    trainer = PruningTrainer(model=tiny_model(seed=0), args=args, train_dataset=TinyDataset(64))
    trainer.train()
    assert sum(int((~m).sum()) for m in trainer.pruner.masks) == 24


def _final_masks(trainer):
    return [m.clone() for m in trainer.pruner.block_masks]


def test_resume_gives_same_masks(tmp_path):
    overrides = dict(save_strategy="steps", save_steps=6, max_steps=18)
    full = _movement_trainer(tmp_path / "full", **overrides)
    full.train()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 9:
                control.should_training_stop = True

    interrupted = _movement_trainer(tmp_path / "cut", **overrides)
    interrupted.add_callback(StopAt())
    interrupted.train()
    assert (tmp_path / "cut" / "checkpoint-6" / "pruning_state.safetensors").is_file()

    resumed = _movement_trainer(tmp_path / "cut", **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-6"))
    for a, b in zip(_final_masks(full), _final_masks(resumed)):
        assert torch.equal(a, b)
    for name, w in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], w, atol=1e-6, rtol=1e-5)


def test_checkpoints_hold_the_pruning_state_when_the_run_dies_right_after_them(tmp_path):
    """A crash after the Trainer wrote a checkpoint (here: in an `on_save` callback) must not leave a checkpoint
    without masks; resuming from it gives the masks of an uninterrupted run, and a checkpoint without them is
    refused."""
    overrides = dict(save_strategy="steps", save_steps=6, max_steps=12)
    full = _movement_trainer(tmp_path / "full", **overrides)
    full.train()

    class Crash(Exception):
        pass

    class CrashOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Crash(f"killed after checkpoint-{state.global_step}")

    dying = _movement_trainer(tmp_path / "cut", **overrides)
    dying.callback_handler.callbacks.insert(0, CrashOnSave())  # before any other callback hears of the save
    with pytest.raises(Crash):
        dying.train()
    checkpoint = tmp_path / "cut" / "checkpoint-6"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "pruning_state.safetensors").is_file()
    assert not list(checkpoint.glob("*.tmp"))
    resumed = _movement_trainer(tmp_path / "cut", **overrides)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint
    for a, b in zip(_final_masks(full), _final_masks(resumed)):
        assert torch.equal(a, b)
    (checkpoint / "pruning_state.safetensors").unlink()
    again = _movement_trainer(tmp_path / "cut", **overrides)
    with pytest.raises(ValueError, match="holds no pruning state.*resume_from_checkpoint=None"):
        again.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_method": "movement", "target_sparsity": 1.0}, "target_sparsity"),
        ({"pruning_method": "movement", "target_sparsity": -0.1}, "target_sparsity"),
        ({"pruning_method": "prune-everything"}, "pruning_method"),
        ({"pruning_method": "taylor", "pruning_target": "attention"}, "pruning_target='ffn'"),
        ({"pruning_method": "movement", "pruning_target": "mlp"}, "pruning_target"),
        ({"block_shape": [0, 4]}, "block_shape"),
    ],
)
def test_bad_pruning_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningArguments(output_dir=str(tmp_path), **kwargs)


def test_block_shape_that_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="does not divide"):
        _movement_trainer(tmp_path, block_shape=[5, 5])


def test_unknown_model_type_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Supported model types"):
        PruningTrainer(model=model, args=train_args(tmp_path, pruning_method="movement"), train_dataset=TinyDataset(8))


def test_no_target_left(tmp_path):
    from hf_prune import prune_heads

    model = tiny_model()
    prune_heads(model, {0: range(4), 1: range(4)})
    with pytest.raises(ValueError, match="matches no module"):
        PruningTrainer(model=model, args=train_args(tmp_path, pruning_method="movement"), train_dataset=TinyDataset(8))


def test_head_masks_without_pruning_is_an_error(tmp_path):
    trainer = PruningTrainer(model=tiny_model(), args=train_args(tmp_path), train_dataset=TinyDataset(8))
    with pytest.raises(ValueError, match="pruning_method"):
        trainer.head_masks()


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_head_granularity_masks_whole_heads(tmp_path, mode):
    trainer = _movement_trainer(tmp_path, attention_granularity="head", target_sparsity=0.5, sparsity_mode=mode)
    trainer.train()
    heads = trainer.head_masks()
    assert sum(map(len, heads.values())) == 4  # half of 2 x 4 heads
    if mode == "per_layer":
        assert {k: len(v) for k, v in heads.items()} == {0: 2, 1: 2}
    expected = _eval_logits(trainer.model)
    summary = trainer.prune()
    assert sum(summary["heads_after"]) == 4
    torch.testing.assert_close(_eval_logits(trainer.model), expected, atol=1e-5, rtol=1e-5)


def test_head_granularity_resumes(tmp_path):
    overrides = dict(save_strategy="steps", save_steps=6, max_steps=12, attention_granularity="head")
    full = _movement_trainer(tmp_path / "full", **overrides)
    full.train()
    resumed = _movement_trainer(tmp_path / "full", **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert full.head_masks() == resumed.head_masks()
    for a, b in zip(full.pruner.masks, resumed.pruner.masks):
        assert torch.equal(a, b)


def test_pruning_loss_is_correct_under_gradient_accumulation(tmp_path):
    runs = []
    for bs, ga in ((8, 1), (4, 2)):
        trainer = _movement_trainer(
            tmp_path / f"ga{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=6,
            weight_decay=0.0,
        )
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-5, rtol=1e-4)
