"""Hidden-dimension pruning of the BERT family: masked equals pruned (alone and with heads, neurons and a layer left
without heads), save and reload with and without hf_prune, the heads that read the stream, refusals."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification
from utils import WITHOUT_HF_PRUNE, TinyDataset, batch, tiny_config, tiny_model

from hf_prune import load_pruned, prune_ffn_neurons, prune_heads, prune_hidden_dims, prune_to_speedup, save_pruned
from hf_prune.export.persistence import standalone_source
from hf_prune.models.bert import modeling_hf_prune
from hf_prune.models.costs import count_flops
from hf_prune.models.hidden import HIDDEN_KEY, hidden_mask, hidden_width, masked_layer_norm
from hf_prune.posttrain.mask_tuning import tune_masks
from hf_prune.posttrain.samples import pad_collate
from hf_prune.posttrain.width import candidate_widths

DROP = [0, 3, 4, 9, 17, 30]


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.start_logits


def keep_mask(width, drop):
    keep = torch.ones(width, dtype=torch.bool)
    keep[drop] = False
    return keep


def test_masked_layer_norm_is_a_layer_norm_of_the_kept_dimensions():
    x, w, b = torch.randn(3, 5, 8), torch.randn(8), torch.randn(8)
    keep = keep_mask(8, [1, 6])
    out = masked_layer_norm(x, keep, w, b, 1e-5)
    ref = torch.nn.functional.layer_norm(x[..., keep], (6,), w[keep], b[keep], 1e-5)
    torch.testing.assert_close(out[..., keep], ref)
    assert (out[..., ~keep] == 0).all()


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_removing_hidden_dimensions_equals_masking_them(arch):
    overrides = {"embedding_size": 16} if arch == "electra" else {}  # ELECTRA's projected embeddings
    model = tiny_model(arch, **overrides).eval()
    inputs = batch(pad=3)
    with hidden_mask(model, keep_mask(32, DROP)):
        masked = outputs(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DROP)
    torch.testing.assert_close(outputs(pruned, inputs), masked, rtol=1e-5, atol=1e-5)
    assert hidden_width(pruned) == 32 - len(DROP) and pruned.config.hidden_size == 32
    assert pruned.config.hf_prune_hidden_kept == [d for d in range(32) if d not in DROP]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("head", ["token", "qa"])
def test_heads_that_read_the_stream_lose_the_same_columns(head):
    torch.manual_seed(0)
    cls = AutoModelForTokenClassification if head == "token" else AutoModelForQuestionAnswering
    model = cls.from_config(tiny_config("bert", num_labels=2 if head == "qa" else 3)).eval()
    inputs = batch()
    with hidden_mask(model, keep_mask(32, DROP)):
        masked = outputs(model, inputs)
    torch.testing.assert_close(outputs(prune_hidden_dims(copy.deepcopy(model), DROP), inputs), masked)


def test_hidden_dimensions_with_heads_neurons_and_a_layer_without_heads(tmp_path):
    model = tiny_model("bert").eval()
    prune_heads(model, {0: [0, 1, 2, 3], 1: [2]})
    prune_ffn_neurons(model, {1: list(range(10))})
    inputs = batch(pad=2)
    with hidden_mask(model, keep_mask(32, DROP)):
        masked = outputs(model, inputs)
    pruned = prune_hidden_dims(copy.deepcopy(model), DROP)
    prune_hidden_dims(pruned, [0, 1])  # a second cut: indices of the current dimensions
    again = keep_mask(32, DROP)
    again[again.nonzero().flatten()[:2]] = False
    with hidden_mask(model, again):
        torch.testing.assert_close(outputs(pruned, inputs), outputs(model, inputs), rtol=1e-5, atol=1e-5)
    assert pruned.config.hf_prune_hidden_kept == again.nonzero().flatten().tolist()
    assert masked.shape == outputs(pruned, inputs).shape

    save_pruned(pruned, tmp_path / "out")
    torch.testing.assert_close(outputs(load_pruned(tmp_path / "out"), inputs), outputs(pruned, inputs))
    # a fresh interpreter without hf_prune: transformers and the remote-code file alone
    script = WITHOUT_HF_PRUNE + f"""
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor({inputs["input_ids"].tolist()}),
                attention_mask=torch.tensor({inputs["attention_mask"].tolist()})).logits
print(json.dumps(out.tolist()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), outputs(pruned, inputs))


def test_the_remote_code_file_reads_the_key_hf_prune_writes():
    namespace = {}
    exec(compile(standalone_source(modeling_hf_prune), "modeling_hf_prune.py", "exec"), namespace)
    assert namespace["HIDDEN_KEY"] == HIDDEN_KEY


