"""Causal language modeling in the pipeline: text documents packed into blocks of tokens, and perplexity.

**How blocks are cut** ([`pack_blocks`]). Every document of a split is tokenized without special tokens; the token
ids of the split's documents are concatenated in order, with the tokenizer's EOS token between two consecutive
documents (nothing between them when the tokenizer has no EOS token; empty documents are skipped), and that one
sequence is cut into consecutive blocks of `block_size` tokens: tokens `[0, B)`, `[B, 2B)`, ... Documents are not
aligned to blocks: a block may end inside a document and the next block continue it. The training split drops its
last block when it is shorter than `block_size` (every training block then has the same length, as transformers'
`run_clm.py`); validation splits keep it, so every validation token is in exactly one block. A block's labels are its
input ids: the model shifts them (position `i` predicts token `i + 1`).

**Perplexity** ([`perplexity`], [`causal_lm_nll`]) is `exp(nll_sum / token_count)`: the exponential of the
token-weighted mean negative log-likelihood over every predicted validation token, `nll_sum` summing `-log p(token |
the tokens before it in its block)` over all blocks and `token_count` counting those tokens. Each block is scored on
its own (no context carries over from the block before), so the first token of each block has no context and is not
predicted: a split of `T` tokens cut into `k` blocks scores `T - k` tokens. Perplexity depends on `block_size`
(longer blocks give more context) and on the tokenizer; lower is better.

In the Trainer's evaluation, [`nll_per_example`] (as `preprocess_logits_for_metrics`) reduces each batch's logits to
two numbers per block before anything is accumulated, and [`compute_perplexity`] (as `compute_metrics`) sums them:
the exact token-weighted perplexity, unlike `exp(eval_loss)`, which averages per-batch means.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CAUSAL_LM_METRIC",
    "pack_blocks",
    "perplexity",
    "token_nll",
    "nll_per_example",
    "compute_perplexity",
    "CausalLMCollator",
    "pad_token_id",
    "model_device",
    "causal_lm_nll",
    "dataset_perplexity",
    "TEXT_FORMATS",
    "document_column",
    "join_columns",
    "read_documents",
    "tokenize_text_splits",
    "block_size_of",
    "perplexity_note",
]

DEFAULT_BLOCK_SIZE = 128
CAUSAL_LM_METRIC = "perplexity"
IGNORE = -100  # labels the loss skips
TEXT_FORMATS = (".jsonl", ".json", ".txt")  # JSON lines (`.json` too) with the text column; plain text


# ----------------------------------------------------------------------------------------------------- pure functions
def pack_blocks(
    token_id_lists: Iterable[Sequence[int]], block_size: int, eos_id: int | None = None, keep_last: bool = False
) -> list[list[int]]:
    """Concatenates documents and cuts them into consecutive blocks of `block_size` tokens.

    Args:
        token_id_lists: the token ids of each document, in order (empty documents are skipped).
        block_size: tokens per block.
        eos_id: put between two consecutive documents (not after the last one); None puts nothing between them.
        keep_last: keep the last block when it is shorter than `block_size` (validation: every token is kept);
            False drops it (training: every block has `block_size` tokens).

    Returns:
        The blocks: `concatenation[0:B], concatenation[B:2B], ...`.

    Example: documents `[5, 6, 7]` and `[8, 9]` with `eos_id=2` concatenate to `[5, 6, 7, 2, 8, 9]`; with
    `block_size=4` that is `[[5, 6, 7, 2]]` for training and `[[5, 6, 7, 2], [8, 9]]` with `keep_last=True`.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer (tokens per block).")
    flat: list[int] = []
    for ids in token_id_lists:
        ids = [int(t) for t in ids]
        if not ids:
            continue
        if flat and eos_id is not None:
            flat.append(int(eos_id))
        flat.extend(ids)
    end = len(flat) if keep_last else len(flat) - len(flat) % block_size
    return [flat[i : min(i + block_size, end)] for i in range(0, end, block_size)]


def perplexity(nll_sum: float, token_count: float) -> float:
    """`exp(nll_sum / token_count)`: the perplexity of `token_count` predicted tokens whose negative log-likelihoods
    (natural log) sum to `nll_sum` (inf when the mean is beyond what a float holds)."""
    if not token_count > 0:
        raise ValueError(
            f"Perplexity needs at least one predicted token, got token_count={token_count}: every block's first token "
            "is not predicted, so give validation text of more than one token per block."
        )
    mean = float(nll_sum) / float(token_count)
    return math.exp(mean) if mean < 709.0 else math.inf


