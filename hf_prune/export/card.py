"""The model card of an export (huggingface_hub `ModelCard` from `templates/model_card.md`), its head-map figure,
and uploads of an exported folder to the Hub."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from transformers.utils import logging

from ..models.auto import auto_class_name, get_adapter
from ..models.surgery import original_heads_kept
from ..utils import format_float, format_int
from .files import (
    BASE_MODEL_CONFIG_KEY,
    CARD_NAME,
    CONFIG_NAME,
    EVAL_CACHE_NAME,
    MODELING_NAME,
    PICKLE_SUFFIXES,
    REPORT_NAME,
    WEIGHTS_NAME,
    export_files,
)
from .report_format import deployment_machine_note, deployment_table, lower_is_better, metric_rows

logger = logging.get_logger(__name__)

__all__ = ["make_model_card", "lineage", "plot_head_map", "push_to_hub", "cli_push", "TEMPLATE"]

TEMPLATE = "model_card.md"
REQUIRED_FILES = (WEIGHTS_NAME, CONFIG_NAME, MODELING_NAME, CARD_NAME)

_PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
    "AutoModel": "feature-extraction",
}
_GLUE_TASKS = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The card's numbers are grouped by thousands (`1,234.50`).
_number = functools.partial(format_float, grouped=True)


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _processor(auto_class: str) -> tuple[str, str]:
    """The class and variable name of what makes the model's inputs: an image model's image processor, else the
    tokenizer."""
    return ("AutoImageProcessor", "image_processor") if "Image" in auto_class else ("AutoTokenizer", "tokenizer")


def _auto_class(config) -> str:
    """The Auto class that builds the export's own class (from `auto_map`, else from transformers' mappings)."""
    architectures = _get(config, "architectures") or []
    for auto_name, ref in (_get(config, "auto_map") or {}).items():
        if architectures and ref.endswith(f".Pruned{architectures[0]}"):
            return auto_name
    return auto_class_name(_get(config, "model_type"), architectures[0]) if architectures else "AutoModel"


def _datasets(report: Mapping) -> list[str] | None:
    dataset = report.get("dataset")
    if dataset:
        return [dataset] if isinstance(dataset, str) else list(dataset)
    task = report.get("task")
    if not task:
        return None
    if task.lower() in _GLUE_TASKS:
        return ["nyu-mll/glue"]
    if "/" in task:
        return [task.split(":")[0]]
    return None


def _hub_id(name) -> str | None:
    """`name` if it can be a Hub model id (not a local path), else None."""
    if not name or not isinstance(name, str) or os.path.exists(name) or not _HUB_ID.match(name):
        return None
    return name


def _local_name(name: str) -> str:
    """A local model folder as a card may name it: relative to the working folder when it lies inside it, else its
    own name; never an absolute path (nor one that climbs out of an export, as a report's paths do where the folder
    they name is not on this machine)."""
    path = Path(os.path.expanduser(name))
    if not path.is_absolute():
        return path.name if ".." in path.parts else path.as_posix()
    for base in (Path.cwd(), Path.cwd().resolve()):
        if path.is_relative_to(base) and path != base:
            return path.relative_to(base).as_posix()
    return path.name or "a local model"


def _recorded_base(name) -> str | None:
    """The base model a local model folder records in its `config.json` (`hf_prune_base_model`, written by the
    stages of `hf-prune run`), or None."""
    path = Path(os.path.expanduser(str(name))) / CONFIG_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(BASE_MODEL_CONFIG_KEY) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def lineage(report: Mapping | None, config=None) -> dict[str, str | None]:
    """Where an export comes from, as its model card names it.

    Args:
        report: the export's report (`base_model`, `dense_path` and `lineage` are read).
        config: the export's config (its recorded `hf_prune_base_model`).

    Returns:
        `{"base_model": ..., "teacher": ..., "teacher_id": ...}`: the Hub id of the model the teacher was fine-tuned
        from (the recipe's `model`, or the base the teacher, its folder or the export records; None when none is a
        Hub id), the dense teacher by Hub id or by a relative name (never an absolute path; None when unknown), and
        its Hub id (None for a local teacher).
    """
    report = report or {}
    recorded = report.get("lineage") or {}
    # the teacher: its folder, else the dense model's Hub id, else the recipe's model when that is a folder (a dense
    # model loaded from elsewhere, e.g. a built-in package, is no teacher to name)
    named = [report.get("dense_path"), _hub_id(recorded.get("teacher"))]
    named.append(report.get("base_model") if not _hub_id(report.get("base_model")) else None)
    dense = next((n for n in named if n and isinstance(n, str)), None)
    candidates = [recorded.get("base_model"), report.get("base_model")]
    for local in (report.get("base_model"), report.get("dense_path"), recorded.get("teacher")):
        if local and isinstance(local, str) and not _hub_id(local):
            candidates.append(_recorded_base(local))
    candidates += [_get(config, BASE_MODEL_CONFIG_KEY), _get(config, "_name_or_path"), recorded.get("teacher")]
    base = next((c for c in map(_hub_id, candidates) if c), None)
    teacher_id = _hub_id(dense)
    teacher = (teacher_id or _local_name(dense)) if dense else None
    return {"base_model": base, "teacher": teacher, "teacher_id": teacher_id}


def _summary(where: Mapping, task: str | None, model_type: str | None) -> str:
    """The card's first sentence: the teacher that was pruned and the model it was fine-tuned from."""
    base, teacher = where["base_model"], where["teacher"]
    tuned = f" fine-tuned on {task}" if task else " fine-tuned"
    if teacher and teacher != base:
        text = f"A structurally pruned version of `{teacher}`"
        if base:
            text += f", which is [`{base}`](https://huggingface.co/{base}){tuned}."
        else:
            text += f",{tuned}." if task else "."
    else:
        origin = f"`{base}`" if base else f"a model of type `{model_type}`"
        text = f"A structurally pruned version of {origin}" + (f",{tuned}." if task else ".")
    return text + " Attention heads and FFN neurons were removed physically, so the model is smaller and faster as is."


