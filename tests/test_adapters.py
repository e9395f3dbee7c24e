"""The adapter protocol expresses more than BERT: a tiny family defined here, with grouped-query attention behind one
fused QKV projection and a gated MLP (gate and up projections), is pruned by the unchanged pruners, search, cost model
and surgery once its adapter is registered. Nothing outside this file knows the family."""

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from utils import VOCAB, TinyDataset, batch, mask_removed_units, tiny_model, train_args

from hf_prune import PruningTrainer, prune_ffn_neurons, prune_heads, prune_to_speedup
from hf_prune.models import structure
from hf_prune.models.adapter import ATTENTION, MLP, ArchitectureAdapter, ChannelSlice, UnitGroup, config_get
from hf_prune.models.auto import ADAPTER_MAPPING, get_adapter, register_adapter, supported_model_types
from hf_prune.models.costs import count_flops, unit_costs

HEADS, KV, HEAD_DIM, HIDDEN, MLP_WIDTH, LAYERS = 8, 4, 8, 32, 24, 3


# ----------------------------------------------------------------------------------------------------- the family
class FusedGQAConfig(PretrainedConfig):
    model_type = "tiny-fused-gqa"

    def __init__(self, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV, head_dim=HEAD_DIM, intermediate_size=MLP_WIDTH, max_position_embeddings=64,
                 layer_kv_heads=None, layer_intermediate_sizes=None, **kwargs):  # fmt: skip
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = (
            num_attention_heads,
            num_key_value_heads,
            head_dim,
        )
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.layer_kv_heads, self.layer_intermediate_sizes = layer_kv_heads, layer_intermediate_sizes
        super().__init__(**kwargs)


class FusedGQAAttention(nn.Module):
    """Grouped-query attention whose Q, K and V come from one Linear: [Q of every head | K of every group | V ...]."""

    def __init__(self, config, kv_heads):
        super().__init__()
        self.group = config.num_attention_heads // config.num_key_value_heads  # query heads per key/value head
        self.head_dim, self.kv_heads = config.head_dim, kv_heads
        self.qkv = nn.Linear(config.hidden_size, (self.group + 2) * kv_heads * self.head_dim)
        self.o = nn.Linear(self.group * kv_heads * self.head_dim, config.hidden_size)

    def forward(self, x, mask):
        b, t, _ = x.shape
        if self.kv_heads == 0:
            return self.o(x.new_zeros(b, t, 0))
        q_width, kv_width = self.group * self.kv_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(b, t, self.kv_heads * self.group, self.head_dim).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2) for z in (k, v))
        k, v = (z.repeat_interleave(self.group, dim=1) for z in (k, v))  # query heads g*group.. read group g
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(ctx.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    def __init__(self, config, width):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, width, bias=False)
        self.up = nn.Linear(config.hidden_size, width, bias=False)
        self.down = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config, i):
        super().__init__()
        kv = (config.layer_kv_heads or [config.num_key_value_heads] * config.num_hidden_layers)[i]
        width = (config.layer_intermediate_sizes or [config.intermediate_size] * config.num_hidden_layers)[i]
        self.attn_norm, self.mlp_norm = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.attn, self.mlp = FusedGQAAttention(config, kv), GatedMLP(config, width)

    def forward(self, x, mask):
        h = x + self.attn(self.attn_norm(x), mask)
        return h + self.mlp(self.mlp_norm(h))


