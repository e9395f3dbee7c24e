"""Step-time overhead of PruningTrainer against a plain Trainer, on the same model and batches, in one process.

Configurations, timed in interleaved rounds (plain, movement, movement + teacher, plain, ...) so that drift of the
machine affects all alike; the median step time of each is reported with its ratio to the plain Trainer:

- `trainer`: transformers.Trainer
- `movement`: PruningTrainer with movement pruning of the attention (score accumulation every step, masks re-applied
  after every optimizer step, masks recomputed every `pruning_frequency` steps)
- `movement+teacher`: the same with distillation from a frozen teacher of the same size (its forward alone is about
  +1/3 of a training step)

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` of each run; on CPU, the peak resident set size of a fresh
subprocess that runs only that configuration (a process's RSS never shrinks, so in-process deltas would mislead).
Targets: <= 1.05x for movement tracking, <= 1.40x with distillation.

    python benchmarks/overhead.py                       # MiniLM-L6 shape (6 x 384, 12 heads), batch 16 x 128
    python benchmarks/overhead.py --layers 12 --hidden 768 --heads 12 --ffn 3072 --batch 32 \
        --json benchmarks/results/overhead_bert_base.json                                   # BERT-base shape

Results go to `--json` (default `benchmarks/results/overhead_cpu.json`, or `overhead_cuda.json` on a GPU), written
whole and atomically by this command; `--json ''` only prints them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback

from hf_prune import PruningArguments, PruningTrainer
from hf_prune.utils import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


class Batches(torch.utils.data.Dataset):
    def __init__(self, n, seq_len, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def run_once(kind, config, data, steps, batch, out):
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    common = dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if kind == "trainer":
        trainer = Trainer(model=model, args=PruningArguments(**common), train_dataset=data)
    else:
        extra = dict(pruning_method="movement", target_sparsity=0.5, pruning_frequency=10)
        teacher = None
        if kind == "movement+teacher":
            torch.manual_seed(1)
            teacher = BertForSequenceClassification(config)
            extra.update(distill_alpha=0.9, distill_temperature=2.0)
        trainer = PruningTrainer(
            model=model, args=PruningArguments(**common, **extra), train_dataset=data, teacher_model=teacher
        )
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return timer.times[2:], peak  # the first steps warm up allocators and kernels


def peak_rss_subprocess(kind, argv) -> int:
    """Peak RSS (bytes) of a fresh process that runs `kind` alone."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--steps", "4", "--rounds", "1", "--only", kind]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split("=")[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="Where to write the results (see above); '' for nowhere.")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one run, print peak RSS
    args = parser.parse_args()
    shape_argv = [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "ffn", "batch", "seq_len")
    ]

    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.ffn,
        num_labels=3,
        vocab_size=30522,
    )
    data = Batches(args.batch * args.steps, args.seq_len, config.vocab_size)
    kinds = ["trainer", "movement", "movement+teacher"]
    if args.only:
        with tempfile.TemporaryDirectory() as out:
            run_once(args.only, config, data, args.steps, args.batch, out)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(f"peak_rss={hwm_kib * 1024}")
        return
    times = {k: [] for k in kinds}
    peaks = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            for kind in kinds:
                t, peak = run_once(kind, config, data, args.steps, args.batch, out)
                times[kind].extend(t)
                if peak is not None:
                    peaks[kind].append(peak)
                print(f"round {r + 1}/{args.rounds} {kind:>17}: median step {statistics.median(t) * 1e3:8.1f} ms")
    for kind in kinds:
        if not peaks[kind]:
            peaks[kind].append(peak_rss_subprocess(kind, shape_argv))
    base = statistics.median(times["trainer"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device,
        "threads": torch.get_num_threads(),
        "shape": {k: v for k, v in vars(args).items() if k not in ("json", "only")},
        "peak_memory_method": "torch.cuda.max_memory_allocated of each run"
        if device == "cuda"
        else "VmHWM of a fresh process running one configuration for 4 steps",
        "results": {},
    }
    print(f"\n{'configuration':>17} | {'median step (ms)':>16} | {'ratio':>6} | {'peak memory (MiB)':>17}")
    print("-" * 66)
    for kind in kinds:
        med = statistics.median(times[kind])
        peak = max(peaks[kind]) / 2**20
        results["results"][kind] = {"median_step_s": med, "ratio": med / base, "peak_memory_mib": peak}
        print(f"{kind:>17} | {med * 1e3:16.1f} | {med / base:6.3f} | {peak:17.1f}")
    print("\ntargets: movement <= 1.05x, movement+teacher <= 1.40x")
    path = args.json if args.json is not None else str(RESULTS / f"overhead_{device}.json")
    if path:
        write_json_atomic(path, results)
        print(f"results written to {path}")


if __name__ == "__main__":
    main()
