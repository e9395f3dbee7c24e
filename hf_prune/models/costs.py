"""The cost model: FLOPs (or measured milliseconds) of one forward pass, of one attention unit and of one MLP neuron.

Everything is counted by `torch.utils.flop_counter.FlopCounterMode` (the counter of `report.py`), with eager
attention, on one sequence of `seq_len` tokens. Every matmul of a head (its Q/K/V rows, its attention scores and
context, its columns of the attention output) and of a neuron (its row of the up projection, its column of the down
projection) scales with the number of heads or neurons, so a model's FLOPs are exactly
`base + sum(heads_l * head_l) + sum(neurons_l * neuron_l)`; `unit_costs` reads the three from one counted pass.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import structure
from .adapter import ATTENTION, MLP
from .auto import ADAPTER_MAPPING, get_adapter, is_causal_lm
from .heap import steady_heap
from .surgery import prune_ffn_neurons, prune_heads, prune_layers

__all__ = [
    "PHASES",
    "dummy_inputs",
    "prefill_inputs",
    "time_decode",
    "count_flops",
    "UnitCosts",
    "unit_costs",
    "time_interleaved",
    "measured_unit_costs",
    "parameter_unit_costs",
]


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no special tokens) and a full attention mask, for counting and timing; for a family whose
    inputs are not tokens, its adapter's inputs (a vision transformer's images, of the size its config fixes)."""
    config = model.config
    device = next(model.parameters()).device
    adapter = ADAPTER_MAPPING.get(getattr(config, "model_type", None))  # counting needs no registered family
    own = adapter.dummy_inputs(config, batch_size, seq_len, torch.Generator().manual_seed(seed)) if adapter else None
    if own is not None:
        return {k: v.to(device) for k, v in own.items()}
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's max_position_embeddings={max_pos}; pass a smaller seq_len."
        )
    special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    low = max((t for t in special if isinstance(t, int)), default=-1) + 1
    low = low if low < config.vocab_size else 0
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, config.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}


# What a forward pass is timed or counted as: "prefill" (one pass over a prompt; for a causal LM the logits of its
# last token only, as `generate` computes them) or "decode" (one new token at batch 1, reading the KV cache).
PHASES = ("prefill", "decode")


def prefill_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """[`dummy_inputs`], plus `logits_to_keep=1` for a causal LM: the prefill of generation computes the
    vocabulary-sized logits of the last position only, so the output projection is not counted `seq_len` times."""
    inputs = dummy_inputs(model, batch_size, seq_len, seed)
    if is_causal_lm(model):
        inputs["logits_to_keep"] = 1
    return inputs