class FusedGQAForSequenceClassification(PreTrainedModel):
    config_class = FusedGQAConfig
    base_model_prefix = "body"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        x = self.embed(input_ids)
        keep = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = keep.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        logits = self.head(x[:, 0])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class FusedGQAAdapter(ArchitectureAdapter):
    """The whole family, in one adapter: the unit of attention is a key/value group with its query heads."""

    model_types = ("tiny-fused-gqa",)
    attention_roles = {"qkv": "attn.qkv", "o": "attn.o"}
    mlp_roles = {"gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}
    attention_cost_paths = ("attn",)
    mlp_cost_paths = ("mlp",)
    mlp_residual_path = "mlp_norm"  # pre-norm: the MLP output is added to the input of its norm

    def layers(self, model):
        return model.layers

    def head_dim(self, config):
        return config_get(config, "head_dim")

    def heads_per_unit(self, config):
        return config_get(config, "num_attention_heads") // config_get(config, "num_key_value_heads")

    def unit_group(self, layer, kind, config):
        if kind == MLP:
            inputs = (ChannelSlice("mlp.gate", 0, 1), ChannelSlice("mlp.up", 0, 1))
            return UnitGroup(MLP, layer.mlp.down.in_features, inputs, ChannelSlice("mlp.down", 1, 1))
        d, group = self.head_dim(config), self.heads_per_unit(config)
        units = layer.attn.qkv.out_features // ((group + 2) * d)
        q, k = ChannelSlice("attn.qkv", 0, group * d), ChannelSlice("attn.qkv", 0, d, offset=units * group * d)
        v = ChannelSlice("attn.qkv", 0, d, offset=units * (group + 1) * d)
        return UnitGroup(ATTENTION, units, (q, k, v), ChannelSlice("attn.o", 1, group * d))

    def dense_shape(self, config):
        keys = ("num_hidden_layers", "num_key_value_heads", "intermediate_size")
        return tuple(config_get(config, k) for k in keys)

    def config_shapes(self, config):
        n, kv, width = self.dense_shape(config)
        return config_get(config, "layer_kv_heads") or [kv] * n, config_get(config, "layer_intermediate_sizes") or [
            width
        ] * n

    def resize_units(self, layer, kind, count, config):
        if kind == ATTENTION:
            layer.attn.kv_heads = count

    def record_config(self, model):
        model.config.layer_kv_heads = structure.attention_units(model)
        model.config.layer_intermediate_sizes = structure.ffn_size(model)

    def is_pruned_config(self, config_dict):
        return config_dict.get("layer_kv_heads") is not None


@pytest.fixture(autouse=True)
def registered():
    register_adapter(FusedGQAAdapter())
    yield
    ADAPTER_MAPPING.pop("tiny-fused-gqa")


def fused_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = FusedGQAForSequenceClassification(FusedGQAConfig(**overrides)).eval()
    with torch.no_grad():  # larger biases and norms than the default init, so a wrong cut shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logits(model):
    with torch.no_grad():
        return model(**batch(pad=3)).logits


# ----------------------------------------------------------------------------------------------------- tests
def test_registration_is_the_only_change_and_unknown_types_are_refused():
    assert "tiny-fused-gqa" in supported_model_types()
    assert isinstance(get_adapter(fused_model()), FusedGQAAdapter)
    assert isinstance(get_adapter({"model_type": "bert"}), ArchitectureAdapter)
    listed = ", ".join(supported_model_types())
    assert "bert" in listed and "tiny-fused-gqa" in listed
    with pytest.raises(ValueError, match=f"Supported model types: {listed}"):
        get_adapter({"model_type": "gpt2"})
    with pytest.raises(TypeError, match="ArchitectureAdapter instance"):
        register_adapter(FusedGQAAdapter)


def test_units_of_grouped_query_attention_behind_a_fused_projection():
    model = fused_model()
    assert structure.attention_units(model) == [KV] * LAYERS  # key/value groups
    assert structure.num_heads(model) == [HEADS] * LAYERS  # query heads
    assert structure.ffn_size(model) == [MLP_WIDTH] * LAYERS
    (q, k, v), o = structure.unit_groups(model, ATTENTION)[0].inputs, structure.unit_groups(model, ATTENTION)[0].output
    # group 1 owns query heads 2-3 (rows 16-31), its key rows 72-79 and value rows 104-111, output columns 16-31
    assert q.channels([1]) == list(range(16, 32)) and k.channels([1]) == list(range(72, 80))
    assert v.channels([1]) == list(range(104, 112)) and o.channels([1]) == list(range(16, 32))


@pytest.mark.parametrize("heads", [{0: [1], 2: [0, 3]}, {1: [0, 1, 2, 3]}])
def test_removing_key_value_groups_and_gated_neurons_equals_masking_them(heads):
    neurons = {0: [0, 5, 23], 1: list(range(MLP_WIDTH)), 2: [7]}
    model = fused_model()
    expected = logits(mask_removed_units(fused_model(), heads, neurons))
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    assert structure.attention_units(model) == [KV - len(heads.get(i, [])) for i in range(LAYERS)]
    assert structure.ffn_size(model) == [MLP_WIDTH - len(neurons[i]) for i in range(LAYERS)]
    # every layer keeps a valid grouped-query layout: whole groups of query heads with their key and value
    for layer, kv in zip(model.layers, model.config.layer_kv_heads):
        assert layer.attn.qkv.out_features == (HEADS // KV + 2) * kv * HEAD_DIM
        assert layer.attn.o.in_features == HEADS // KV * kv * HEAD_DIM
    # the recorded shapes rebuild the same model
    rebuilt = FusedGQAForSequenceClassification(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(rebuilt), logits(model))


def test_cost_model_splits_the_flops_of_groups_and_neurons_exactly():
    model = fused_model()
    costs = unit_costs(model, 16)
    assert costs.total == count_flops(model, 16)
    prune_heads(model, {0: [0, 1]})
    prune_ffn_neurons(model, {2: list(range(10))})
    assert costs.flops(structure.attention_units(model), structure.ffn_size(model)) == pytest.approx(
        count_flops(model, 16), rel=1e-9
    )


@pytest.mark.parametrize("config", [
    {"pruning_target": "attention", "attention_granularity": "head", "pruning_method": "movement"},
    {"pruning_target": "attention", "pruning_method": "movement", "block_shape": [8, 8]},
    {"pruning_target": "ffn", "pruning_method": "taylor", "taylor_iterations": 2, "taylor_interval_steps": 3},
    {"pruning_target": "heads_and_ffn", "pruning_method": "taylor", "target_speedup": 1.5, "taylor_iterations": 2,
     "taylor_interval_steps": 3},
])  # fmt: skip
def test_the_training_time_pruners_mask_and_remove_units_of_the_family(tmp_path, config):
    args = dict(max_steps=8, pruning_warmup_steps=1, pruning_cooldown_steps=2, pruning_frequency=1)
    args.update(per_device_train_batch_size=8, learning_rate=5e-3, speedup_seq_len=12)
    args.update({} if config.get("target_speedup") else {"target_sparsity": 0.5})
    args.update(config)
    trainer = PruningTrainer(model=fused_model(), args=train_args(tmp_path, **args), train_dataset=TinyDataset(64))
    trainer.train()
    trainer.model.eval()
    before = logits(trainer.model)
    summary = trainer.prune()
    assert summary["params_after"] < summary["params_before"] or config.get("block_shape")
    if config.get("block_shape"):  # scattered blocks: only groups masked in every slice are removed, masks released
        assert summary["params_after"] <= summary["params_before"]
    else:  # whole units were masked: removing them changes nothing
        torch.testing.assert_close(logits(trainer.model), before, atol=1e-5, rtol=1e-4)


def test_prune_to_speedup_searches_tunes_and_removes_units_of_the_family():
    model = fused_model()
    dense = count_flops(model, 12)
    pruned, summary = prune_to_speedup(model, TinyDataset(96), 1.6, num_samples=96, seq_len=12, tune_samples=96)
    assert 1.6 <= dense / count_flops(pruned, 12) <= 1.02 * 1.6
    assert any(
        entry.get("heads", {}).get("tuned") or entry.get("neurons", {}).get("tuned") for entry in summary["tuning"]
    )
    assert pruned.config.layer_kv_heads == structure.attention_units(pruned)
    assert torch.isfinite(logits(pruned)).all()


def test_bert_family_is_one_adapter_too():
    for model_type in ("bert", "roberta", "xlm-roberta", "electra"):
        model = tiny_model(model_type)
        assert get_adapter(model) is get_adapter({"model_type": "bert"})
        group = structure.unit_groups(model, ATTENTION)[0]
        assert [s.path for s in group.slices] == [
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"
        ]  # fmt: skip