def test_bad_hidden_dimensions_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="out of range"):
        prune_hidden_dims(model, [32])
    with pytest.raises(ValueError, match="keep at least one"):
        prune_hidden_dims(model, range(32))
    from transformers import AutoModelForMaskedLM

    with pytest.raises(ValueError, match="head is not one hf_prune knows"):
        prune_hidden_dims(AutoModelForMaskedLM.from_config(tiny_config("bert")), [0])
    from test_llama import tiny_decoder

    from hf_prune.models.adapter import ArchitectureAdapter

    # a family whose adapter does not list its stream (the base class) is refused with the fix named
    with pytest.raises(ValueError, match="cannot be pruned yet"):
        ArchitectureAdapter().hidden_modules(tiny_decoder("mistral"))


@pytest.mark.parametrize("arch", ["bert", "electra"])
def test_onnx_of_a_model_with_fewer_hidden_dimensions_gives_its_logits(arch, tmp_path):
    from hf_prune import export_onnx
    from hf_prune.export.onnx import OnnxRuntimeModel

    model = tiny_model(arch, **({"embedding_size": 16} if arch == "electra" else {})).eval()
    prune_heads(model, {0: [1]})
    prune_hidden_dims(model, DROP)
    folder = save_pruned(model, tmp_path / arch, card=False, figure=False)
    runner = OnnxRuntimeModel(export_onnx(folder) / "model.onnx")
    inputs = batch(3, 9, pad=2)
    torch.testing.assert_close(runner(**inputs).logits, outputs(model, inputs), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------- search
def test_the_search_narrows_the_stream_where_it_loses_less_and_reaches_the_target(monkeypatch, tmp_path):
    import hf_prune.posttrain.search as search

    model = tiny_model("bert").eval()
    real = search.mask_fisher

    def mask_fisher(grads):  # the hidden dimensions' Fisher (one (examples, hidden) tensor) made nearly free
        scores = real(grads)
        return [s * 1e-6 for s in scores] if len(grads) == 1 and grads[0].shape[1] == 32 else scores

    monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    pruned, summary = prune_to_speedup(model, TinyDataset(64), 2.0, num_samples=64, seq_len=12, tune_samples=64,
                                       batch_size=16, prune_hidden=True)  # fmt: skip
    assert summary["hidden_before"] == 32 and summary["hidden_after"] == hidden_width(pruned) < 32
    ratio = count_flops(model, 12) / count_flops(pruned, 12)
    assert 2.0 <= ratio <= 2.0 * 1.02 + 1e-9 and summary["predicted_speedup"] == pytest.approx(ratio)
    save_pruned(pruned, tmp_path / "out")
    inputs = batch()
    torch.testing.assert_close(outputs(load_pruned(tmp_path / "out"), inputs), outputs(pruned, inputs))


def test_the_search_keeps_the_full_width_when_dimensions_cost_more_than_units(monkeypatch):
    import hf_prune.posttrain.search as search

    model = tiny_model("bert").eval()
    _, plain = prune_to_speedup(model, TinyDataset(64), 1.3, num_samples=64, seq_len=12, tune=False, batch_size=16)
    real = search.mask_fisher

    def mask_fisher(grads):  # every hidden dimension far more important than any unit
        scores = real(grads)
        return [s * 0 + 1e9 for s in scores] if len(grads) == 1 and grads[0].shape[1] == 32 else scores

    monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    _, summary = prune_to_speedup(model, TinyDataset(64), 1.3, num_samples=64, seq_len=12, tune=False, batch_size=16,
                                  prune_hidden=True)  # fmt: skip
    assert summary["hidden_after"] == 32
    assert summary["heads_after"] == plain["heads_after"] and summary["ffn_after"] == plain["ffn_after"]


def test_the_search_records_every_width_it_weighed_and_a_fixed_width_is_kept(monkeypatch):
    import hf_prune.posttrain.search as search

    model = tiny_model("bert").eval()
    real = search.mask_fisher

    def mask_fisher(grads):  # every hidden dimension far more important than any unit: the search keeps them all
        scores = real(grads)
        return [s * 0 + 1e9 for s in scores] if len(grads) == 1 and grads[0].shape[1] == 32 else scores

    monkeypatch.setattr(search, "mask_fisher", mask_fisher)
    kwargs = dict(num_samples=64, seq_len=12, tune=False, batch_size=16, prune_hidden=True)
    _, summary = prune_to_speedup(model, TinyDataset(64), 1.3, **kwargs)
    (searched,) = summary["structure_search"]
    weighed = [c for c in searched["candidates"] if "skipped" not in c]
    assert searched["goal"] == 1.3 and [c["width"] for c in searched["candidates"]] == candidate_widths(32)
    full = next(c for c in weighed if c["width"] == 32)
    assert full["structure_loss"] == 0.0 and full["heads"] == sum(summary["heads_after"])
    # the full width won because every narrower candidate's estimate is higher: the dimensions' 1e9 each
    assert all(c["loss"] > full["loss"] and c["structure_loss"] == 1e9 * (32 - c["width"]) for c in weighed[1:])
    assert all(c["loss"] == pytest.approx(c["unit_loss"] + c["structure_loss"]) for c in weighed)
    # a fixed width is taken whatever it loses, and the units fill what is left of the target
    pruned, fixed = prune_to_speedup(model, TinyDataset(64), 1.3, hidden_widths=[24], **kwargs)
    assert fixed["hidden_after"] == hidden_width(pruned) == 24
    assert [c["width"] for c in fixed["structure_search"][0]["candidates"]] == [24]
    assert sum(fixed["ffn_after"]) > sum(summary["ffn_after"])  # the narrower stream leaves more for neurons
    ratio = count_flops(model, 12) / count_flops(pruned, 12)
    assert 1.3 <= ratio <= 1.3 * 1.02 + 1e-9


def test_widths_are_checked():
    with pytest.raises(ValueError, match="pass prune_hidden=True"):
        prune_to_speedup(tiny_model("bert"), TinyDataset(16), 1.5, num_samples=16, hidden_widths=[16])
    for bad in ([], [0], [33], [16.5]):
        with pytest.raises(ValueError, match="integer widths from 1 to the model's residual width"):
            prune_to_speedup(tiny_model("bert"), TinyDataset(16), 1.5, num_samples=16, prune_hidden=True,
                             hidden_widths=bad)  # fmt: skip


def test_tuning_with_every_dimension_kept_is_the_tuning_without_hidden_masks():

    dense = tiny_model("bert").eval()
    data = TinyDataset(32)
    batches = [pad_collate(0)([data[i] for i in range(j, j + 8)]) for j in range(0, 32, 8)]
    keep_heads = [torch.tensor([True, False, True, True])] * 2
    keep_neurons = [torch.arange(48) % 3 != 0] * 2
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    tune_masks(a, dense, batches, keep_heads, keep_neurons, True)
    tune_masks(b, dense, batches, keep_heads, keep_neurons, True, keep_hidden=torch.ones(32, dtype=torch.bool))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=name)


