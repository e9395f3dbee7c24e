"""The sample `prune_to_speedup` measures importance and tunes on: examples drawn from a dataset, padded into
batches of similar lengths."""

from __future__ import annotations

import torch

__all__ = ["INPUT_KEYS", "examples", "pad_collate", "batches_of"]

# the inputs a sample keeps (the model's inputs and its labels)
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels")


def examples(dataset, count: int, seed: int, main_input: str = "input_ids") -> list[dict]:
    """`count` examples drawn at random (with `seed`) from `dataset`, each reduced to `INPUT_KEYS` (`label` renamed
    `labels`); a dataset without labels or without the model's main input is refused, naming the fix."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: pass tokenized examples with labels.")
    first = dataset[0]
    if "labels" not in first and "label" not in first:
        raise ValueError(
            f"The dataset has no `labels` (or `label`) column, but the Fisher information needs the loss: its columns "
            f"are {sorted(first)}. Pass tokenized examples with their labels."
        )
    if main_input not in first:  # `input_ids`, or an image model's `pixel_values`
        raise ValueError(
            f"The dataset has no `{main_input}` column, which the model takes (its columns: {sorted(first)}); "
            + ("run the image processor on it first." if main_input == "pixel_values" else "tokenize it first.")
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    rows = []
    for i in order:
        row = dataset[int(i)]
        row = {("labels" if k == "label" else k): v for k, v in row.items()}
        rows.append({k: row[k] for k in INPUT_KEYS if k in row})
    return rows


def pad_collate(pad_id: int):
    """A collator padding `input_ids` with `pad_id` (and other keys with 0) to the longest row, adding the attention
    mask; rows of one size (images) are stacked as they are."""
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        if "input_ids" not in rows[0]:  # inputs of one size (images): stacked as they are
            return {key: torch.stack([torch.as_tensor(r[key]) for r in rows]) for key in rows[0]}
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


def batches_of(rows: list[dict], batch_size: int, collate, device) -> list[dict[str, torch.Tensor]]:
    """`rows` in batches of `batch_size` on `device`, similar lengths together (less padding, the same examples)."""
    # Similar lengths together: less padding, the same examples.
    rows = sorted(rows, key=lambda r: len(r.get("input_ids", ())))
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        out.append({k: v.to(device) for k, v in batch.items() if k in INPUT_KEYS})
    return out
