"""Every family's pruned model gets a report (shapes, parameters, FLOPs, latency, the residual width) and a model
card: the downstream steps ask the adapter, never a module path."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification
from utils import VOCAB

from hf_prune import prune_ffn_neurons, prune_heads, prune_hidden_dims, prune_layers, save_pruned
from hf_prune.export.report import build_report

COMMON = dict(num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, hidden_size=32, num_labels=3)
CONFIGS = {
    "distilbert": dict(vocab_size=VOCAB, n_layers=3, n_heads=4, dim=32, hidden_dim=48, max_position_embeddings=64,
                       num_labels=3),
    "deberta-v2": dict(COMMON, vocab_size=VOCAB, max_position_embeddings=64, relative_attention=True,
                       position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"], type_vocab_size=0,
                       norm_rel_ebd="layer_norm"),
    "modernbert": dict(COMMON, vocab_size=VOCAB, max_position_embeddings=64, global_attn_every_n_layers=2,
                       local_attention=8, pad_token_id=0),
    "vit": dict(COMMON, image_size=16, patch_size=4, num_channels=3),
}  # fmt: skip


def tiny(family):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **CONFIGS[family])
    if family == "modernbert":
        config._attn_implementation = "eager"
    cls = AutoModelForImageClassification if family == "vit" else AutoModelForSequenceClassification
    return cls.from_config(config).eval()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_report_and_card_of_every_family(family, tmp_path):
    dense = tiny(family)
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, {0: [0, 1, 2, 3], 1: [1]})
    prune_ffn_neurons(pruned, {2: list(range(10))})
    prune_hidden_dims(pruned, [3, 7])
    prune_layers(pruned, [1])
    report = build_report(dense, pruned, seq_len=8, batch_sizes=(1,), repeats=1, warmup=0)
    assert [layer["heads_kept"] for layer in report["layers"]] == [0, 0, 4]
    assert report["layers"][1]["removed"] and report["layers"][2]["ffn_kept"] == 38
    assert report["hidden_size"] == {"dense": 32, "kept": 30}
    assert report["parameters"]["total_after"] < report["parameters"]["total_before"]
    assert report["flops"]["ratio"] > 1 and report["latency"]["batches"][0]["speedup"] > 0
    folder = save_pruned(pruned, tmp_path / family, report=report, figure=False)
    card = (folder / "README.md").read_text()
    assert "30 of 32 hidden dimensions" in card and "trust_remote_code=True" in card
    assert json.loads((folder / "pruning_report.json").read_text())["hidden_size"]["kept"] == 30