def _default_name(where: Mapping, task: str | None, model_type: str | None) -> str:
    """`<base model>-<task>-pruned`, e.g. `all-MiniLM-L6-v2-mnli-pruned` (the teacher's Hub id, or the model type,
    when the base model is unknown)."""
    stem = (where["base_model"] or where.get("teacher_id") or model_type or "model").split("/")[-1]
    task_name = (task or "").split("/")[-1].split(":")[0]
    if task_name and task_name.lower() not in stem.lower():
        stem += f"-{task_name}"
    return f"{stem}-pruned"


def _scaled(x, scale: float):
    return None if x is None else x / scale


def _results(report: Mapping) -> tuple[list[tuple[str, ...]], str]:
    params, size, flops = report.get("parameters") or {}, report.get("file_size") or {}, report.get("flops") or {}
    rows = []
    if params:
        for label, key in (("parameters", "total"), ("encoder parameters", "encoder")):
            before, after = params.get(f"{key}_before"), params.get(f"{key}_after")
            rows.append((label, format_int(before), format_int(after), _number(params.get(f"{key}_ratio"))))
    if size:
        before, after = _scaled(size.get("before_bytes"), 2**20), _scaled(size.get("after_bytes"), 2**20)
        rows.append(("weights (MiB)", _number(before), _number(after), _number(size.get("ratio"))))
    if flops:
        dense, pruned = _scaled(flops.get("dense"), 1e9), _scaled(flops.get("pruned"), 1e9)
        label = f"GFLOPs, 1 x {flops.get('seq_len', '?')} tokens"
        rows.append((label, _number(dense, 3), _number(pruned, 3), _number(flops.get("ratio"))))
    latency = report.get("latency") or {}
    for b in latency.get("batches", []):
        rows.append(
            (
                f"CPU latency, batch {b.get('batch_size', '?')} (ms)",
                _number(b.get("dense_ms")),
                _number(b.get("pruned_ms")),
                _number(b.get("speedup")),
            )
        )
    decode = report.get("decode") or {}
    if decode:
        rows.append(
            (
                f"decode tokens/s, batch 1, after {decode.get('prompt_len', '?')} tokens",
                _number(decode.get("dense_tokens_per_s")),
                _number(decode.get("pruned_tokens_per_s")),
                _number(decode.get("speedup")),
            )
        )
    env = report.get("environment") or {}
    note = (
        f"parameters counted once per tensor, FLOPs with `torch.utils.flop_counter.FlopCounterMode`, CPU latency as "
        f"the median of {latency.get('repeats', '?')} runs per model with dense and pruned timed interleaved in one "
        f"process ({env.get('num_threads', '?')} threads)."
    )
    return rows, note


