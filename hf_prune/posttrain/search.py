"""Retraining-free pruning to a speed target: Fisher mask search, mask rearrangement and least-squares mask tuning
(Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"), ending in physical removal.

1. Importance (`fisher.py`): the Fisher information of a mask on every attention unit and MLP neuron.
2. Search: `pruning.allocation.allocate_units` keeps the heads and neurons with the most Fisher information that fit
   in the FLOPs budget of the target speedup; then, within each layer, a greedy swap picks the set to remove that
   minimises `sum_examples (sum_removed g)^2`, the loss increase the layer's block of the Fisher matrix predicts.
3. Tuning (`mask_tuning.py`): layer by layer, the kept heads' and neurons' contributions are rescaled by least
   squares (`torch.linalg.lstsq` on the normal equations) so the layer's pre-LayerNorm sums match the dense model's
   on the sample; a scale is kept only if it lowers the error on held-out examples of the sample.
4. Removal: the scales are folded into the output projections and the pruned units are removed (`prune_heads`,
   `prune_ffn_neurons`); nothing is left masked.
"""

from __future__ import annotations

import copy
import os
import time
from functools import partial

import torch
from torch import nn
from transformers.utils import logging

from ..models.adapter import ATTENTION, MLP
from ..models.auto import get_adapter
from ..models.costs import measured_unit_costs, parameter_unit_costs, unit_costs
from ..models.hidden import hidden_width, prune_hidden_dims
from ..models.surgery import prune_ffn_neurons, prune_heads, prune_layers
from ..pruning.allocation import (
    allocate_uniform_units,
    allocate_units,
    allocate_with_depth,
    allocate_with_width,
    speedup_budget,
)
from ..pruning.units import layer_units
from .calibration import calibrate
from .checks import (
    check_drop_layers,
    check_layer_counts,
    check_prune_hidden,
    check_samples,
    check_some_of_each,
    check_uniform_reachable,
    check_widths,
)
from .fisher import layer_fisher, mask_fisher, mask_gradients, rearrange_layer
from .importance import activation_importance
from .mask_tuning import tune_masks
from .samples import batches_of, examples, pad_collate
from .timing import empty_layers, paired_speedups, removed_units, shaped_copy, timing_threads
from .width import width_costs

logger = logging.get_logger(__name__)

__all__ = [
    "keep_top",
    "COST_MODELS",
    "IMPORTANCES",
    "prune_to_speedup",
]

COST_MODELS = ("flops", "params", "latency", "decode")
# the measured cost models, and the phase of generation each times
TIMED_COST_MODELS = {"latency": "prefill", "decode": "decode"}
IMPORTANCES = ("fisher", "activation", "hybrid")
METHODS = {
    "fisher": "fisher mask search, rearrangement and least-squares tuning (Kwon et al. 2022)",
    "activation": "activation importance (Minitron), mask search and least-squares tuning",
    "hybrid": "fisher mask search, activation choice within layers (Minitron) and least-squares tuning",
}