def token_nll(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Per block, the summed negative log-likelihood of its predicted tokens and their number.

    Position `i` predicts label `i + 1` (the labels are the input ids); a token is predicted when its label is not -100
    (and, given `attention_mask`, it is not padding). The first token of a block is never predicted.

    Args:
        logits: `(batch, length, vocab)`.
        labels: `(batch, length)` token ids, -100 where nothing is predicted (padding).
        attention_mask: `(batch, length)`, optional.

    Returns:
        `(nll_sums, counts)`, each of shape `(batch,)` (float32 sums, int64 counts).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].bool()
    sums = []
    for row, target, kept in zip(logits[:, :-1], targets, keep):  # one block at a time: one block's log-softmax
        nll = F.cross_entropy(row.float(), target.clamp_min(0), reduction="none")
        sums.append(torch.where(kept, nll, torch.zeros_like(nll)).sum())
    return torch.stack(sums), keep.sum(dim=1)


def nll_per_example(logits, labels) -> torch.Tensor:
    """`preprocess_logits_for_metrics` of a causal LM: `(batch, 2)` with each block's NLL sum and predicted-token
    count (see [`token_nll`]), so the Trainer accumulates two numbers per block instead of its logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if labels is None:
        raise ValueError("Perplexity needs `labels` in the evaluation batches (the input ids, -100 on padding).")
    sums, counts = token_nll(logits, labels)
    return torch.stack([sums, counts.to(sums.dtype)], dim=1)


def compute_perplexity(eval_pred) -> dict[str, float]:
    """`compute_metrics` of a causal LM: the perplexity of every predicted token, from [`nll_per_example`]'s rows."""
    rows = eval_pred.predictions
    rows = np.asarray(rows[0] if isinstance(rows, tuple) else rows, dtype=np.float64).reshape(-1, 2)
    return {CAUSAL_LM_METRIC: perplexity(rows[:, 0].sum(), rows[:, 1].sum())}


# ----------------------------------------------------------------------------------------------------- batches
def pad_token_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS token, else 0 (padding is masked and
    labelled -100, so its id changes nothing)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