@torch.inference_mode()
def time_decode(
    models: list[nn.Module], prompt_len: int = 128, new_tokens: int = 32, repeats: int = 5, warmup: int = 2
) -> list[list[float]]:
    """Milliseconds per generated token of each causal LM at batch 1 with the KV cache (greedy), timed interleaved.

    One timing is `(t(new_tokens) - median t(1)) / (new_tokens - 1)`, where `t(k)` is the time `generate` takes for
    `k` new tokens after the same random prompt of `prompt_len` tokens: the prefill cancels out, what is left is the
    decode steps. Tokens per second is `1000 / ms`.

    Args:
        models: causal LMs of one vocabulary, in eval mode, on one device.
        prompt_len: tokens of the prompt (the context each decode step attends to, plus what it generates).
        new_tokens: generated tokens of the long run (> 1); end-of-sequence tokens are not allowed to stop it.
        repeats: timings of each model.
        warmup: untimed rounds of each model first.

    Returns:
        Per model, its `repeats` per-token times in milliseconds.
    """
    from transformers import GenerationConfig

    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 (the decode time is a difference of two runs).")
    inputs = dummy_inputs(models[0], 1, prompt_len)
    device = inputs["input_ids"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = getattr(models[0].config, "pad_token_id", None)
    configs = {
        k: GenerationConfig(max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=pad if pad else 0)
        for k in (1, new_tokens)
    }

    def timed(model, k):
        sync()
        start = time.perf_counter()
        model.generate(**inputs, generation_config=configs[k])
        sync()
        return time.perf_counter() - start

    ones, manys = [[] for _ in models], [[] for _ in models]
    with steady_heap():  # timings that do not depend on what the process allocated before (see `heap.py`)
        for _ in range(warmup):
            for model in models:
                timed(model, new_tokens)
        for _ in range(repeats):
            for i, model in enumerate(models):
                ones[i].append(timed(model, 1))
                manys[i].append(timed(model, new_tokens))
    # the prefill's median, not each run's own: a difference of two single timings doubles their noise
    return [
        [max(t - statistics.median(one), 0.0) * 1000.0 / (new_tokens - 1) for t in many]
        for one, many in zip(ones, manys)
    ]


@torch.no_grad()
def _counted(model: nn.Module, seq_len: int) -> FlopCounterMode:
    inputs = prefill_inputs(model, 1, seq_len)
    previous = getattr(model.config, "_attn_implementation", None)
    # the fused CPU SDPA kernel is invisible to the counter: count the eager attention, which does the same work
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
    finally:
        model.train(was_training)
        if switch:
            model.set_attn_implementation(previous)
    return counter


def count_flops(model: nn.Module, seq_len: int) -> int:
    """FLOPs of one forward pass over a batch of one sequence of `seq_len` tokens (eager attention; for a causal LM,
    the prefill of generation: logits of the last token only)."""
    return int(_counted(model, seq_len).get_total_flops())


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs of one forward pass at `seq_len`, split into what each head and neuron costs and the rest.

    Args:
        seq_len: the sequence length they were counted at.
        head / neuron: per layer, the FLOPs of one head / one FFN neuron.
        base: the FLOPs no head or neuron owns (embedding projections, pooler, classifier, each layer's norms).
        heads / neurons: per layer, the current counts.
        unit: what the costs count ("FLOPs", "ms", "parameters").
        layer: per layer, the part of `base` that removing the whole layer saves (its norms, residual adds and, when
            timed, the per-layer overhead of the runtime); empty when not known (then no layer saves anything).
    """

    seq_len: int
    head: list[float]
    neuron: list[float]
    base: float
    heads: list[int]
    neurons: list[int]
    unit: str = "FLOPs"
    layer: list[float] = field(default_factory=list)

    def flops(self, heads: list[int] | None = None, neurons: list[int] | None = None, dropped=()) -> float:
        """FLOPs of the model with `heads` / `neurons` per layer (default: the current counts) and without the layers
        `dropped` (their units are then not counted either)."""
        heads = self.heads if heads is None else heads
        neurons = self.neurons if neurons is None else neurons
        gone = set(dropped)
        saved = sum(self.layer[i] for i in gone) if self.layer else 0.0
        kept = [i for i in range(len(heads)) if i not in gone]
        return (
            self.base
            - saved
            + sum(heads[i] * self.head[i] for i in kept)
            + sum(neurons[i] * self.neuron[i] for i in kept)
        )

    def without_layers(self, dropped) -> UnitCosts:
        """The costs of the model once the layers `dropped` are removed whole: the other layers, renumbered in order,
        and `base` less what the dropped layers' fixed parts cost."""
        gone = set(dropped)
        keep = [i for i in range(len(self.head)) if i not in gone]
        saved = sum(self.layer[i] for i in gone) if self.layer else 0.0
        return UnitCosts(
            self.seq_len, [self.head[i] for i in keep], [self.neuron[i] for i in keep], self.base - saved,
            [self.heads[i] for i in keep], [self.neurons[i] for i in keep], self.unit,
            [self.layer[i] for i in keep] if self.layer else [],
        )  # fmt: skip

    @property
    def total(self) -> float:
        return self.flops()

    @property
    def max_speedup(self) -> float:
        """The FLOPs ratio of removing every head and neuron (only `base` is left)."""
        return self.total / self.base if self.base > 0 else float("inf")


def unit_costs(model: nn.Module, seq_len: int = 128) -> UnitCosts:
    """Counts one forward pass of `model` at `seq_len` and splits it per head, per neuron and the rest.

    Args:
        model: a model of a supported family (dense or pruned).
        seq_len: the sequence length of the cost model.

    Returns:
        The [`UnitCosts`]; `costs.total` equals `count_flops(model, seq_len)`.
    """
    counter = _counted(model, seq_len)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    prefix = type(model).__name__

    adapter = get_adapter(model)

    def flops_of(layer_prefix: str, paths: tuple[str, ...]) -> int:
        return sum(int(per_module.get(f"{prefix}.{layer_prefix}{path}", 0)) for path in paths)

    heads, neurons = structure.attention_units(model), structure.ffn_size(model)
    attn, ffn, whole = [], [], []
    for layer_prefix in structure.layer_prefixes(model):
        attn.append(flops_of(layer_prefix, adapter.attention_cost_paths))
        ffn.append(flops_of(layer_prefix, adapter.mlp_cost_paths))
        whole.append(int(per_module.get(f"{prefix}.{layer_prefix.rstrip('.')}", 0)))
    # Every layer has the same hidden and head sizes, so a layer without heads (or neurons) costs what the others do.
    head_costs = [a / h for a, h in zip(attn, heads) if h > 0]
    neuron_costs = [f / n for f, n in zip(ffn, neurons) if n > 0]
    head = [a / h if h > 0 else (head_costs[0] if head_costs else 0.0) for a, h in zip(attn, heads)]
    neuron = [f / n if n > 0 else (neuron_costs[0] if neuron_costs else 0.0) for f, n in zip(ffn, neurons)]
    total = int(counter.get_total_flops())
    fixed = [float(max(w - a - f, 0)) for w, a, f in zip(whole, attn, ffn)]
    return UnitCosts(seq_len, head, neuron, float(total - sum(attn) - sum(ffn)), heads, neurons, layer=fixed)


@torch.inference_mode()
def time_interleaved(models: list[nn.Module], inputs: dict, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Forward times (ms) of each model on the same inputs, timed interleaved (model 1, 2, ..., 1, 2, ...) so that a
    change of machine load during the measurement falls on all of them alike.

    Args:
        models: models on the device of `inputs`, in eval mode.
        inputs: keyword inputs of one forward pass.
        repeats: timed passes of each model.
        warmup: untimed passes of each model first.

    Returns:
        Per model, its `repeats` times in milliseconds.
    """
    device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
    # kernels on an accelerator run asynchronously: without a sync the clock would time their launch only
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = [[] for _ in models]
    # the heap held steady: a fresh process and one that trained before time the same shapes alike (see `heap.py`)
    with steady_heap():
        for _ in range(warmup):
            for model in models:
                model(**inputs)
        for _ in range(repeats):
            for i, model in enumerate(models):
                sync()
                start = time.perf_counter()
                model(**inputs)
                sync()
                times[i].append((time.perf_counter() - start) * 1000.0)
    return times


@torch.inference_mode()
def measured_unit_costs(
    model: nn.Module, seq_len: int = 128, batch_size: int = 32, repeats: int = 5, phase: str = "prefill"
) -> UnitCosts:
    """A cost model in milliseconds of this machine: forward time = base + heads x head + neurons x neuron, fitted by
    least squares to the median times of five copies of `model` (all units; no heads; no neurons; half of each; none),
    timed interleaved in this process; for a family that can drop layers, a sixth copy with half the layers gives the
    fixed cost of a layer (`UnitCosts.layer`, part of `base`). With `phase="decode"` (causal LMs) the time is that of
    one generated token at batch 1 after `seq_len` tokens ([`time_decode`]): what decode tokens/s is the inverse of.

    FLOPs miss the work that scales with heads and neurons but is not a matmul (softmax over every head's scores,
    the FFN activation) and the work no unit owns (LayerNorms, residual adds, embeddings); on a CPU at batch 32 the
    measured costs weigh heads more than FLOPs do (the "latency" cost of Kwon et al. 2022, fitted linearly).

    Args:
        model: the model to time (left unchanged).
        seq_len / batch_size: the input shape the costs hold for (decode: the prompt length; batch 1).
        repeats: timed runs of each copy (median).
        phase: "prefill" (one forward pass) or "decode" (one new token with the KV cache).

    Returns:
        [`UnitCosts`] with `unit="ms"`; `max_speedup` is the measured dense / base ratio.
    """
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not known: use one of {', '.join(PHASES)}.")
    if phase == "decode" and not is_causal_lm(model):
        raise ValueError(f"phase='decode' times generation, which needs a causal LM; {type(model).__name__} is not.")
    heads, neurons = structure.attention_units(model), structure.ffn_size(model)
    layers = len(heads)
    # a family that can drop layers also gets the fixed cost of a layer, from a copy with the second half removed
    depth = get_adapter(model).can_drop_layers and layers > 1
    was_training = model.training
    variants = []
    shapes = [(1.0, 1.0, layers), (0.0, 1.0, layers), (1.0, 0.0, layers), (0.5, 0.5, layers), (0.0, 0.0, layers)]
    for fh, fn, kept_layers in shapes + ([(1.0, 1.0, (layers + 1) // 2)] if depth else []):
        copy_ = copy.deepcopy(model).eval()
        kept_h = [round(h * fh) for h in heads]
        kept_n = [round(n * fn) for n in neurons]
        prune_heads(copy_, {i: list(range(k, h)) for i, (k, h) in enumerate(zip(kept_h, heads)) if k < h})
        prune_ffn_neurons(copy_, {i: list(range(k, n)) for i, (k, n) in enumerate(zip(kept_n, neurons)) if k < n})
        if kept_layers < layers:
            prune_layers(copy_, range(kept_layers, layers))
        variants.append((copy_, sum(kept_h[:kept_layers]), sum(kept_n[:kept_layers]), kept_layers))
    if phase == "decode":
        times = time_decode([v[0] for v in variants], seq_len, repeats=repeats)
    else:
        times = time_interleaved([v[0] for v in variants], prefill_inputs(model, batch_size, seq_len), repeats)
    model.train(was_training)
    design = torch.tensor([[1.0, h, n, k][: 4 if depth else 3] for _, h, n, k in variants], dtype=torch.float64)
    observed = torch.tensor([statistics.median(t) for t in times], dtype=torch.float64)
    fitted = torch.linalg.lstsq(design, observed.unsqueeze(-1)).solution.squeeze(-1).tolist()
    base, head, neuron = fitted[:3]
    # timing noise must not make a unit free or negative: a floor of a thousandth of its share of the dense time
    floor = observed[0].item() / 1000.0
    head = max(head, floor / max(sum(heads), 1))
    neuron = max(neuron, floor / max(sum(neurons), 1))
    per_layer = max(fitted[3], 0.0) if depth else 0.0
    base = max(base + per_layer * layers, floor)  # the layers' fixed costs are part of base, as counted FLOPs are
    per_layer = min(per_layer, (base - floor) / layers)
    fixed = [per_layer] * layers if depth else []
    return UnitCosts(seq_len, [head] * layers, [neuron] * layers, base, heads, neurons, unit="ms", layer=fixed)


def parameter_unit_costs(model: nn.Module) -> UnitCosts:
    """A cost model in parameters: per layer, the parameters one attention unit and one MLP neuron own, and the
    non-embedding parameters no unit owns (norms, biases of the output projections, pooler, heads).

    Embeddings (input and output, tied or not) are left out, as LLM sizes are quoted ("non-embedding parameters"):
    with this cost model `target_speedup` is dense / pruned non-embedding parameters, e.g. 1.25 keeps 80%.

    Returns:
        [`UnitCosts`] with `unit="parameters"`; `costs.total` is the model's non-embedding parameter count.
    """
    embedding_ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embedding_ids.update(id(p) for p in module.parameters())
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for i, p in unique.items() if i not in embedding_ids)
    adapter = get_adapter(model)
    per_kind = {}
    for kind in (ATTENTION, MLP):
        costs, counts = [], []
        for layer in adapter.layers(model):
            group = adapter.unit_group(layer, kind, model.config)
            owned = sum(s.parameters_per_unit(adapter.linear(layer, s.path), bias=True) for s in group.slices)
            costs.append(float(owned))
            counts.append(group.count)
        per_kind[kind] = (costs, counts)
    (head, heads), (neuron, neurons) = per_kind[ATTENTION], per_kind[MLP]
    owned_total = sum(h * c for h, c in zip(heads, head)) + sum(n * c for n, c in zip(neurons, neuron))
    fixed = [
        float(sum(p.numel() for p in layer.parameters()) - h * hc - n * nc)
        for layer, h, hc, n, nc in zip(adapter.layers(model), heads, head, neurons, neuron)
    ]
    return UnitCosts(0, head, neuron, float(total - owned_total), heads, neurons, unit="parameters", layer=fixed)
