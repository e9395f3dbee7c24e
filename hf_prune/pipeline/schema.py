"""Recipe files: their schema, validation, `--set` overrides and path resolution, and the checks made before a run.

A recipe is a YAML mapping (see `recipe.py` for an example); [`load_recipe`] reads one, applies overrides,
resolves its relative paths and returns a validated [`Recipe`]. Running it is the job of `recipe.py`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import torch
import yaml

from ..config import PruningArguments
from ..posttrain.search import COST_MODELS, IMPORTANCES
from .causal_lm import block_size_of
from .context import CHECKPOINTS_SUBDIR, stage_folder
from .data import train_files, validation_files
from .images import check_image_recipe
from .sources import check_model_source, check_task_model, check_uniform_stages, looks_like_path
from .stage_outputs import check_onnx_options, check_onnx_order
from .stages import RUNNER_ARGS, SPEEDUP_STAGES, STAGE_ARG_RULES, STAGE_OPTIONS, STAGE_TYPES
from .tasks import TaskSpec, parse_task

__all__ = [
    "Recipe",
    "load_recipe",
    "validate_recipe",
    "apply_overrides",
    "packaged_recipe",
    "check_recipe",
    "argument_names",
    "TOP_LEVEL_KEYS",
    "UNHASHED_KEYS",
]

TOP_LEVEL_KEYS = (
    "model", "tokenizer", "teacher", "task", "data", "seed", "output_dir", "defaults", "stages", "keep_checkpoints",
    "description",
)  # fmt: skip
DATA_KEYS = (
    "train_file", "validation_file", "max_train_samples", "max_eval_samples", "max_seq_length", "demo_train_size",
    "demo_eval_size", "block_size",
)  # fmt: skip
STAGE_KEYS = ("stage", "name", "args")
# Keys that do not change what a run computes: a rerun may differ in them.
UNHASHED_KEYS = ("output_dir", "description", "keep_checkpoints")
# Arguments the runner owns: each stage trains into its own `NN-name/checkpoints`.
RUNNER_OWNED_ARGS = ("output_dir",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-4` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def argument_names() -> set[str]:
    """Every key a stage's `args` (or `defaults`) may set: the fields of `PruningArguments`, read at runtime."""
    return {f.name for f in fields(PruningArguments) if f.init} - set(RUNNER_OWNED_ARGS)


def _check_keys(keys, valid, what: str) -> None:
    bad = [k for k in keys if k not in valid]
    if bad:
        hints = {k: difflib.get_close_matches(str(k), [str(v) for v in valid], n=1) for k in bad}
        hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(
            f"Unknown {what} {sorted(map(str, bad))}{' (' + hint + ')' if hint else ''}. "
            f"Valid {what}s: {', '.join(sorted(map(str, valid)))}."
        )


# ----------------------------------------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    """A validated recipe. Build it with [`load_recipe`] or [`validate_recipe`]."""

    model: str
    task: str | dict
    stages: list[dict]
    data: dict = field(default_factory=dict)
    seed: int = 42
    output_dir: str = "runs/recipe"
    defaults: dict = field(default_factory=dict)
    tokenizer: str | None = None
    teacher: str | None = None
    keep_checkpoints: bool = False
    description: str = ""
    source: str | None = None

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in TOP_LEVEL_KEYS}

    @property
    def task_spec(self) -> TaskSpec:
        """The recipe's task as a [`TaskSpec`] (label names still unknown when the data defines them)."""
        return parse_task(self.task)

    @property
    def hash(self) -> str:
        """sha256 of everything that changes what the run computes (not `output_dir` or `description`)."""
        content = {k: v for k, v in self.to_dict().items() if k not in UNHASHED_KEYS}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage_arguments(self, index: int, **overrides) -> PruningArguments:
        """The `PruningArguments` of the stage at `index` (1-based): runner defaults < `defaults` < the stage's rules
        < the stage's `args`."""
        spec = self.stages[index - 1]
        kwargs = dict(RUNNER_ARGS, seed=self.seed)
        if not torch.cuda.is_available():
            kwargs["dataloader_pin_memory"] = False
        kwargs.update(self.defaults)
        kwargs.update({k: default for k, (default, _) in STAGE_ARG_RULES.get(spec["stage"], {}).items()})
        kwargs.update(spec["args"])
        kwargs["output_dir"] = str(Path(self.output_dir) / stage_folder(index, spec) / CHECKPOINTS_SUBDIR)
        kwargs.update(overrides)
        try:
            return PruningArguments(**kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"Stage {index} ({spec['name']}): {err}") from err


