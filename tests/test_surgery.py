import random

import pytest
import torch
from utils import TinyDataset, batch, tiny_model, train_args

from hf_prune import PruningTrainer, prune_ffn_neurons, prune_heads, structure

ARCHS = ["bert", "roberta", "xlm-roberta", "electra"]


def mask_heads(model, heads):
    """Zeroes the heads' Q/K/V rows and attention-output columns: the masked (not removed) equivalent."""
    size = structure.head_size(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            lin = structure.projections(model, layer, "attention")
            for h in hs:
                for role in ("query", "key", "value"):
                    lin[role].weight[h * size : (h + 1) * size] = 0
                    lin[role].bias[h * size : (h + 1) * size] = 0
                lin["attention_output"].weight[:, h * size : (h + 1) * size] = 0


def mask_neurons(model, neurons):
    with torch.no_grad():
        for layer, idx in neurons.items():
            lin = structure.projections(model, layer, "mlp")
            lin["ffn_in"].weight[idx] = 0
            lin["ffn_in"].bias[idx] = 0
            lin["ffn_out"].weight[:, idx] = 0


def logits(model, **kw):
    model.eval()
    with torch.no_grad():
        return model(**batch(pad=3, **kw)).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_equals_pruned_heads_and_neurons(arch, attn):
    rng = random.Random(hash((arch, attn)) % 1000)
    model = tiny_model(arch, seed=3, attn_implementation=attn, num_hidden_layers=3)
    heads = {0: rng.sample(range(4), 2), 1: list(range(4)), 2: [rng.randrange(4)]}
    neurons = {0: rng.sample(range(48), 20), 2: rng.sample(range(48), 47)}
    mask_heads(model, heads)
    mask_neurons(model, neurons)
    expected = logits(model)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    assert structure.num_heads(model) == [2, 0, 3]
    assert structure.ffn_size(model) == [28, 48, 1]
    assert model.config.layer_num_attention_heads == [2, 0, 3]
    assert model.config.layer_intermediate_sizes == [28, 48, 1]
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_all_neurons_of_a_layer_and_repeated_pruning():
    model = tiny_model(seed=4)
    mask_neurons(model, {1: list(range(48))})
    mask_heads(model, {0: [1, 3]})
    expected = logits(model)
    prune_ffn_neurons(model, {1: list(range(48))})
    prune_heads(model, {0: [1]})
    prune_heads(model, {0: [2]})  # current index 2 is original head 3
    assert model.config.hf_prune_pruned_heads == {"0": [1, 3]}
    assert structure.ffn_size(model) == [48, 0]
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_pruned_model_trains_on(tmp_path):
    model = tiny_model(seed=5)
    prune_heads(model, {0: [0, 1, 2, 3], 1: [2]})
    prune_ffn_neurons(model, {0: list(range(10))})
    n_before = sum(p.numel() for p in model.parameters())
    trainer = PruningTrainer(model=model, args=train_args(tmp_path, max_steps=3), train_dataset=TinyDataset(32))
    trainer.train()
    assert sum(p.numel() for p in model.parameters()) == n_before
    assert structure.num_heads(model) == [0, 3]


def test_bad_indices_and_unknown_type():
    model = tiny_model()
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(model, {0: [4]})
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(model, {5: [0]})
    with pytest.raises(ValueError, match="out of range"):
        prune_ffn_neurons(model, {0: [48]})
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    from hf_prune.models.auto import supported_model_types

    listed = ", ".join(supported_model_types())
    for family in ("bert", "deberta-v2", "deit", "distilbert", "electra", "llama", "modernbert", "vit"):
        assert family in listed
    with pytest.raises(ValueError, match=f"Supported model types: {listed}"):
        prune_heads(gpt2, {0: [0]})