def _hidden_note(report: Mapping) -> str:
    """`", 288 of 384 hidden dimensions"` where the residual width was pruned, else empty."""
    hidden = report.get("hidden_size") or {}
    if not hidden or hidden.get("kept") == hidden.get("dense"):
        return ""
    return f", {hidden['kept']} of {hidden['dense']} hidden dimensions"


def _layer_rows(config) -> list[tuple[str, str, str]]:
    _, dense_heads, dense_ffn = get_adapter(config).dense_shape(config)
    heads, ffn = get_adapter(config).config_shapes(config)
    n = len(heads)  # the layers the model has now (depth pruning removes some)
    return [(str(i), f"{heads[i]} / {dense_heads}", f"{ffn[i]} / {dense_ffn}") for i in range(n)]


def make_model_card(
    report: dict | None, config, *, repo_id: str | None = None, figure_name: str | None = "head_map.png"
) -> ModelCard:
    """Builds the model card of an export from the packaged template.

    Args:
        report: the dict from `hf_prune.export.report.build_report` (or None: the card then has no results section).
        config: the exported model's config (per-layer shapes recorded by `hf_prune.models.surgery.record_shapes`).
        repo_id: the Hub repo the card is for; used in the loading snippet and as the model name.
        figure_name: file name of the head-map figure next to the card, or None to leave the figure out.

    Returns:
        A `huggingface_hub.ModelCard`; `.save(path)` writes it.
    """
    report = report or {}
    where = lineage(report, config)
    base_model = where["base_model"]
    auto_class = _auto_class(config)
    metrics = report.get("metrics") or {}
    metric_name = report.get("metric_name") or "accuracy"
    pruned = metrics.get("pruned", {})
    scores = metric_rows({**report, "metric_name": metric_name})  # the task's main metric first, then its others
    datasets = _datasets(report)
    pipeline_tag = _PIPELINE_TAGS.get(auto_class)
    model_name = (repo_id or _default_name(where, report.get("task"), _get(config, "model_type"))).split("/")[-1]
    eval_results = None
    if pruned and datasets and pipeline_tag:
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=datasets[0],
                dataset_name=report.get("task") or datasets[0],
                dataset_config=report.get("task") if datasets[0] == "nyu-mll/glue" else None,
                dataset_split=split,
                metric_type=name,
                metric_value=value,
            )
            for name, split, _, value in scores
            if value is not None and math.isfinite(value)
        ]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets,
        metrics=list(dict.fromkeys(name for name, *_ in scores)) if metrics else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["pruning", "hf-prune", "structured-pruning", _get(config, "model_type")],
        model_name=model_name,
        eval_results=eval_results,
    )
    rows = _layer_rows(config)
    heads_kept = sum(int(r[1].split(" / ")[0]) for r in rows)
    heads_dense = sum(int(r[1].split(" / ")[1]) for r in rows)
    summary = _summary(where, report.get("task"), _get(config, "model_type"))
    results_rows, note = _results(report) if report else ([], "")
    stages = report.get("stages") or []
    env = report.get("environment") or {}
    template = resources.files("hf_prune").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        title=repo_id or model_name,
        summary=summary,
        results_rows=results_rows,
        measurement_note=note,
        metric_name=f"{metric_name} (lower is better)" if lower_is_better(metric_name) else metric_name,
        metric_note=report.get("metric_note"),
        metric_rows=[
            (split if name == metric_name else f"{split} ({name})", _number(teacher, 4), _number(value, 4))
            for name, split, teacher, value in scores
        ],
        structure_summary=f"{heads_kept} of {heads_dense} attention heads kept over {len(rows)} layers"
        + _hidden_note(report or {})
        + ".",
        figure_name=figure_name,
        layer_rows=rows,
        model_path=repo_id or "path/to/export",
        auto_class=auto_class,
        processor=_processor(auto_class),
        remote_code=bool(_get(config, "auto_map")),
        stage_rows=[(s["name"], _number(s["wall_time_s"], 1)) for s in stages],
        **_deployment(report, metric_name),
        environment=", ".join(f"{k} {v}" for k, v in env.items()) if env else None,
        repo_id=repo_id,
        generation=report.get("generation_sample"),
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def _deployment(report: Mapping, metric_name: str) -> dict:
    """The template's deployed-forms table (see `hf_prune.export.deploy`): header, rows, and how they were measured."""
    deployment = report.get("deployment") or {}
    table = deployment_table(deployment, metric_name) if deployment else []
    if len(table) < 2:
        return {"deploy_header": None, "deploy_rows": [], "deploy_note": None, "deploy_onnx_file": None}
    onnx = deployment.get("onnx") or {}
    int8 = onnx.get("int8") or {}
    note = (
        f"Median of {deployment.get('repeats')} runs per form at {deployment.get('seq_len')} tokens, every form "
        f"timed interleaved with the others in one process on {deployment.get('num_threads')} CPU threads (ONNX "
        f"Runtime with as many threads as PyTorch); speedups against {table[1][0]}. ONNX: opset {onnx.get('opset')}"
        + (f"; int8: `{int8.get('method')}`, {int8.get('weight_type')} weights" if int8 else "")
        + "."
    )
    machine = deployment_machine_note(deployment)
    note += f" {machine[0].upper()}{machine[1:]}." if machine else ""
    onnx_file = "onnx/model_int8.onnx" if int8 else "onnx/model.onnx"
    return {"deploy_header": table[0], "deploy_rows": table[1:], "deploy_note": note, "deploy_onnx_file": onnx_file}