def _stage_names(stages) -> list[str]:
    """Each stage's name: its `name`, else its type, with -2, -3 ... for repeated types."""
    names, seen = [], {}
    for entry in stages:
        entry = entry if isinstance(entry, Mapping) else {}
        if entry.get("name"):
            names.append(str(entry["name"]))
            continue
        kind = str(entry.get("stage", "stage"))
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}")
    return names


def _validate_stage(i: int, entry, name: str, valid_args: set[str]) -> dict:
    where = f"stages[{i}]"
    if not isinstance(entry, Mapping) or "stage" not in entry:
        raise ValueError(f"{where} must be a mapping with a `stage` key, e.g. {{stage: movement}}; got {entry!r}.")
    kind = entry["stage"]
    if kind not in STAGE_TYPES:
        raise ValueError(f"{where}: unknown stage {kind!r}. Valid stages: {', '.join(STAGE_TYPES)}.")
    options = STAGE_OPTIONS.get(kind, {})
    try:
        _check_keys(entry, (*STAGE_KEYS, *options), f"key of stage {name!r} ({kind})")
        if not isinstance(entry.get("args") or {}, Mapping):
            raise ValueError(f"`args` must be a mapping of PruningArguments fields, got {entry['args']!r}.")
        args = dict(entry.get("args") or {})
        _check_keys(args, valid_args, f"args key of stage {name!r} ({kind})")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not _NAME.match(name):
        raise ValueError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder).")
    for key, (_, allowed) in STAGE_ARG_RULES.get(kind, {}).items():
        if key in args and args[key] not in allowed:
            raise ValueError(f"{where}: a {kind} stage needs {key} in {list(allowed)}, got {args[key]!r}.")
    if kind == "prune_to_speedup":
        for key, valid in (("cost_model", COST_MODELS), ("importance", IMPORTANCES)):
            if entry.get(key, options[key]) not in valid:
                raise ValueError(f"{where}: {key}={entry[key]!r} is not known; use one of {', '.join(valid)}.")
        if not isinstance(entry.get("uniform", options["uniform"]), bool):
            raise ValueError(
                f"{where}: uniform={entry['uniform']!r} must be true or false (true: the same attention units and "
                "MLP width in every layer, exported as the family's own config)."
            )
        for key in ("drop_layers", "prune_hidden", "tune_bias"):
            if not isinstance(entry.get(key, options[key]), bool):
                raise ValueError(f"{where}: {key}={entry[key]!r} must be true or false.")
        for key, flag, what in (
            ("hidden_widths", "prune_hidden", "widths a narrowing search tries"),
            ("layer_counts", "drop_layers", "numbers of layers a search that drops layers may keep"),
        ):
            sizes = entry.get(key)
            if sizes is not None and (
                not isinstance(sizes, list)
                or not sizes
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)
            ):
                raise ValueError(f"{where}: {key}={sizes!r} must be a list of positive integers (the {what}).")
            if sizes is not None and not entry.get(flag, options[flag]):
                raise ValueError(f"{where}: {key} needs {flag}: true (the {what}).")
        for key in ("num_samples", "tune_samples", "batch_size", "latency_batch_size"):
            value = entry.get(key, options[key])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {key}={value!r} must be a positive integer.")
        rounds = entry.get("calibration_rounds", options["calibration_rounds"])
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(
                f"{where}: calibration_rounds={rounds!r} must be an integer >= 0 (0 trusts the cost model)."
            )
        threads, device = entry.get("cost_threads"), entry.get("cost_device")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"{where}: cost_threads={threads!r} must be a positive integer, or null for every core.")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"{where}: cost_device={device!r} must be a device name such as 'cpu' or 'cuda:0'.")
    if kind == "prune_heads" and not 0.0 < float(entry.get("min_masked", 1.0)) <= 1.0:
        raise ValueError(f"{where}: min_masked={entry['min_masked']} must be in (0, 1]; 1 removes fully masked heads.")
    if kind == "onnx":
        check_onnx_options(entry, options, where)
    spec = {"stage": kind, "name": name, "args": args}
    spec.update({k: copy.deepcopy(entry.get(k, default)) for k, default in options.items()})
    return spec