def test_hidden_search_refusals():

    with pytest.raises(ValueError, match="importance='fisher'"):
        prune_to_speedup(tiny_model("bert"), TinyDataset(16), 1.5, num_samples=16, prune_hidden=True,
                         importance="activation")  # fmt: skip
    with pytest.raises(ValueError, match="uniform=False"):
        prune_to_speedup(tiny_model("bert"), TinyDataset(16), 1.5, num_samples=16, prune_hidden=True, uniform=True)


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["taylor", "movement", "magnitude"])
def test_training_with_a_hidden_mask_then_prune_changes_no_output(method, tmp_path):
    from utils import train_args

    from hf_prune import PruningTrainer

    args = train_args(tmp_path, pruning_method=method, pruning_target="hidden", target_sparsity=0.25,
                      taylor_iterations=2, taylor_interval_steps=2, max_steps=6, per_device_train_batch_size=8,
                      pruning_warmup_steps=1, pruning_cooldown_steps=1, pruning_frequency=1)  # fmt: skip
    trainer = PruningTrainer(model=tiny_model("bert"), args=args, train_dataset=TinyDataset(64))
    trainer.train()
    assert trainer.pruner.sparsity() == [0.25]
    inputs = batch(pad=2)
    masked = outputs(trainer.model, inputs)
    summary = trainer.prune()
    assert summary["pruned_hidden_dims"] == 8 and summary["hidden_after"] == hidden_width(trainer.model) == 24
    torch.testing.assert_close(outputs(trainer.model, inputs), masked, rtol=1e-5, atol=1e-5)
    save_pruned(trainer.model, tmp_path / "out")
    torch.testing.assert_close(outputs(load_pruned(tmp_path / "out"), inputs), masked, rtol=1e-5, atol=1e-5)
    trainer.train()  # trains on at the new width


def test_hidden_pruning_resumes_with_the_same_mask(tmp_path):
    from transformers import TrainerCallback
    from utils import train_args

    from hf_prune import PruningTrainer

    def trainer_at(folder):
        args = train_args(folder, pruning_method="taylor", pruning_target="hidden", target_sparsity=0.25,
                          taylor_iterations=3, taylor_interval_steps=3, max_steps=12, per_device_train_batch_size=8,
                          save_strategy="steps", save_steps=4)  # fmt: skip
        return PruningTrainer(model=tiny_model("bert"), args=args, train_dataset=TinyDataset(64))

    full = trainer_at(tmp_path / "full")
    full.train()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    cut = trainer_at(tmp_path / "cut")
    cut.add_callback(StopAt())
    cut.train()
    resumed = trainer_at(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    assert torch.equal(full.pruner.mask, resumed.pruner.mask) and not bool(full.pruner.mask.all())
