"""Least-squares mask tuning (Kwon et al. 2022, section 4.3): layer by layer, the kept heads' and neurons'
contributions are rescaled so each layer's pre-LayerNorm sums match the dense model's on a sample; the scales are
folded into the output projections. Used by `posttrain.search.prune_to_speedup`.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from ..models import structure
from ..models.adapter import ATTENTION, MLP, ChannelSlice
from ..models.auto import get_adapter, is_causal_lm
from ..models.hidden import hidden_mask
from ..pruning.units import layer_units

__all__ = ["least_squares_scales", "held_out_batches", "tune_masks"]


def least_squares_scales(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solves the normal equations `gram @ s = rhs` of `min_s ||A s - r||^2` with `torch.linalg.lstsq` (a tiny ridge
    keeps units with no signal at a finite scale)."""
    gram, rhs = gram.double(), rhs.double()
    ridge = 1e-8 * gram.diagonal().abs().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.lstsq(gram + ridge * eye, rhs.unsqueeze(-1)).solution.squeeze(-1)


def held_out_batches(count: int, seed: int = 0) -> list[int]:
    """The batches whose error decides whether a layer's fitted scales are kept: a fifth of them (at least one),
    drawn at random with `seed`, so the held-out share is not one end of batches sorted by length.

    Args:
        count: the number of batches.
        seed: the seed of the draw.

    Returns:
        The indices of the held-out batches, in increasing order; the others are fitted.
    """
    if count < 2:
        raise ValueError(
            f"Least-squares mask tuning needs at least 2 batches (one to fit the scales on, one to check them on), "
            f"got {count}: raise tune_samples or lower batch_size."
        )
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed)))[: max(1, count // 5)]
    return sorted(chosen.tolist())


class _Sums:
    """Sums over one part of the sample's tokens of the fit's statistics: `A^T A`, `A^T r`, `r^T r`, and for the
    intercept the sums of each unit's contribution `A` (per unit and dimension), of `r`, and the token count."""

    def __init__(self, k: int, device):
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(k, dtype=torch.float64, device=device)
        self.rr = 0.0
        self.sa = self.sr = None
        self.n = 0

    def add(self, gram, rhs, rr, sa, sr, n) -> None:
        self.gram += gram.double()
        self.rhs += rhs.double()
        self.rr += float(rr)
        self.sa = sa.double() if self.sa is None else self.sa + sa.double()
        self.sr = sr.double() if self.sr is None else self.sr + sr.double()
        self.n += int(n)

    def error(self, s: torch.Tensor, c: torch.Tensor | None = None) -> float:
        """`sum_t ||r_t - A_t s - c||^2` from the sums."""
        err = s @ self.gram @ s - 2 * self.rhs @ s + self.rr
        if c is not None:
            err = err - 2 * c @ (self.sr - self.sa.t() @ s) + self.n * (c @ c)
        return float(err)


class _Stats:
    """Normal-equation statistics of the fit and the held-out part of the sample."""

    def __init__(self, k: int, device):
        self.fit, self.check = _Sums(k, device), _Sums(k, device)

    def add(self, held_out: bool, gram, rhs, rr, sa, sr, n) -> None:
        (self.check if held_out else self.fit).add(gram, rhs, rr, sa, sr, n)

    def solve(self, intercept: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
        """The scales and, with `intercept`, a constant per dimension fitted with them (FLAP's bias compensation, An
        et al. 2024, here the least-squares optimum jointly with the scales); each is kept only where it lowers the
        held-out error. Returns `(scales or None, constant or None, held-out error before, after)`."""
        ones = torch.ones_like(self.fit.rhs)
        before = self.check.error(ones)
        if self.fit.n == 0:
            return None, None, before, before
        candidates = []
        if len(ones):
            scales = least_squares_scales(self.fit.gram, self.fit.rhs)
            candidates.append((scales, None))
        if intercept:
            # centring over tokens: min_s sum ||(r - rbar) - (A - Abar) s||^2, then c = rbar - Abar s
            n, fit = self.fit.n, self.fit
            a_bar, r_bar = fit.sa / n, fit.sr / n
            if len(ones):
                scales = least_squares_scales(fit.gram - n * a_bar @ a_bar.t(), fit.rhs - n * a_bar @ r_bar)
            else:
                scales = ones
            candidates.append((scales, r_bar - a_bar.t() @ scales))
        best = (None, None, before)
        for scales, c in candidates:
            finite = torch.isfinite(scales).all() and (c is None or torch.isfinite(c).all())
            err = self.check.error(scales, c) if finite else float("inf")
            if err < best[2]:
                best = (scales, c, err)
        return best[0], best[1], before, best[2]


def _capture(modules: dict[str, nn.Module]):
    """Forward pre-hooks storing the first input of each module (by key) on each call."""
    seen, handles = {}, []
    for key, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, args, key=key: seen.__setitem__(key, args[0])))
    return seen, handles


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Each batch's input to the first layer, and per batch the arguments the model passes to each layer: layers of
    another attention type (sliding-window or global, as in ModernBERT) get another mask and rotary table."""
    layers = structure.get_layers(model)
    inputs, extras = [], []

    def hook(module, args, kwargs, i):
        if i == 0:
            inputs.append(args[0])
            extras.append([])
        extras[-1].append((args[1:], kwargs))
        if i == len(layers) - 1:
            raise _Stop

    handles = [layer.register_forward_pre_hook(partial(hook, i=i), with_kwargs=True) for i, layer in enumerate(layers)]
    # no KV cache: the captured arguments are replayed on every layer call, and a cache would grow with each call
    # (later calls would attend to the keys of earlier ones)
    extra = {"use_cache": False} if is_causal_lm(model) else {}
    try:
        for batch in batches:
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, extras


def _cols(s: ChannelSlice, unit: int) -> slice:
    """The channels of one unit in its output projection."""
    start = s.offset + unit * s.width
    return slice(start, start + s.width)


def _call_layer(layer, x, extra):
    out = layer(x, *extra[0], **extra[1])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def tune_masks(
    student: nn.Module,
    dense: nn.Module,
    batches: list[dict],
    keep_heads,
    keep_neurons,
    first_token_last: bool,
    seed: int = 0,
    keep_hidden: torch.Tensor | None = None,
    dropped: tuple[int, ...] | list[int] = (),
    bias: bool = False,
) -> list[dict]:
    """Least-squares scales of the kept heads and neurons, layer by layer, folded into the student's weights.

    The scales are fitted on four fifths of the batches and kept only where they lower the error on the others (see
    [`held_out_batches`]).

    Args:
        student: the model whose removed units' output columns are zeroed; its scales are folded in place.
        dense: the model whose layer outputs are matched.
        batches: collated batches (at least 2) on the models' device.
        keep_heads / keep_neurons: per layer, bool keep-masks of the attention units and MLP neurons.
        first_token_last: fit the last layer on the first token alone: a sequence classifier reads nothing else of it
            (Kwon et al. fit the last FFN of classifiers on the CLS token too).
        seed: the seed of the held-out batches' draw.
        keep_hidden: bool keep-mask of the residual dimensions the student keeps (None: all): the student then runs
            as with them removed ([`hf_prune.models.hidden.hidden_mask`]) and the fit matches the kept dimensions.
        dropped: layers the student will lose whole: it skips them (its input passes on), so the next layer's fit
            makes up for them against the dense model's output of the dropped layer.
        bias: also fit, jointly with the scales, a constant per output dimension of each attention and MLP block,
            folded into its output projection's bias (FLAP's bias compensation, An et al. 2024: the mean of what the
            removed units added), in layers whose output projections have a bias; like the scales it is kept only
            where it lowers the held-out error.

    Returns:
        Per layer, `{"layer", "heads", "neurons"}` (`heads` / `neurons` where the layer keeps any, or gets a bias):
        whether the scales and the bias were kept and the held-out error before and after them.
    """
    checked = set(held_out_batches(len(batches), seed))
    held_out = [i in checked for i in range(len(batches))]
    xd, extras = _layer_inputs(dense, batches)
    masked = hidden_mask(student, keep_hidden) if keep_hidden is not None else nullcontext()
    with masked:
        return _tune_layers(student, dense, batches, (keep_heads, keep_neurons), first_token_last, held_out,
                            (xd, extras), keep_hidden, set(dropped), bias)  # fmt: skip


def _tune_layers(
    student, dense, batches, keeps, first_token_last, held_out, dense_inputs, keep_hidden, dropped, intercept
) -> list[dict]:
    """The layer-by-layer fit of [`tune_masks`] (`keeps`: the head and neuron keep-masks; `dense_inputs`: the dense
    model's first-layer inputs and, per batch, each layer's arguments)."""
    adapter = get_adapter(student)
    (keep_heads, keep_neurons), (xd, extras) = keeps, dense_inputs
    # the student's own layer inputs: with hidden dimensions removed, its embeddings are normalised over the kept ones
    # and its own layer arguments (tables on the stream, e.g. DeBERTa's normalised relative embeddings, are narrower)
    xs, s_extras = (list(xd), extras) if keep_hidden is None else _layer_inputs(student, batches)
    dims = slice(None) if keep_hidden is None else keep_hidden.nonzero().flatten().to(xd[0].device)
    all_tokens = [structure.token_mask(student, b) for b in batches]
    first_tokens = []
    for mask in all_tokens:
        first = torch.zeros_like(mask)
        first[:, 0] = True
        first_tokens.append(first)
    last_layer = len(structure.get_layers(student)) - 1
    report = []
    s_attn, s_mlp = layer_units(student, ATTENTION), layer_units(student, MLP)
    d_attn, d_mlp = layer_units(dense, ATTENTION), layer_units(dense, MLP)
    for layer_idx, (s_layer, d_layer) in enumerate(zip(structure.get_layers(student), structure.get_layers(dense))):
        if layer_idx in dropped:  # the student skips it; the dense model runs it
            xd = [_call_layer(d_layer, x, extras[b][layer_idx]) for b, x in enumerate(xd)]
            report.append({"layer": layer_idx, "dropped": True})
            continue
        # the projections the fit reads: the attention and MLP outputs, and the module whose input is the residual
        # stream the MLP output is added to
        s_lin = {
            "attention_output": s_attn[layer_idx].output_linear,
            "ffn_out": s_mlp[layer_idx].output_linear,
            "mlp_residual": s_layer.get_submodule(adapter.mlp_residual_path),
        }
        d_lin = {
            "attention_output": d_attn[layer_idx].output_linear,
            "ffn_out": d_mlp[layer_idx].output_linear,
            "mlp_residual": d_layer.get_submodule(adapter.mlp_residual_path),
        }
        head_slice = s_attn[layer_idx].group.output
        entry = {"layer": layer_idx}
        tokens = first_tokens if first_token_last and layer_idx == last_layer else all_tokens
        # dense targets: the pre-LayerNorm sums of the attention block (residual: the layer input) and of the FFN
        # (residual: the FFN input)
        seen, handles = _capture(d_lin)
        attn_target, ffn_target, next_d = [], [], []
        for b, x in enumerate(xd):
            next_d.append(_call_layer(d_layer, x, extras[b][layer_idx]))
            attn_target.append(d_lin["attention_output"](seen["attention_output"]) + x)
            ffn_target.append(d_lin["ffn_out"](seen["ffn_out"]) + seen["mlp_residual"])
        for h in handles:
            h.remove()
        heads = keep_heads[layer_idx].nonzero().flatten().tolist()
        neurons = keep_neurons[layer_idx].nonzero().flatten().tolist()
        w_o, b_o = s_lin["attention_output"].weight, s_lin["attention_output"].bias
        # with the intercept, a layer that keeps no head still gets the constant that stands in for them (FLAP)
        if heads or (intercept and b_o is not None):
            stats = _Stats(len(heads), w_o.device)
            seen, handles = _capture({"ctx": s_lin["attention_output"]})
            for b, x in enumerate(xs):
                _call_layer(s_layer, x, s_extras[b][layer_idx])
                ctx = seen["ctx"][tokens[b]]  # (tokens, units * width)
                r = (attn_target[b][tokens[b]] - x[tokens[b]] - (b_o if b_o is not None else 0))[:, dims].double()
                parts = [ctx[:, _cols(head_slice, h)] @ w_o[:, _cols(head_slice, h)].t() for h in heads]
                parts = torch.stack(parts)[..., dims].double() if heads else r.new_zeros(0, *r.shape)
                flat = parts.flatten(1)  # (k, tokens * hidden kept)
                stats.add(held_out[b], flat @ flat.t(), flat @ r.flatten(), r.pow(2).sum(), parts.sum(dim=1),
                          r.sum(dim=0), r.shape[0])  # fmt: skip
            for h in handles:
                h.remove()
            scales, const, before, after = stats.solve(intercept and b_o is not None)
            if scales is not None:
                for h, scale in zip(heads, scales.tolist()):
                    w_o[:, _cols(head_slice, h)] *= scale
            if const is not None:
                b_o[dims] += const.to(b_o.dtype)
            entry["heads"] = {"tuned": scales is not None and bool(heads), "bias": const is not None,
                              "held_out_error": [before, after]}  # fmt: skip
        w_down, b_down = s_lin["ffn_out"].weight, s_lin["ffn_out"].bias
        if neurons or (intercept and b_down is not None):
            stats = _Stats(len(neurons), w_down.device)
            kept = torch.tensor(neurons, device=w_down.device, dtype=torch.long)
            w = w_down[dims][:, kept].double()
            ww = w.t() @ w
            seen, handles = _capture({"act": s_lin["ffn_out"], "res": s_lin["mlp_residual"]})
            for b, x in enumerate(xs):
                _call_layer(s_layer, x, s_extras[b][layer_idx])
                act = seen["act"][tokens[b]][:, kept].double()  # (tokens, k)
                r = (ffn_target[b] - seen["res"] - (b_down if b_down is not None else 0))[tokens[b]][:, dims].double()
                # A = [act_j * w_j]: A^T A = (act^T act) * (w^T w), A^T r = sum_tokens act * (r @ w), and the sum of
                # unit j's contributions over tokens is sum(act_j) * w_j
                stats.add(held_out[b], (act.t() @ act) * ww, (act * (r @ w)).sum(dim=0), r.pow(2).sum(),
                          act.sum(dim=0)[:, None] * w.t(), r.sum(dim=0), r.shape[0])  # fmt: skip
            for h in handles:
                h.remove()
            scales, const, before, after = stats.solve(intercept and b_down is not None)
            if scales is not None:
                w_down[:, kept] *= scales.to(w_down.dtype)
            if const is not None:
                b_down[dims] += const.to(b_down.dtype)
            entry["neurons"] = {"tuned": scales is not None and bool(neurons), "bias": const is not None,
                                "held_out_error": [before, after]}  # fmt: skip
        xs = [_call_layer(s_layer, x, s_extras[b][layer_idx]) for b, x in enumerate(xs)]
        xd = next_d
        report.append(entry)
    return report