def _check_prune_heads_order(stages: list[dict], i: int) -> None:
    """`prune_heads` removes the heads of the movement stage's saved masks, by index: only right after that stage.

    A training stage in between trains without those masks (masked heads grow back), and a stage that removes
    heads or neurons in between (a first prune_heads, prune_to_speedup) shifts the indices the masks name.
    """
    spec = stages[i]
    movements = [j for j in range(i) if stages[j]["stage"] == "movement"]
    valid = "valid orders: movement -> prune_heads -> distill / taylor_ffn ..., with only evaluate or export between"
    if not movements:
        raise ValueError(
            f"Stage {spec['name']!r} (prune_heads) removes the heads a movement stage masked: put a movement stage "
            f"before it ({valid})."
        )
    between = [s for s in stages[movements[-1] + 1 : i] if s["stage"] not in ("evaluate", "export")]
    if between:
        other = between[0]
        why = (
            "removes units, so the masked head indices no longer name the same heads"
            if other["stage"] in ("prune_heads", "prune_to_speedup")
            else "trains without the movement masks, so masked heads grow back before they are removed"
        )
        raise ValueError(
            f"Stage {spec['name']!r} (prune_heads) must follow movement stage {stages[movements[-1]]['name']!r} "
            f"directly: {other['name']!r} ({other['stage']}) between them {why}. Use one prune_heads per movement "
            f"stage ({valid})."
        )