class CausalLMCollator:
    """Pads blocks on the right: `input_ids` with `pad_token_id`, `attention_mask` with 0, `labels` with -100 (a
    row without `labels` gets its input ids).

    Args:
        pad_token_id: the id written in padded positions.
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        as_list = lambda v: torch.as_tensor(v).tolist()  # noqa: E731
        ids = [as_list(r["input_ids"]) for r in rows]
        length = max(len(x) for x in ids)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row, x in zip(rows, ids):
            pad = length - len(x)
            mask = as_list(row["attention_mask"]) if "attention_mask" in row else [1] * len(x)
            labels = as_list(row["labels"]) if "labels" in row else list(x)
            batch["input_ids"].append(x + [self.pad_token_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [IGNORE] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def model_device(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


@torch.inference_mode()
def causal_lm_nll(model, dataset, collator=None, batch_size: int = 8) -> tuple[float, int]:
    """The summed NLL of every predicted token of `dataset` and their number (see [`token_nll`]).

    The first token of each block is not predicted: `token_count` is the number of tokens minus the number of blocks
    (padding excluded). `perplexity(*causal_lm_nll(...))` is the split's perplexity.

    Args:
        model: called as `model(input_ids=..., attention_mask=...).logits` (a PyTorch causal LM or a form with that
            call, e.g. ONNX Runtime's).
        dataset: blocks with `input_ids` (and `labels`, -100 where nothing is predicted; default: the input ids).
        collator: pads a list of blocks into a batch (default: [`CausalLMCollator`] with the model's pad token).
        batch_size: blocks per forward pass.

    Returns:
        `(nll_sum, token_count)`.
    """
    if hasattr(model, "eval"):
        model.eval()
    if collator is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        collator = CausalLMCollator(pad if isinstance(pad, int) else 0)
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels, mask = batch.pop("labels"), batch["attention_mask"]
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        logits = torch.as_tensor(model(**inputs).logits).cpu()
        sums, counts = token_nll(logits, labels, mask)
        total += float(sums.double().sum())
        count += int(counts.sum())
    return total, count


def dataset_perplexity(model, dataset, collator=None, batch_size: int = 8) -> float:
    """The perplexity of `model` on blocks (see [`causal_lm_nll`])."""
    return perplexity(*causal_lm_nll(model, dataset, collator, batch_size))


# ----------------------------------------------------------------------------------------------------- data
def block_size_of(data: Mapping | None, task) -> int | None:
    """`data.block_size` of a causal-LM task (default `DEFAULT_BLOCK_SIZE`), checked; None for other tasks, which
    refuse it (they truncate to `max_seq_length` instead)."""
    value = (data or {}).get("block_size")
    if not task.is_causal_lm:
        if value is not None:
            raise ValueError(
                f"data.block_size packs text into blocks for problem_type: causal_lm, but task {task.name!r} is "
                f"{task.problem_type}: remove it (data.max_seq_length sets how its examples are truncated)."
            )
        return None
    value = DEFAULT_BLOCK_SIZE if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(
            f"data.block_size={value!r} must be an integer >= 2: the tokens of each block (its first token is not "
            "predicted), at most the model's max_position_embeddings."
        )
    return value


def _row(line: str, path: Path, i: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {i} is not valid JSON ({err}). Write one object per line.") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {i} holds {type(row).__name__} {row!r}; write one JSON object per line.")
    return row


def document_column(columns: Sequence[str]) -> str:
    """The column a causal-LM task's raw splits keep their documents in: its text column, or `text` when the task
    joins several."""
    return columns[0] if len(columns) == 1 else "text"


def join_columns(values: Sequence, columns: Sequence[str], where: str, hint: str = "") -> str:
    """One document from a row's text columns: their non-empty texts joined by a newline (`""` when none has text).

    Args:
        values: the row's values of `columns`, in order (None for a missing or null text).
        columns: the column names, for the error message.
        where: the row, for the error message.
        hint: how to fix a value that is not text.
    """
    texts = []
    for column, text in zip(columns, values):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}, column {column!r} holds {text!r}, not text. {hint}".rstrip())
        if text and text.strip():
            texts.append(text)
    return "\n".join(texts)


def read_documents(path: str | os.PathLike, task) -> list[str]:
    """The documents of a local file of a causal-LM task, in file order.

    A `.txt` file: each non-empty line is a document (lines of whitespace alone are skipped). A `.jsonl` / `.json`
    file (one JSON object per line): the task's text column of every row, or its text columns joined by a newline
    (e.g. MNLI's premise and hypothesis; empty or null texts are skipped, and rows without any text); a row without
    one of those columns is refused, naming the columns it has and the fix.

    Args:
        path: the file.
        task: the causal-LM `TaskSpec`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {path} does not exist. Check data.train_file / data.validation_file in the recipe (relative "
            "paths in a recipe file are resolved against its folder, --set paths against the current directory)."
        )
    suffix, columns = path.suffix.lower(), task.text_columns
    named = " and ".join(map(repr, columns))
    if suffix not in TEXT_FORMATS:
        raise ValueError(
            f"{path}: a causal_lm task reads {', '.join(TEXT_FORMATS)} files (JSON lines with a {named} column, "
            f"or plain text with one document per line), not {suffix or 'a file without suffix'}."
        )
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if suffix == ".txt":
                docs.append(line.rstrip("\r\n"))
                continue
            row = _row(line, path, i)
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(
                    f"{path}: line {i} has no column {missing[0]!r}; it has {sorted(row)}. {task.column_hint()}"
                )
            text = join_columns([row[c] for c in columns], columns, f"{path}: line {i}", task.column_hint())
            if text:
                docs.append(text)
    if not docs:
        raise ValueError(f"{path} holds no text: give documents in {named} (jsonl) or non-empty lines (txt).")
    return docs


def tokenize_text_splits(raw: Mapping, tokenizer, block_size: int = DEFAULT_BLOCK_SIZE, column: str = "text"):
    """Tokenizes each split's documents and packs them into blocks (see the module docstring): the `train` split
    without its last partial block, every other split with it.

    Args:
        raw: `{split: Dataset}` with the text in `column`.
        tokenizer: the model's tokenizer (its EOS token separates documents).
        block_size: tokens per block.
        column: the text column.

    Returns:
        A `DatasetDict` of blocks: `input_ids`, `attention_mask` (ones) and `labels` (the input ids).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    splits = {}
    for name, ds in raw.items():
        texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        blocks = pack_blocks(ids, block_size, eos if isinstance(eos, int) else None, keep_last=name != "train")
        if not blocks:
            tokens = sum(len(x) for x in ids) + (max(len(ids) - 1, 0) if isinstance(eos, int) else 0)
            raise ValueError(
                f"Split {name!r} has {tokens} tokens, fewer than one block of data.block_size={block_size}: give "
                "more text or set a smaller data.block_size."
            )
        if name != "train" and len(blocks) == sum(len(b) for b in blocks):
            raise ValueError(
                f"Split {name!r} has no token to predict (a block's first token is not predicted): give more text."
            )
        masks = [[1] * len(b) for b in blocks]
        splits[name] = Dataset.from_dict({"input_ids": blocks, "attention_mask": masks, "labels": blocks})
        logger.info("Split %s: %d documents, %d blocks of up to %d tokens.", name, len(texts), len(blocks), block_size)
    return DatasetDict(splits)


def perplexity_note(splits: Mapping, block_size: int) -> str:
    """How the perplexity of a report was computed, with each split's tokens, blocks and predicted tokens."""
    counts = []
    for name, ds in splits.items():
        lengths = [sum(1 for y in labels[1:] if y != IGNORE) for labels in ds["labels"]]
        tokens = sum(len(x) for x in ds["input_ids"])
        counts.append(f"{name}: {tokens:,} tokens in {len(ds):,} blocks, {sum(lengths):,} predicted")
    return (
        "perplexity = exp(mean negative log-likelihood per predicted token). The validation text is tokenized, its "
        "documents joined with the tokenizer's EOS token (when it has one) and cut into consecutive blocks of "
        f"{block_size} tokens, the last one keeping what is left; each block is scored on its own and its first token "
        f"is not predicted ({'; '.join(counts)})."
    )