def keep_top(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The keep-mask with as many units as `keep` keeps, those of highest `scores` (ties: the lower index).

    Args:
        keep: bool keep-mask of one layer's units (only its count is used).
        scores: one score per unit.

    Returns:
        The new bool keep-mask.
    """
    order = torch.argsort(scores.double().cpu(), descending=True, stable=True)
    out = torch.zeros_like(keep)
    out[order[: int(keep.sum())].to(keep.device)] = True
    return out


def _cost_model_name(cost_model: str, batch_size: int, seq_len: int) -> str:
    if cost_model == "latency":
        return f"latency (ms at {batch_size} x {seq_len})"
    if cost_model == "decode":
        return f"decode (ms per token at batch 1 after {seq_len} tokens)"
    return cost_model


def prune_to_speedup(
    model: nn.Module,
    dataset,
    target_speedup: float,
    num_samples: int = 2048,
    *,
    seq_len: int = 128,
    tune: bool = True,
    tune_samples: int = 512,
    rearrange: bool = True,
    batch_size: int = 32,
    data_collator=None,
    seed: int = 0,
    cost_model: str = "flops",
    importance: str = "fisher",
    uniform: bool = False,
    latency_batch_size: int = 32,
    calibration_rounds: int = 4,
    cost_device: str | torch.device | None = None,
    cost_threads: int | None = None,
    allow_empty_kinds: bool = False,
    drop_layers: bool = False,
    layer_counts: list[int] | None = None,
    prune_hidden: bool = False,
    hidden_widths: list[int] | None = None,
    tune_bias: bool = False,
) -> tuple[nn.Module, dict]:
    """Prunes heads and FFN neurons of a fine-tuned model to `target_speedup` times fewer FLOPs, without training.

    Args:
        model: a fine-tuned model of a supported architecture (it is left unchanged; a pruned copy is returned).
        dataset: tokenized examples with `input_ids` (images: `pixel_values`) and `labels` (a `datasets.Dataset` or
            any indexable of dicts); a random sample of `num_samples` of them measures importance.
        target_speedup: dense FLOPs / pruned FLOPs of one forward pass at `seq_len` tokens (> 1); the result reaches
            it and exceeds it by at most 2%.
        num_samples: examples for the Fisher information (Kwon et al. use 2048).
        seq_len: sequence length of the FLOPs cost model.
        tune: rescale the kept units by least squares against the dense model.
        tune_samples: examples (of the sample) used for tuning, in at least two batches; a fifth of the batches (a
            seeded random choice) is held out to accept each layer's scales.
        rearrange: choose each layer's removed units with its block of the Fisher matrix.
        batch_size: examples per forward pass.
        data_collator: turns a list of examples into a batch (default: pads `input_ids` with the model's pad token).
        seed: draws the sample.
        cost_model: "flops" (counted, the default: `target_speedup` is a FLOPs ratio), "params" (`target_speedup` is
            dense / pruned non-embedding parameters, as LLM sizes are quoted: 1.25 keeps 80%; see
            [`hf_prune.models.costs.parameter_unit_costs`]) or "latency" (head and neuron
            costs fitted to forward times measured on this machine at `latency_batch_size` x `seq_len`, see
            [`hf_prune.models.costs.measured_unit_costs`]: `target_speedup` is then a predicted speedup of this
            machine; for a causal LM the forward pass is generation's prefill, logits of the last token only) or
            "decode" (causal LMs: costs fitted to the time of one generated token at batch 1 with the KV cache after
            `seq_len` tokens: `target_speedup` is a ratio of decode tokens/s). The timed cost models are calibrated
            (`calibration_rounds`).
        importance: "fisher" (the Fisher information of unit masks, Kwon et al. 2022; needs labels), "activation"
            (the mean L2 norm of each unit's output over the sample's tokens, Minitron; see
            [`hf_prune.posttrain.importance.activation_importance`]; no rearrangement, which needs gradients) or
            "hybrid" (the Fisher search decides how many units each layer keeps, the mean activation norm which ones:
            instead of the rearrangement, see [`keep_top`]).
        uniform: keep the same number of attention units and of MLP neurons in every layer, chosen by the search
            under that constraint ([`hf_prune.pruning.allocation.allocate_uniform_units`]): the export is then the
            family's own config, which plain `from_pretrained` and serving engines load (decoders; see the adapter).
        latency_batch_size: the batch size the latency costs are measured at.
        calibration_rounds: with `cost_model="latency"` (or "decode"), the chosen shapes are timed against `model`
            (10 interleaved rounds, at `latency_batch_size` x `seq_len`, or decoding at batch 1) and searched again
            toward the target until one holds with a margin for the noise the rounds show, up to this many timings
            (see [`hf_prune.posttrain.calibration.calibrate`]); the chosen shapes are then re-timed, and that timing is
            the `measured_speedup` reported. The linear cost model misses what uneven layers cost (odd widths,
            per-layer overheads): the timing sees it. 0 trusts the cost model.
        cost_device: where the timed cost models time the model (default: the model's device); the importance and the
            tuning run on the model's device (move the model to the training device first).
        cost_threads: intra-op threads while timing on a CPU (default: every core, `os.cpu_count()`, whatever a
            launcher set: `torchrun` sets one thread per process); recorded in the summary.
        allow_empty_kinds: allow a target that only removing every attention unit or every MLP neuron of the model
            reaches, and a search that removes them all (by default both are refused: such a model predicts nearly a
            constant).
        drop_layers: let the search also remove whole layers, where that loses less than spending the target on
            units alone ([`hf_prune.pruning.allocation.allocate_with_depth`]), saving their fixed cost too. Where an
            empty layer is a pass-through (pre-norm decoders without output biases) a layer's loss is the Fisher of
            emptying it ([`hf_prune.posttrain.fisher.layer_fisher`]) and every layer left without units goes; otherwise
            (post-LayerNorm encoders) it is the Fisher of a gate that skips it
            ([`hf_prune.posttrain.fisher.layer_gates`]), the chosen layers go and the tuning makes up for them. Needs
            `importance="fisher"` or `"hybrid"`.
        layer_counts: with `drop_layers`, the numbers of layers the search may keep instead of any from all of them
            down to one (one number fixes the depth: the search then drops the layers of least estimated loss and
            spends what is left on units; a pass-through family also loses any layer its units leave empty). Every
            depth tried is recorded (`structure_search`).
        prune_hidden: let the search also narrow the residual stream (hidden dimensions, shared by every layer: see
            [`hf_prune.models.hidden`]), trying widths down to half ([`hf_prune.posttrain.width.candidate_widths`])
            and keeping the one of least estimated loss ([`hf_prune.pruning.allocation.allocate_with_width`]); the
            dimensions' importance is the Fisher information of a mask on the stream. Needs `importance="fisher"`;
            not with `drop_layers` or `uniform`. Every width tried is recorded (`structure_search`).
        hidden_widths: with `prune_hidden`, the residual widths the search may choose from instead of the default
            candidates (one width fixes it: the search then spends what is left on units).
        tune_bias: the tuning also fits a constant per output dimension of every attention and MLP block, folded into
            its output projection's bias (FLAP's bias compensation, An et al. 2024, fitted jointly with the scales and
            kept per layer only where it lowers the held-out error). Where the output projections have no bias and the
            family's config has a flag for one (Llama's `attention_bias` / `mlp_bias`, ModernBERT's), the flag is set
            and zero biases are added to the projections it governs, so the export still loads as the family's own
            class (a few parameters more: about 0.1% on SmolLM2-135M); families without such a flag (Mistral, Qwen2)
            are tuned without it. Needs `tune`.

    Returns:
        `(pruned_model, summary)`: the physically pruned copy, and what was done and measured (FLOPs before / after and
        their ratio, heads and FFN width per layer, the removed units, the tuning per layer, the time of each phase).
    """
    get_adapter(model)  # an unsupported model type fails here, naming the supported ones
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup={target_speedup} must be > 1 (it is dense FLOPs / pruned FLOPs, e.g. 2).")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1 (Kwon et al. use 2048).")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    if cost_model not in COST_MODELS:
        raise ValueError(f"cost_model={cost_model!r} is not known: use one of {', '.join(COST_MODELS)}.")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r} is not known: use one of {', '.join(IMPORTANCES)}.")
    if calibration_rounds < 0:
        raise ValueError(f"calibration_rounds={calibration_rounds} must be >= 0 (0 trusts the cost model).")
    if drop_layers:
        check_drop_layers(model, importance)
    counts = check_layer_counts(model, drop_layers, layer_counts)
    if prune_hidden:
        check_prune_hidden(model, importance, drop_layers, uniform)
    widths = check_widths(model, prune_hidden, hidden_widths)
    flops = unit_costs(model, seq_len)
    timed = cost_model in TIMED_COST_MODELS
    timing_model, timing = model, {}
    if timed:
        device = torch.device(cost_device) if cost_device is not None else next(model.parameters()).device
        timing_model = model if device == next(model.parameters()).device else copy.deepcopy(model).to(device)
        threads = (cost_threads or os.cpu_count() or 1) if device.type == "cpu" else None
        timing = {"device": str(device), "threads": threads}
    with timing_threads(timing.get("threads")):
        if cost_model == "latency":
            costs = measured_unit_costs(timing_model, seq_len, latency_batch_size)
        elif cost_model == "decode":
            costs = measured_unit_costs(timing_model, seq_len, 1, phase="decode")
        else:
            costs = flops if cost_model == "flops" else parameter_unit_costs(model)
    # an unreachable target fails here, before the Fisher pass (with depth: what one layer left could reach)
    reachable = costs.without_layers(range(1, len(costs.head))) if drop_layers else costs
    budget = speedup_budget(reachable, target_speedup, reference_flops=costs.total)
    check_some_of_each(reachable, budget, target_speedup, allow_empty_kinds)
    if uniform:
        check_uniform_reachable(model, reachable, budget, target_speedup)
    rows = examples(dataset, num_samples, seed, getattr(model, "main_input_name", "input_ids"))
    if len(rows) < num_samples:
        logger.warning(
            "The dataset has %d examples, fewer than num_samples=%d: using them all.", len(rows), num_samples
        )
    hidden = hidden_width(model)
    tune_rows = min(tune_samples, len(rows))
    if tune:
        fixed = get_adapter(model).sequence_length(model.config)
        check_samples(rows, tune_rows, hidden, max([*costs.heads, *costs.neurons]), batch_size, fixed)
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None)
    collate = data_collator or pad_collate(pad if isinstance(pad, int) else 0)
    batches = batches_of(rows, batch_size, collate, device)
    times = {}

    t = time.perf_counter()
    if importance in ("fisher", "hybrid"):
        # a layer that is no pass-through once empty (post-LayerNorm) is weighed by the Fisher of a gate on it
        gated = drop_layers and not get_adapter(model).empty_layer_is_identity(model)
        grads = mask_gradients(model, batches, hidden=prune_hidden, layers=gated)
        head_grads, neuron_grads = grads[:2]
        head_fisher, neuron_fisher = mask_fisher(head_grads), mask_fisher(neuron_grads)
        if gated:
            gate_fisher = mask_fisher([grads[3]])[0]
        if prune_hidden:
            hidden_fisher = mask_fisher([grads[2]])[0]
            costs_at = width_costs(model, costs, cost_model, seq_len, timing_model, latency_batch_size)
        times["fisher_s"] = time.perf_counter() - t
        if importance == "hybrid":
            t = time.perf_counter()
            # power=1: Minitron's mean norm ranks units within a layer; across layers it misallocates (importance.py)
            within = activation_importance(model, batches, power=1)
            times["importance_s"] = time.perf_counter() - t
    else:  # Minitron's activation importance: no gradients, so no Fisher-based rearrangement either
        head_fisher, neuron_fisher = activation_importance(model, batches)
        times["importance_s"] = time.perf_counter() - t
        rearrange = False

    t = time.perf_counter()
    explored = []  # every width / depth candidate of every search, with its estimated loss: why one won

    def search(goal: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, list[int]]:
        # at most 2% over the goal: the kept units may spend down to budget - slack
        slack = costs.total / goal - costs.total / (1.02 * goal)  # in the cost model's unit
        if uniform:
            accepts = partial(get_adapter(model).accepts_uniform, model.config)
            allocate = partial(allocate_uniform_units, allowed=accepts, slack=slack / 2)
        else:
            allocate = partial(allocate_units, slack=slack / 2, keep_each=not allow_empty_kinds)
        if drop_layers or prune_hidden:
            explored.append({"goal": goal, "candidates": []})
        if drop_layers:
            loss = gate_fisher if gated else layer_fisher(head_grads, neuron_grads)
            hk, nk, gone = allocate_with_depth(head_fisher, neuron_fisher, costs, goal, loss, allocate,
                                               candidates=explored[-1]["candidates"], layer_counts=counts)  # fmt: skip
            # a pass-through once empty: every empty layer goes (the chosen ones and any the units left empty)
            return hk, nk, None, (gone if gated else empty_layers(hk, nk))
        if prune_hidden:
            return *allocate_with_width(head_fisher, neuron_fisher, hidden_fisher, costs_at, costs.total, goal, widths,
                                        allocate, candidates=explored[-1]["candidates"]), []  # fmt: skip
        return *allocate(head_fisher, neuron_fisher, costs, speedup_budget(costs, goal)), None, []

    keep_heads, keep_neurons, keep_hidden, dropped = search(target_speedup)
    times["search_s"] = time.perf_counter() - t
    calibration, retimed = [], None
    if timed and calibration_rounds > 0:
        t = time.perf_counter()
        phase, batch = ("decode", 1) if cost_model == "decode" else ("prefill", latency_batch_size)

        def time_shapes(keep) -> list[float]:
            shaped = shaped_copy(timing_model, *keep[:2], dropped=keep[3], keep_hidden=keep[2])
            return paired_speedups(timing_model, shaped, batch, seq_len, phase=phase)

        def describe(keep) -> dict:
            heads, neurons = [int(k.sum()) for k in keep[0]], [int(k.sum()) for k in keep[1]]
            gone = keep[3]
            width = hidden if keep[2] is None else int(keep[2].sum())
            at = costs if keep[2] is None else costs_at(width)
            predicted = costs.total / at.flops(heads, neurons, dropped=gone)
            return {"predicted_speedup": predicted, "heads": heads, "ffn": neurons, "dropped_layers": gone,
                    "hidden": width}  # fmt: skip

        with timing_threads(timing["threads"]):
            (keep_heads, keep_neurons, keep_hidden, dropped), calibration, retimed = calibrate(
                search, time_shapes, target_speedup, calibration_rounds,
                (keep_heads, keep_neurons, keep_hidden, dropped), costs.total / reachable.base, describe,
            )  # fmt: skip
        times["calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if importance == "hybrid":
        keep_heads = [keep_top(k, a) for k, a in zip(keep_heads, within[0])]
        keep_neurons = [keep_top(k, a) for k, a in zip(keep_neurons, within[1])]
    elif rearrange:
        keep_heads = [rearrange_layer(k, g) for k, g in zip(keep_heads, head_grads)]
        keep_neurons = [rearrange_layer(k, g) for k, g in zip(keep_neurons, neuron_grads)]
    times["search_s"] += time.perf_counter() - t

    student = copy.deepcopy(model)
    # zero biases where the output projections have none and the config can say so (Llama's attention_bias /
    # mlp_bias): the tuning folds its compensation into them
    biased = get_adapter(student).add_output_bias(student) if tune and tune_bias else []
    with torch.no_grad():
        for kind, keeps in ((ATTENTION, keep_heads), (MLP, keep_neurons)):
            for lu, keep in zip(layer_units(student, kind), keeps):
                out = lu.group.output
                cols = (~keep).repeat_interleave(out.width).nonzero().flatten() + out.offset
                lu.output_linear.weight[:, cols.to(lu.output_linear.weight.device)] = 0.0
    tuning = []
    t = time.perf_counter()
    if tune:
        tune_batches = batches_of(rows[:tune_rows], batch_size, collate, device)
        # a sequence (or image) classifier of an encoder reads the first token of the last layer alone
        first_token = (
            type(model).__name__.endswith(("ForSequenceClassification", "ForImageClassification"))
            and get_adapter(model).classifier_reads_first_token
        )
        tuning = tune_masks(student, model, tune_batches, keep_heads, keep_neurons, first_token, seed=seed,
                            keep_hidden=keep_hidden, dropped=dropped, bias=tune_bias)  # fmt: skip
    times["tune_s"] = time.perf_counter() - t

    pruned_heads, pruned_neurons = removed_units(keep_heads), removed_units(keep_neurons)
    prune_heads(student, pruned_heads)
    prune_ffn_neurons(student, pruned_neurons)
    if dropped:  # pass-throughs once empty, or weighed by their gates' Fisher and tuned around
        prune_layers(student, dropped)
    if keep_hidden is not None:
        prune_hidden_dims(student, (~keep_hidden).nonzero().flatten().tolist())
    model.train(was_training)
    after = unit_costs(student, seq_len)
    kept_at = costs if keep_hidden is None else costs_at(int(keep_hidden.sum()))
    predicted = kept_at.flops([int(k.sum()) for k in keep_heads], [int(k.sum()) for k in keep_neurons], dropped)
    times["total_s"] = time.perf_counter() - started
    summary = {
        "method": METHODS[importance],
        "importance": importance,
        "uniform": bool(uniform),
        "target_speedup": float(target_speedup),
        "seq_len": seq_len,
        "num_samples": len(rows),
        "tune_samples": tune_rows if tune else 0,
        "tune_bias": bool(tune and tune_bias),
        "biased_outputs": biased,
        "cost_model": _cost_model_name(cost_model, latency_batch_size, seq_len),
        "predicted_speedup": costs.total / predicted,
        "measured_speedup": retimed["speedup"] if retimed else None,
        "measured_noise": retimed["noise"] if retimed else None,
        "calibration": calibration,
        "timing": timing or None,
        "flops_before": flops.total,
        "flops_after": after.total,
        "flops_ratio": flops.total / after.total,
        "heads_before": costs.heads,
        "heads_after": after.heads,
        "ffn_before": costs.neurons,
        "ffn_after": after.neurons,
        "pruned_heads": {str(k): v for k, v in pruned_heads.items()},
        "pruned_neurons": {str(k): len(v) for k, v in pruned_neurons.items()},
        "dropped_layers": dropped,
        "hidden_before": hidden,
        "hidden_after": hidden_width(student),
        "structure_search": explored or None,
        "tuning": tuning,
        "wall_time_s": {k: round(v, 3) for k, v in times.items()},
    }
    logger.info(
        "Pruned without training to %.3fx FLOPs (target %.2fx, %s; predicted %.3fx) in %.1f s: heads %d -> %d, FFN "
        "%d -> %d.",
        summary["flops_ratio"],
        target_speedup,
        summary["cost_model"],
        summary["predicted_speedup"],
        times["total_s"],
        sum(costs.heads),
        sum(after.heads),
        sum(costs.neurons),
        sum(after.neurons),
    )
    return student, summary
