"""Choosing what to prune, the way NNI's `config_list` does: presets, layers, exact names, patterns, exclusions.

An entry is a dict of selectors (all those given must match) plus, for targets, a sparsity and a block shape:

    {"preset": "linear", "sparsity": 0.5}                       # every nn.Linear
    {"preset": "attention", "layers": [0, 1, 2], "sparsity": 0.6}
    {"patterns": ["attention\\.self\\.(query|key)"], "block_shape": [32, 32]}
    {"names": ["bert.pooler.dense"]}

`exclude` entries use the same selectors and remove their modules from every target. Presets come from the
family's adapter, so they work for every supported model type.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

import yaml
from torch import nn
from transformers.utils import logging

from ..models import structure
from ..models.adapter import ATTENTION, MLP

logger = logging.get_logger(__name__)

__all__ = ["PRESETS", "parse_entries", "Selection", "resolve_selection", "layer_sparsities"]

PRESETS = ("attention", "ffn", "linear")
SELECTORS = ("preset", "layers", "names", "patterns")
TARGET_KEYS = SELECTORS + ("sparsity", "block_shape")


def _as_list(value, kind):
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    return [kind(v) for v in values]


def parse_entries(entries, field_name: str) -> list[dict] | None:
    """Validates and normalises target / exclude entries (a list of dicts, or its JSON / YAML text).

    Args:
        entries: None, a list of dicts, or a string holding one.
        field_name: "pruning_targets" or "pruning_exclude" (exclude entries take selectors only).

    Returns:
        A list of normalised dicts, or None.
    """
    if entries is None:
        return None
    if isinstance(entries, str):
        try:
            entries = json.loads(entries)
        except json.JSONDecodeError:
            entries = yaml.safe_load(entries)
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{field_name} must be a list of dicts, e.g. [{{'preset': 'attention', 'sparsity': 0.5}}].")
    allowed = TARGET_KEYS if field_name == "pruning_targets" else SELECTORS
    parsed = []
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"{field_name}[{i}] has unknown keys {unknown}. Valid keys: {', '.join(allowed)}.")
        if not any(entry.get(k) is not None for k in SELECTORS):
            raise ValueError(f"{field_name}[{i}] selects nothing: give at least one of {', '.join(SELECTORS)}.")
        out = {}
        if entry.get("preset") is not None:
            if entry["preset"] not in PRESETS:
                raise ValueError(f"{field_name}[{i}]: preset {entry['preset']!r} is not known. Use one of {PRESETS}.")
            out["preset"] = entry["preset"]
        for key, kind in (("layers", int), ("names", str), ("patterns", str)):
            if entry.get(key) is not None:
                out[key] = _as_list(entry[key], kind)
        for pattern in out.get("patterns", []):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{field_name}[{i}]: {pattern!r} is not a valid regular expression: {err}") from err
        if entry.get("sparsity") is not None:
            sparsity = float(entry["sparsity"])
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(
                    f"{field_name}[{i}]: sparsity={sparsity} is outside [0, 1): it is the fraction removed, e.g. 0.5."
                )
            out["sparsity"] = sparsity
        if entry.get("block_shape") is not None:
            block = _as_list(entry["block_shape"], int)
            block = block * 2 if len(block) == 1 else block
            if len(block) != 2 or min(block) <= 0:
                raise ValueError(f"{field_name}[{i}]: block_shape must be one or two positive integers, e.g. [32].")
            out["block_shape"] = block
        parsed.append(out)
    return parsed


@dataclass
class Selection:
    """One selected Linear module.

    Args:
        name: qualified module name.
        module: the nn.Linear.
        entry: index of the target entry that selected it.
        sparsity: its target sparsity.
        block: its block shape.
        layer / role / kind: its layer, its role in the family's adapter and whether it is an attention or MLP
            projection (None outside the layers).
    """

    name: str
    module: nn.Linear
    entry: int
    sparsity: float
    block: tuple[int, int]
    layer: int | None
    role: str | None
    kind: str | None = None


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.3)
    return ", ".join(close or candidates[:5])


def _match(model, entry: dict, linears: dict[str, nn.Linear], roles: dict[str, tuple], where: str):
    names = list(linears)
    if entry.get("preset") == "attention":
        names = [n for n in names if n in roles and roles[n][2] == ATTENTION]
    elif entry.get("preset") == "ffn":
        names = [n for n in names if n in roles and roles[n][2] == MLP]
    if entry.get("layers") is not None:
        n_layers = len(structure.get_layers(model))
        bad = [i for i in entry["layers"] if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"{where}: layers {bad} out of range; the model has layers 0..{n_layers - 1}.")
        names = [n for n in names if structure.layer_of(model, n) in set(entry["layers"])]
    if entry.get("names") is not None:
        for exact in entry["names"]:
            if exact not in linears:
                raise ValueError(
                    f"{where}: no Linear module is named {exact!r}. Nearest module names: "
                    f"{_nearest(exact, list(linears))}."
                )
        names = [n for n in names if n in set(entry["names"])]
    for pattern in entry.get("patterns") or []:
        if not any(re.search(pattern, n) for n in linears):
            raise ValueError(
                f"{where}: pattern {pattern!r} matches no Linear module. Nearest module names: "
                f"{_nearest(pattern, list(linears))}."
            )
    if entry.get("patterns"):
        names = [n for n in names if any(re.search(p, n) for p in entry["patterns"])]
    if not names:
        raise ValueError(f"{where}: {entry} matches no module (its selectors exclude each other).")
    return names


def resolve_selection(
    model: nn.Module, targets: list[dict], exclude: list[dict] | None, default_sparsity: float, default_block=None
) -> list[Selection]:
    """Resolves target and exclude entries to the Linear modules they select, in model order.

    Args:
        model: the model.
        targets / exclude: entries as returned by `parse_entries`.
        default_sparsity: sparsity of entries that give none.
        default_block: block of entries that give none (default: one head's width, square).

    Returns:
        The selected modules; raises `ValueError` for a selector that matches nothing, an exclusion that removes
        every target, or two entries that give one module different sparsities or blocks.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.numel() > 0}
    roles = {
        name: (layer, role, kind)
        for kind in (ATTENTION, MLP)
        for name, (layer, role) in structure.role_modules(model, (kind,)).items()
    }
    size = structure.head_size(model)
    block_default = tuple(default_block) if default_block else (size, size)
    chosen: dict[str, Selection] = {}
    for i, entry in enumerate(targets):
        sparsity = entry.get("sparsity", default_sparsity)
        block = tuple(entry.get("block_shape") or block_default)
        for name in _match(model, entry, linears, roles, f"pruning_targets[{i}]"):
            prev = chosen.get(name)
            if prev is not None and (prev.sparsity, prev.block) != (sparsity, block):
                raise ValueError(
                    f"{name} is selected by pruning_targets[{prev.entry}] (sparsity {prev.sparsity}, block "
                    f"{list(prev.block)}) and pruning_targets[{i}] (sparsity {sparsity}, block {list(block)}). "
                    "Give it one sparsity: narrow one entry or add an exclude entry."
                )
            if prev is None:
                layer, role, kind = roles.get(name, (None, None, None))
                chosen[name] = Selection(name, linears[name], i, sparsity, block, layer, role, kind)
    excluded: set[str] = set()
    for i, entry in enumerate(exclude or []):
        excluded.update(_match(model, entry, linears, roles, f"pruning_exclude[{i}]"))
    selected = [s for n, s in chosen.items() if n not in excluded]
    if not selected:
        raise ValueError(
            "pruning_exclude removes every module that pruning_targets selects: nothing is left to prune. "
            "Narrow the exclude entries or widen the targets."
        )
    order = {n: k for k, n in enumerate(linears)}
    return sorted(selected, key=lambda s: order[s.name])


def layer_sparsities(model: nn.Module, selection: list[Selection], kind: str) -> list[float]:
    """Per-layer sparsity of a structure pruned per layer (MLP neurons with `"mlp"`, whole attention units with
    `"attention"`): a layer is pruned when one of its projections of that kind is selected; others keep everything.
    """
    sparsities = [0.0] * len(structure.get_layers(model))
    for s in selection:
        if s.kind == kind:
            sparsities[s.layer] = s.sparsity
    return sparsities
