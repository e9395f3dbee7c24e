"""Hidden dimensions (the residual stream's width, Minitron's embedding channels) of Llama-family decoders: the
masked model (RMSNorms over the kept dimensions) equals the pruned one, logits and greedy generation with the KV
cache, with units and layers removed too; exports load as the family's own config when it accepts the width, else
with remote code; tied embeddings stay tied."""

import json

import pytest
import torch
from test_llama import FAMILIES, HEADS, CausalBlocks, generate, logits, logits_without_hf_prune, tiny_decoder
from transformers import AutoModelForCausalLM

from hf_prune import (
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden_dims,
    prune_layers,
    prune_to_speedup,
    save_pruned,
)
from hf_prune.models.hidden import HIDDEN_KEY, hidden_mask, hidden_width, masked_rms_norm

HIDDEN = 32


def dims(count: int, seed: int = 0) -> list[int]:
    return sorted(torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def keep_of(removed: list[int]) -> torch.Tensor:
    keep = torch.ones(HIDDEN, dtype=torch.bool)
    keep[removed] = False
    return keep


def test_masked_rms_norm_is_the_rms_norm_of_the_kept_dimensions():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    kept = x[..., keep]
    expected = kept * torch.rsqrt(kept.pow(2).mean(-1, keepdim=True) + 1e-6) * w[keep]
    out = masked_rms_norm(x, keep, w, 1e-6)
    torch.testing.assert_close(out[..., keep], expected)
    assert not out[..., ~keep].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_hidden_dimensions_equals_masking_them(family):
    model = tiny_decoder(family)
    removed = dims(6)
    with hidden_mask(model, keep_of(removed)):
        expected, expected_tokens = logits(model), generate(model)
    prune_hidden_dims(model, removed)
    assert hidden_width(model) == HIDDEN - 6
    assert model.model.embed_tokens.weight.shape[1] == HIDDEN - 6 == model.model.norm.weight.shape[0]
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(model), expected_tokens)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hidden_dimensions_with_units_and_a_layer_removed():
    model = tiny_decoder("llama")
    prune_heads(model, {0: [1], 1: [0, 1, 2, 3]})  # layer 1 keeps no attention
    prune_ffn_neurons(model, {2: [0, 5, 7]})
    prune_layers(model, [2])
    removed = dims(10, seed=1)
    with hidden_mask(model, keep_of(removed)):
        expected = logits(model)
    prune_hidden_dims(model, removed)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)


def test_a_width_the_config_accepts_is_written_as_hidden_size_and_loads_without_remote_code(tmp_path):
    model = tiny_decoder("qwen3")  # tied embeddings, head_dim wider than hidden / heads
    prune_hidden_dims(model, dims(HIDDEN - 24))  # 24 is a multiple of the 8 query heads
    assert model.config.hidden_size == 24 and getattr(model.config, HIDDEN_KEY, None) is None
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["hidden_size"] == 24
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(reloaded), logits(model))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_a_width_the_config_refuses_loads_with_remote_code(tmp_path):
    model = tiny_decoder("llama")
    prune_heads(model, {0: [1]})
    prune_hidden_dims(model, dims(3, seed=2))  # 29 is no multiple of the 8 query heads: LlamaConfig refuses it
    assert model.config.hidden_size == HIDDEN and model.config.hf_prune_hidden["size"] == HIDDEN - 3
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    loaded = load_pruned(folder).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
    assert torch.equal(generate(loaded), generate(model))
    got, module = logits_without_hf_prune(folder, trust_remote_code=True)
    assert module.startswith("transformers_modules."), module
    torch.testing.assert_close(got, logits(model))


def test_the_search_narrows_a_decoder_s_stream():
    model = tiny_decoder("llama")
    pruned, summary = prune_to_speedup(model, CausalBlocks(64), 1.4, num_samples=64, seq_len=12, tune_samples=64,
                                       batch_size=8, cost_model="params", prune_hidden=True)  # fmt: skip
    assert summary["hidden_before"] == HIDDEN and summary["predicted_speedup"] >= 1.4
    assert hidden_width(pruned) == summary["hidden_after"] <= HIDDEN
    assert HEADS == model.config.num_attention_heads  # the input is unchanged
    with torch.no_grad():
        assert torch.isfinite(pruned(**{k: v[None] for k, v in CausalBlocks(1)[0].items()}).loss)


def test_training_a_decoder_with_a_hidden_mask_then_prune_changes_no_output(tmp_path):
    from utils import train_args

    from hf_prune import PruningTrainer

    args = train_args(tmp_path, pruning_method="taylor", pruning_target="hidden", target_sparsity=0.25,
                      taylor_iterations=2, taylor_interval_steps=2, max_steps=6, per_device_train_batch_size=8,
                      learning_rate=1e-3)  # fmt: skip
    trainer = PruningTrainer(model=tiny_decoder("qwen3"), args=args, train_dataset=CausalBlocks(64))
    trainer.train()
    assert trainer.pruner.sparsity() == [0.25]
    masked = logits(trainer.model.eval())
    summary = trainer.prune()
    assert summary["hidden_after"] == hidden_width(trainer.model) == 24
    torch.testing.assert_close(logits(trainer.model.eval()), masked, atol=1e-5, rtol=1e-4)
    assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight
