"""Tiny models and data built in code, so the suite runs offline in seconds."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

VOCAB = 64
# The start of a script for a fresh interpreter in which `import hf_prune` fails: what loads there, loads without it.
WITHOUT_HF_PRUNE = """import importlib.abc, json, sys


class NoHfPrune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "hf_prune":
            raise ModuleNotFoundError("hf_prune is blocked")


sys.meta_path.insert(0, NoHfPrune())
"""


def tiny_config(model_type: str = "bert", **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        type_vocab_size=2,
    )
    if model_type == "electra":
        kwargs["embedding_size"] = 32
    if model_type in ("roberta", "xlm-roberta"):
        kwargs.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "bert", seed: int = 0, attn_implementation: str | None = None, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForSequenceClassification.from_config(config, **kwargs)


class TinyDataset(torch.utils.data.Dataset):
    """Sequences whose label is a simple function of their tokens, so a tiny model can learn it."""

    def __init__(self, n: int = 64, seq_len: int = 12, num_labels: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
        self.labels = (self.input_ids[:, 1] + self.input_ids[:, 2]) % num_labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
        }


def batch(n: int = 4, seq_len: int = 12, seed: int = 1, pad: int = 0):
    """A random batch; the last `pad` positions of every other row are padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if pad:
        attention_mask[::2, -pad:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def train_args(output_dir, **overrides):
    from hf_prune import PruningArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return PruningArguments(**kwargs)


def mask_removed_units(model, heads: dict, neurons: dict):
    """The masked equivalent of removing units: their columns of the attention and MLP output projections set to
    zero (`{layer: [indices]}` of attention units and of neurons), nothing removed."""
    from hf_prune.pruning.units import layer_units

    with torch.no_grad():
        for lu in layer_units(model, "attention"):
            w = lu.group.output.width
            for g in heads.get(lu.layer, []):
                lu.output_linear.weight[:, g * w : (g + 1) * w] = 0
        for lu in layer_units(model, "mlp"):
            lu.output_linear.weight[:, neurons.get(lu.layer, [])] = 0
    return model


# The start of a script (`python -c`) killed when it is about to rename a file into `pruning_report.json`: what a
# crash between the writes of one export leaves behind. It defines `os` and `Path` for the rest of the script.
KILLED_BEFORE_REPORT = (
    "import os\n"
    "from pathlib import Path\n"
    "real = os.replace\n"
    "def replace(src, dst):\n"
    "    if Path(dst).name == 'pruning_report.json':\n"
    "        os._exit(9)\n"
    "    return real(src, dst)\n"
    "os.replace = replace\n"
)
