"""Retraining-free pruning to a speed target: Fisher mask search, mask rearrangement and least-squares mask tuning
(Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"), ending in physical removal.

1. Importance: mask variables multiply the output of every head (the input columns of the attention output
   projection) and of every FFN neuron (the input of the down projection). Their gradients are taken per example
   (each example gets its own copy of the masks, so the gradient of the summed loss with respect to that copy is the
   example's own gradient) and the Fisher information of a unit is the sum of its squared per-example gradients.
2. Search: `costs.allocate_units` keeps the heads and neurons with the most Fisher information that fit in the FLOPs
   budget of the target speedup; then, within each layer, a greedy swap picks the set to remove that minimises
   `sum_examples (sum_removed g)^2`, the loss increase the layer's block of the Fisher matrix predicts.
3. Tuning (`mask_tuning.py`): layer by layer, the kept heads' and neurons' contributions are rescaled by least
   squares (`torch.linalg.lstsq` on the normal equations) so the layer's pre-LayerNorm sums match the dense model's
   on the sample; a scale is kept only if it lowers the error on held-out examples of the sample.
4. Removal: the scales are folded into the output projections and the pruned units are removed (`prune_heads`,
   `prune_ffn_neurons`); nothing is left masked.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import logging

from ..models import structure
from ..models.costs import (
    allocate_units,
    dummy_inputs,
    measured_unit_costs,
    speedup_budget,
    time_interleaved,
    unit_costs,
)
from ..models.surgery import prune_ffn_neurons, prune_heads
from .mask_tuning import tune_masks

logger = logging.get_logger(__name__)

__all__ = ["mask_gradients", "mask_fisher", "rearrange_layer", "prune_to_speedup"]

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


# ----------------------------------------------------------------------------------------------------- data
def _examples(dataset, count: int, seed: int) -> list[dict]:
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: pass tokenized examples with labels.")
    first = dataset[0]
    if "labels" not in first and "label" not in first:
        raise ValueError(
            f"The dataset has no `labels` (or `label`) column, but the Fisher information needs the loss: its columns "
            f"are {sorted(first)}. Pass tokenized examples with their labels."
        )
    if "input_ids" not in first:
        raise ValueError(f"The dataset has no `input_ids` column (its columns: {sorted(first)}); tokenize it first.")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    rows = []
    for i in order:
        row = dataset[int(i)]
        row = {("labels" if k == "label" else k): v for k, v in row.items()}
        rows.append({k: row[k] for k in _INPUT_KEYS if k in row})
    return rows


def _pad_collate(pad_id: int):
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key in rows[0]:
            if key == "labels":
                batch[key] = torch.as_tensor([torch.as_tensor(r[key]).tolist() for r in rows])
                continue
            fill = pad_id if key == "input_ids" else 0
            values = [torch.as_tensor(r[key]).tolist() for r in rows]
            batch[key] = torch.tensor([v + [fill] * (length - len(v)) for v in values])
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
            )
        return batch

    return collate


def _batches(rows: list[dict], batch_size: int, collate, device) -> list[dict[str, torch.Tensor]]:
    # Similar lengths together: less padding, the same examples.
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        out.append({k: v.to(device) for k, v in batch.items() if k in _INPUT_KEYS})
    return out


# ----------------------------------------------------------------------------------------------------- importance
def _layer_units(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear, int]]:
    spec, size = structure.get_spec(model), structure.head_size(model)
    return [
        (structure.get_module(layer, spec.attention_output), structure.get_module(layer, spec.ffn_out), size)
        for layer in structure.get_layers(model)
    ]


@contextmanager
def _unit_masks(model: nn.Module, head_masks: list[torch.Tensor], neuron_masks: list[torch.Tensor]):
    """Multiplies each head's and neuron's output by its mask, per example (`(batch, units)` masks)."""
    handles = []

    def head_hook(mask, size):
        def hook(module, args):
            x = args[0]
            shape = x.shape
            scaled = x.view(*shape[:-1], -1, size) * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), -1, 1)
            return (scaled.view(shape), *args[1:])

        return hook

    def neuron_hook(mask):
        def hook(module, args):
            x = args[0]
            return (x * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), -1), *args[1:])

        return hook

    try:
        for (attn_out, ffn_out, size), hm, nm in zip(_layer_units(model), head_masks, neuron_masks):
            if hm.shape[-1] > 0:
                handles.append(attn_out.register_forward_pre_hook(head_hook(hm, size)))
            if nm.shape[-1] > 0:
                handles.append(ffn_out.register_forward_pre_hook(neuron_hook(nm)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_gradients(model: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-example gradients of the loss with respect to every head's and every neuron's mask, at masks of one.

    Args:
        model: a model with a loss (the batches carry `labels`), in eval mode for deterministic outputs.
        batches: collated batches on the model's device.

    Returns:
        `(head_grads, neuron_grads)`: per layer, a float tensor `(examples, heads)` / `(examples, neurons)`.
    """
    heads, neurons = structure.num_heads(model), structure.ffn_size(model)
    head_grads, neuron_grads = [[] for _ in heads], [[] for _ in neurons]
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the masks' gradients are needed
    try:
        for batch in batches:
            size = batch["input_ids"].shape[0]
            device = batch["input_ids"].device
            hm = [torch.ones(size, h, device=device, requires_grad=True) for h in heads]
            nm = [torch.ones(size, n, device=device, requires_grad=True) for n in neurons]
            with _unit_masks(model, hm, nm):
                loss = model(**batch).loss
            # The loss is a batch mean: times the batch size it is the sum of per-example losses, whose gradient with
            # respect to an example's own copy of the masks is that example's gradient.
            wanted = [m for m in hm + nm if m.shape[-1] > 0]
            grads = iter(torch.autograd.grad(loss * size, wanted))
            for store, masks in ((head_grads, hm), (neuron_grads, nm)):
                for i, m in enumerate(masks):
                    store[i].append(next(grads).detach().float().cpu() if m.shape[-1] > 0 else torch.zeros(size, 0))
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return [torch.cat(g) for g in head_grads], [torch.cat(g) for g in neuron_grads]