def plot_head_map(config, path: str | os.PathLike) -> Path:
    """Draws which attention heads each layer kept (layers x heads grid) with the FFN width kept per layer.

    Args:
        config: a config with the per-layer shapes recorded by `hf_prune.models.surgery.record_shapes`.
        path: the PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    _, n_heads, dense_ffn = get_adapter(config).dense_shape(config)
    ffn = get_adapter(config).config_shapes(config)[1]
    n_layers = len(ffn)
    grid = [[0.0] * n_heads for _ in range(n_layers)]
    for layer in range(n_layers):
        for head in original_heads_kept(config, layer):
            grid[layer][head] = 1.0
    fig = Figure(figsize=(max(4.0, 0.35 * n_heads + 3.0), max(2.5, 0.32 * n_layers + 1.5)))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap(["#e8e8e8", "#1f5fa8"]), vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("attention head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xticks([x - 0.5 for x in range(1, n_heads)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, n_layers)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    for layer in range(n_layers):
        kept = int(sum(grid[layer]))
        ax.text(
            n_heads - 0.3, layer, f"  {kept}/{n_heads} heads, FFN {ffn[layer]}/{dense_ffn}", va="center", fontsize=8
        )
    ax.set_xlim(-0.5, n_heads - 0.5)
    ax.set_title(f"Attention heads kept (blue): {int(sum(map(sum, grid)))} of {n_layers * n_heads}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Path(path)


def _resolve_token(token: str | None) -> str:
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token found. Run `hf auth login`, set the HF_TOKEN environment variable, or pass "
            "token=... (--token on the command line)."
        )
    return token


def push_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None, api=None
) -> str:
    """Creates a model repo (if needed) and uploads an exported folder to it.

    Args:
        folder: a folder written by `hf_prune.save_pruned` (with its model card).
        repo_id: the Hub repo, e.g. `"my-org/bert-base-mnli-pruned"`.
        private: create the repo as private.
        token: a Hub token; default: the HF_TOKEN environment variable, then the cached `hf auth login` token.
        api: a `huggingface_hub.HfApi` to use (default: `HfApi(token=token)`).

    Returns:
        The URL of the repo.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Pass the folder written by hf_prune.save_pruned.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a complete hf_prune export: it lacks {', '.join(missing)}. Export the model with "
            "hf_prune.save_pruned(model, folder, tokenizer, report=...) (card=True, the default) and push that folder."
        )
    pickled = [f for f in export_files(folder) if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ValueError(f"{folder} holds pickled files {pickled}; exports are safetensors only. Remove them first.")
    if not (folder / REPORT_NAME).is_file():
        logger.warning("%s has no %s; the upload has no measured pruning report.", folder, REPORT_NAME)
    token = _resolve_token(token)
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload pruned model exported with hf-prune",
        ignore_patterns=[EVAL_CACHE_NAME],
    )
    url = str(repo_url) if isinstance(repo_url, str) and repo_url else f"{constants.ENDPOINT}/{repo_id}"
    logger.info("Uploaded %s to %s.", folder, url)
    return url


def cli_push(args) -> int:
    """`hf-prune push DIR --repo-id ID [--private] [--token T]`."""
    url = push_to_hub(args.dir, args.repo_id, private=args.private, token=args.token)
    print(f"Uploaded {args.dir} to {url}")
    return 0