def validate_recipe(raw: Mapping, source: str | os.PathLike | None = None) -> Recipe:
    """Checks a recipe's structure and returns it as a [`Recipe`] (values are checked by `stage_arguments`).

    Args:
        raw: the parsed YAML (overrides already applied).
        source: the recipe file, for messages and the default `output_dir`.

    Returns:
        The recipe, with stage names and stage options filled in.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"A recipe is a mapping (model, task, stages, ...), got {type(raw).__name__}.")
    _check_keys(raw, TOP_LEVEL_KEYS, "top-level recipe key")
    for key in ("model", "task", "stages"):
        if raw.get(key) in (None, "", []):
            raise ValueError(f"The recipe has no `{key}`; it needs model, task and a non-empty list of stages.")
    task = parse_task(raw["task"])
    data = dict(raw.get("data") or {})
    _check_keys(data, DATA_KEYS, "data key")
    block_size_of(data, task)  # a causal-LM task's blocks; refused for other tasks
    if not task.generated and task.dataset is None and not task.dataset_kwargs:
        if not (data.get("train_file") and data.get("validation_file")):
            kinds = "jsonl or txt" if task.is_causal_lm else "jsonl, csv or tsv"
            kinds = "folders of one sub-folder per class" if task.is_image_classification else kinds
            raise ValueError(
                f"Task {task.name!r} names no dataset: give data.train_file and data.validation_file ({kinds}), or "
                "task.dataset (the arguments of datasets.load_dataset, e.g. [imdb])."
            )
    valid_args = argument_names()
    defaults = dict(raw.get("defaults") or {})
    for owned in RUNNER_OWNED_ARGS:
        if owned in defaults or any(owned in (s.get("args") or {}) for s in raw["stages"] if isinstance(s, Mapping)):
            raise ValueError(f"`{owned}` is set by the runner for each stage; set the top-level `output_dir` instead.")
    _check_keys(defaults, valid_args, "defaults key")
    if not isinstance(raw["stages"], Sequence) or isinstance(raw["stages"], str):
        raise ValueError("`stages` must be a list of {stage: ..., args: {...}} entries.")
    names = _stage_names(raw["stages"])
    stages = [_validate_stage(i, entry, name, valid_args) for i, (entry, name) in enumerate(zip(raw["stages"], names))]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Stage names {dupes} are used twice; give each stage a unique `name`.")
    exports = [s["path"] for s in stages if s["stage"] == "export"]
    if len(set(exports)) != len(exports):
        raise ValueError(f"Two export stages write to the same `path` {exports}; give each its own path.")
    teacher = raw.get("teacher")
    for i, spec in enumerate(stages):
        earlier = [s["stage"] for s in stages[:i]]
        if spec["stage"] == "prune_heads":
            _check_prune_heads_order(stages, i)
        if spec["stage"] == "onnx":
            check_onnx_order(stages, i)
        merged = {**defaults, **spec["args"]}
        if spec["stage"] in SPEEDUP_STAGES and merged.get("target_speedup") is None:
            raise ValueError(
                f"Stage {spec['name']!r} ({spec['stage']}) prunes to a speed: set target_speedup in its args, e.g. "
                "{target_speedup: 2.0}."
            )
        rules = STAGE_ARG_RULES.get(spec["stage"], {})
        alpha = merged.get("distill_alpha", 0.0) if "distill_alpha" not in rules else rules["distill_alpha"][0]
        hidden = merged.get("distill_hidden_weight", 0.0)
        distills = spec["stage"] != "finetune" and ((alpha or 0) > 0 or (hidden or 0) > 0)
        if distills and not teacher and "finetune" not in earlier:
            raise ValueError(
                f"Stage {spec['name']!r} distills (distill_alpha={alpha}) but there is no teacher: add a finetune "
                "stage before it, set `teacher:` to a fine-tuned model, or set distill_alpha: 0."
            )
    source = None if source is None else str(source)
    default_out = f"runs/{Path(source).stem}" if source else "runs/recipe"
    return Recipe(
        model=str(raw["model"]),
        task=copy.deepcopy(dict(raw["task"])) if isinstance(raw["task"], Mapping) else str(raw["task"]),
        stages=stages,
        data=data,
        seed=int(raw.get("seed", 42)),
        output_dir=str(Path(raw.get("output_dir") or default_out).expanduser().absolute()),
        defaults=defaults,
        tokenizer=None if raw.get("tokenizer") is None else str(raw["tokenizer"]),
        teacher=None if teacher is None else str(teacher),
        keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
        description=str(raw.get("description") or ""),
        source=source,
    )


# ----------------------------------------------------------------------------------------------------- overrides
def _parse_value(text: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _set_path(target: dict, parts: list[str], value, where: str) -> None:
    for part in parts[:-1]:
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {where}: {part!r} is not a mapping, so it has no key {parts[-1]!r}.")
        target = nxt
    target[parts[-1]] = value


def apply_overrides(raw: dict, overrides: Sequence[str] | None) -> dict:
    """Applies `key=value` overrides (dotted keys, values parsed as YAML) to a parsed recipe, in place.

    `stages.<stage>.<key>=v` selects a stage by its name, by its type (when one stage has it) or by its 1-based
    position; `<key>` is a stage key (`args`, `name`, export options) or else an argument, set in its `args`.

    Returns:
        `raw`.
    """
    for item in overrides or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like key=value, e.g. --set stages.movement.max_steps=100.")
        value, parts = _parse_value(text), key.split(".")
        if parts[0] != "stages" or len(parts) == 1:
            _set_path(raw, parts, value, key)
            continue
        stages = raw.get("stages") or []
        names, sel = _stage_names(stages), parts[1]
        matches = [i for i, n in enumerate(names) if n == sel]
        if not matches:
            matches = [i for i, s in enumerate(stages) if isinstance(s, Mapping) and s.get("stage") == sel]
        if not matches and sel.isdigit() and 1 <= int(sel) <= len(stages):
            matches = [int(sel) - 1]
        if len(matches) != 1:
            raise ValueError(
                f"--set {key}: {sel!r} selects {'no' if not matches else 'more than one'} stage. Use a stage name "
                f"({', '.join(names)}) or a 1-based position."
            )
        stage = stages[matches[0]]
        rest = parts[2:]
        if not rest:
            stages[matches[0]] = value
            continue
        if rest[0] not in (*STAGE_KEYS, *STAGE_OPTIONS.get(stage.get("stage"), {})):
            rest = ["args", ".".join(rest)]
        if rest[0] == "args" and stage.get("args") is None:
            stage["args"] = {}
        _set_path(stage, rest, value, key)
    return raw


def _resolve_paths(raw: dict, base: Path) -> None:
    """Makes the recipe's relative file paths absolute against `base` (data files always; models when they look like
    paths or exist there)."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_file", "validation_file"):
            value = data.get(key)
            if isinstance(value, str):
                data[key] = str((base / Path(value).expanduser()).resolve()) if value else value
            elif isinstance(value, list):
                data[key] = [str((base / Path(v).expanduser()).resolve()) for v in value]
            elif isinstance(value, dict):
                data[key] = {k: str((base / Path(v).expanduser()).resolve()) for k, v in value.items()}
    for key in ("model", "teacher", "tokenizer"):
        value = raw.get(key)
        if isinstance(value, str) and not value.startswith("builtin:"):
            candidate = base / Path(value).expanduser()
            if looks_like_path(value) or candidate.exists():
                raw[key] = str(candidate.resolve())