def mask_fisher(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The diagonal Fisher information of each unit: the sum over examples of its squared gradient."""
    return [g.pow(2).sum(dim=0) for g in grads]


def rearrange_layer(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Chooses which units of one layer to remove, keeping their number (Kwon et al. 2022, section 4.2).

    The loss increase of removing a set `S` is estimated with the layer's block of the empirical Fisher matrix,
    `sum_examples (sum_{j in S} g_j)^2`: units whose gradients cancel are cheaper together than their diagonal
    terms say. Starting from the units of least diagonal Fisher, each other unit (in increasing order) is swapped in
    if that lowers the estimate; it never rises.

    Args:
        keep: bool keep-mask of the layer's units (its number of False is kept).
        grads: per-example gradients `(examples, units)`.

    Returns:
        The new keep-mask.
    """
    removed = int((~keep).sum())
    if removed == 0 or removed == keep.numel():
        return keep.clone()
    g = grads.double().t().contiguous()  # (units, examples)
    order = torch.sort(g.pow(2).sum(dim=1), stable=True).indices.tolist()
    chosen = order[:removed]
    total = g[chosen].sum(dim=0)
    for unit in order[removed:]:
        candidates = chosen + [unit]
        with_unit = total + g[unit]
        drop = int(torch.argmin((with_unit.unsqueeze(0) - g[candidates]).pow(2).sum(dim=1)))
        if candidates[drop] != unit:
            total = with_unit - g[candidates[drop]]
            chosen = candidates[:drop] + candidates[drop + 1 :]
    new_keep = torch.ones_like(keep)
    new_keep[torch.tensor(chosen, dtype=torch.long)] = False
    return new_keep


# ----------------------------------------------------------------------------------------------------- calibration
# How far calibration may move the goal from the target. The fitted line missed measured speedups by 7-12% on MiniLM
# at batch 32 on a CPU; a miss several times larger comes from a busy machine (threads of other processes slow a
# small model more than a big one), and following it would prune far past the target.
MAX_CORRECTION = 1.25


def _removed(keeps: list[torch.Tensor]) -> dict[int, list[int]]:
    """`{layer: [unit indices to remove]}` of per-layer keep-masks (layers keeping every unit left out)."""
    return {i: (~k).nonzero().flatten().tolist() for i, k in enumerate(keeps) if not bool(k.all())}


def _shaped_copy(model: nn.Module, keep_heads: list[torch.Tensor], keep_neurons: list[torch.Tensor]) -> nn.Module:
    """An untuned copy with the kept units only: its forward time is the pruned model's (tuning changes values)."""
    shaped = copy.deepcopy(model).eval()
    prune_heads(shaped, _removed(keep_heads))
    prune_ffn_neurons(shaped, _removed(keep_neurons))
    return shaped


def measured_speedup(dense: nn.Module, pruned: nn.Module, batch_size: int, seq_len: int, repeats: int = 10) -> float:
    """Median forward time of `dense` over that of `pruned` at `batch_size` x `seq_len`, timed interleaved."""
    inputs = dummy_inputs(dense, batch_size, seq_len)
    dense_ms, pruned_ms = time_interleaved([dense, pruned], inputs, repeats, warmup=2)
    return statistics.median(dense_ms) / statistics.median(pruned_ms)


def _choose(candidates: list[dict], target: float) -> dict:
    """The timed candidate to keep: the slowest one that reaches the target (the most units kept), else the fastest."""
    reached = [c for c in candidates if c["measured_speedup"] >= target]
    if reached:
        return min(reached, key=lambda c: c["measured_speedup"])
    return max(candidates, key=lambda c: c["measured_speedup"])


# ----------------------------------------------------------------------------------------------------- the path
def _check_samples(rows: list[dict], tune_rows: int, hidden: int, units: int) -> None:
    tokens = sum(len(r["input_ids"]) for r in rows[:tune_rows])
    needed = 10 * units
    if tune_rows < 5 or tokens * hidden * 4 // 5 < needed:
        raise ValueError(
            f"Too few samples for the least-squares mask tuning: {tune_rows} examples ({tokens} tokens) give "
            f"{tokens * hidden * 4 // 5} equations on the 80% fitted, for up to {units} scales per layer (at least "
            f"{needed} and 5 examples are needed). Raise num_samples / tune_samples, or pass tune=False."
        )


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
    latency_batch_size: int = 32,
    calibration_rounds: int = 3,
) -> tuple[nn.Module, dict]:
    """Prunes heads and FFN neurons of a fine-tuned model to `target_speedup` times fewer FLOPs, without training.

    Args:
        model: a fine-tuned model of a supported architecture (it is left unchanged; a pruned copy is returned).
        dataset: tokenized examples with `input_ids` and `labels` (a `datasets.Dataset` or any indexable of dicts);
            a random sample of `num_samples` of them measures importance.
        target_speedup: dense FLOPs / pruned FLOPs of one forward pass at `seq_len` tokens (> 1); the result reaches
            it and exceeds it by at most 2%.
        num_samples: examples for the Fisher information (Kwon et al. use 2048).
        seq_len: sequence length of the FLOPs cost model.
        tune: rescale the kept units by least squares against the dense model.
        tune_samples: examples (of the sample) used for tuning; a fifth of them is held out to accept each layer's
            scales.
        rearrange: choose each layer's removed units with its block of the Fisher matrix.
        batch_size: examples per forward pass.
        data_collator: turns a list of examples into a batch (default: pads `input_ids` with the model's pad token).
        seed: draws the sample.
        cost_model: "flops" (counted, the default: `target_speedup` is a FLOPs ratio) or "latency" (head and neuron
            costs fitted to forward times measured on this machine at `latency_batch_size` x `seq_len`, see
            [`costs.measured_unit_costs`]: `target_speedup` is then a predicted speedup of this machine).
        latency_batch_size: the batch size the latency costs are measured at.
        calibration_rounds: with `cost_model="latency"`, the chosen shapes are timed against `model` (interleaved, at
            `latency_batch_size` x `seq_len`) and, while the measured speedup misses `target_speedup` or passes it by
            more than 3%, searched again with the goal scaled by 1.015 x target / measured, up to this many timings.
            The linear cost model misses what uneven layers cost (odd widths, per-layer overheads): the timing sees it.
            The slowest timed shapes that reach the target are kept (else the fastest). The goal moves at most 1.25x
            away from the target (`MAX_CORRECTION`; a larger miss means a busy machine). 0 trusts the cost model.

    Returns:
        `(pruned_model, summary)`: the physically pruned copy, and what was done and measured (FLOPs before / after and
        their ratio, heads and FFN width per layer, the removed units, the tuning per layer, the time of each phase).
    """
    structure.get_spec(model)
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup={target_speedup} must be > 1 (it is dense FLOPs / pruned FLOPs, e.g. 2).")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1 (Kwon et al. use 2048).")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    if cost_model not in ("flops", "latency"):
        raise ValueError(f"cost_model={cost_model!r} is not known: use 'flops' or 'latency'.")
    if calibration_rounds < 0:
        raise ValueError(f"calibration_rounds={calibration_rounds} must be >= 0 (0 trusts the cost model).")
    flops = unit_costs(model, seq_len)
    costs = flops if cost_model == "flops" else measured_unit_costs(model, seq_len, latency_batch_size)
    speedup_budget(costs, target_speedup)  # an unreachable target fails here, before the Fisher pass
    rows = _examples(dataset, num_samples, seed)
    if len(rows) < num_samples:
        logger.warning(
            "The dataset has %d examples, fewer than num_samples=%d: using them all.", len(rows), num_samples
        )
    hidden = model.config.hidden_size
    tune_rows = min(tune_samples, len(rows))
    if tune:
        _check_samples(rows, tune_rows, hidden, max([*costs.heads, *costs.neurons]))
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None)
    collate = data_collator or _pad_collate(pad if isinstance(pad, int) else 0)
    batches = _batches(rows, batch_size, collate, device)
    times = {}

    t = time.perf_counter()
    head_grads, neuron_grads = mask_gradients(model, batches)
    head_fisher, neuron_fisher = mask_fisher(head_grads), mask_fisher(neuron_grads)
    times["fisher_s"] = time.perf_counter() - t

    t = time.perf_counter()

    def search(goal: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # at most 2% over the goal: the kept units may spend down to budget - slack
        slack = costs.total / goal - costs.total / (1.02 * goal)  # in the cost model's unit
        return allocate_units(head_fisher, neuron_fisher, costs, speedup_budget(costs, goal), slack=slack / 2)

    keep_heads, keep_neurons = search(target_speedup)
    times["search_s"] = time.perf_counter() - t
    calibration = []
    if cost_model == "latency" and calibration_rounds > 0:
        t = time.perf_counter()
        goal = float(target_speedup)
        for _ in range(calibration_rounds):
            measured = measured_speedup(
                model, _shaped_copy(model, keep_heads, keep_neurons), latency_batch_size, seq_len
            )
            calibration.append({"goal": goal, "measured_speedup": measured, "keep": (keep_heads, keep_neurons)})
            logger.info("Calibration: shapes searched for %.3fx measure %.3fx.", goal, measured)
            if target_speedup <= measured <= 1.03 * target_speedup:
                break
            goal *= 1.015 * target_speedup / measured  # aim at the middle of the accepted window
            if not target_speedup / MAX_CORRECTION <= goal <= target_speedup * MAX_CORRECTION:
                logger.warning(
                    "Calibration stops: shapes predicted to run %.2fx faster measure %.2fx, further from the cost "
                    "model than a busy machine's noise usually puts them. Time on an otherwise idle machine (a "
                    "shared one slows small models more than big ones), or pass calibration_rounds=0.",
                    costs.total
                    / costs.flops([int(k.sum()) for k in keep_heads], [int(k.sum()) for k in keep_neurons]),
                    measured,
                )
                break
            if goal * 1.02 >= costs.max_speedup:
                logger.warning(
                    "Calibration stops: a measured %.2fx needs more than the %.2fx the cost model can reach.",
                    target_speedup,
                    costs.max_speedup,
                )
                break
            keep_heads, keep_neurons = search(goal)
        keep_heads, keep_neurons = _choose(calibration, target_speedup)["keep"]
        times["calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if rearrange:
        keep_heads = [rearrange_layer(k, g) for k, g in zip(keep_heads, head_grads)]
        keep_neurons = [rearrange_layer(k, g) for k, g in zip(keep_neurons, neuron_grads)]
    times["search_s"] += time.perf_counter() - t

    student = copy.deepcopy(model)
    size = structure.head_size(student)
    with torch.no_grad():
        for (attn_out, ffn_out, _), kh, kn in zip(_layer_units(student), keep_heads, keep_neurons):
            attn_out.weight[:, (~kh).repeat_interleave(size).to(device)] = 0.0
            ffn_out.weight[:, (~kn).to(device)] = 0.0
    tuning = []
    t = time.perf_counter()
    if tune:
        tune_batches = _batches(rows[:tune_rows], batch_size, collate, device)
        # a sequence classifier reads the first token of the last layer alone
        first_token = type(model).__name__.endswith("ForSequenceClassification")
        tuning = tune_masks(student, model, tune_batches, keep_heads, keep_neurons, first_token)
    times["tune_s"] = time.perf_counter() - t

    pruned_heads, pruned_neurons = _removed(keep_heads), _removed(keep_neurons)
    prune_heads(student, pruned_heads)
    prune_ffn_neurons(student, pruned_neurons)
    model.train(was_training)
    after = unit_costs(student, seq_len)
    predicted = costs.flops(after.heads, after.neurons)
    times["total_s"] = time.perf_counter() - started
    summary = {
        "method": "fisher mask search, rearrangement and least-squares tuning (Kwon et al. 2022)",
        "target_speedup": float(target_speedup),
        "seq_len": seq_len,
        "num_samples": len(rows),
        "tune_samples": tune_rows if tune else 0,
        "cost_model": cost_model if cost_model == "flops" else f"latency (ms at {latency_batch_size} x {seq_len})",
        "predicted_speedup": costs.total / predicted,
        "measured_speedup": _choose(calibration, target_speedup)["measured_speedup"] if calibration else None,
        "calibration": [{k: v for k, v in c.items() if k != "keep"} for c in calibration],
        "flops_before": flops.total,
        "flops_after": after.total,
        "flops_ratio": flops.total / after.total,
        "heads_before": costs.heads,
        "heads_after": after.heads,
        "ffn_before": costs.neurons,
        "ffn_after": after.neurons,
        "pruned_heads": {str(k): v for k, v in pruned_heads.items()},
        "pruned_neurons": {str(k): len(v) for k, v in pruned_neurons.items()},
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