def load_recipe(
    recipe: str | os.PathLike | Mapping, overrides: Sequence[str] | None = None, output_dir: str | None = None
) -> Recipe:
    """Reads a recipe (a YAML file or a mapping), applies `--set` overrides and `output_dir`, and validates it.

    Args:
        recipe: a YAML file, or the recipe as a dict (its relative paths are resolved against the current directory).
        overrides: `key=value` strings (see [`apply_overrides`]).
        output_dir: replaces the recipe's `output_dir`.

    Returns:
        The validated [`Recipe`].
    """
    source = None
    if isinstance(recipe, Mapping):
        raw = copy.deepcopy(dict(recipe))
    else:
        source = Path(recipe)
        if not source.is_file():
            raise FileNotFoundError(f"Recipe file {source} does not exist. Pass a YAML file, e.g. recipes/demo.yaml.")
        try:
            raw = yaml.load(source.read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as err:
            raise ValueError(f"{source} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{source} must hold a mapping (model, task, stages, ...), got {type(raw).__name__}.")
        _resolve_paths(raw, source.parent.absolute())
    apply_overrides(raw, overrides)
    _resolve_paths(raw, Path.cwd())
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return validate_recipe(raw, source)


def packaged_recipe(name: str = "demo") -> Path:
    """Path of a recipe shipped inside the package (`hf_prune/recipes/<name>.yaml`)."""
    path = Path(str(resources.files("hf_prune").joinpath("recipes", f"{name}.yaml")))
    if not path.is_file():
        raise FileNotFoundError(f"The package ships no recipe {name!r} ({path}); reinstall hf-prune.")
    return path


# ----------------------------------------------------------------------------------------------------- checks
def check_recipe(recipe: Recipe) -> None:
    """Everything that can be checked before training: models (and whether they fit the task), data files, and
    every stage's arguments."""
    for what in ("model", "teacher", "tokenizer"):
        check_model_source(what, getattr(recipe, what))
    check_task_model(recipe, recipe.task_spec)
    check_uniform_stages(recipe)
    check_image_recipe(recipe)  # an image task's folders, and the stages it cannot run
    data = recipe.data
    files = [*train_files(data.get("train_file")), *validation_files(data.get("validation_file")).values()]
    folders = recipe.task_spec.is_image_classification  # whose data are folders, checked above
    for path in filter(None, files):
        if not (os.path.isdir(path) if folders else os.path.isfile(path)):
            raise FileNotFoundError(
                f"Data file {path} does not exist. Fix data.train_file / data.validation_file (relative paths in a "
                "recipe file are resolved against its folder, --set paths against the current directory)."
            )
    for i in range(1, len(recipe.stages) + 1):
        recipe.stage_arguments(i)
