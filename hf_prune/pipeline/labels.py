"""Labels of a task's data: names or ids mapped to label ids, label names read from the data, regression scores,
and whether tag names are IOB entity tags."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LabelMap", "infer_label_names", "regression_value", "is_iob_tagging"]


def is_iob_tagging(names: Sequence[str]) -> bool:
    """Whether tag names are entity tags (`O` and `B-`/`I-`/`E-`/`S-` prefixed), so entity scores apply."""
    prefixed = [n for n in names if n != "O"]
    return bool(prefixed) and all(len(n) > 2 and n[:2] in ("B-", "I-", "E-", "S-") for n in prefixed)


def _int_like(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
    if isinstance(value, np.integer):
        return int(value)
    return None


class LabelMap:
    """Maps raw labels (names, ids, digit strings) to label ids.

    A name matches exactly, else without regard to case. An integer is a label id when the names are not themselves
    integers (`["neg", "pos"]`: `1` is `pos`); when they are (names read from integer labels such as `[1, 2, 5]`), an
    integer is matched as a name (`5` is id 2).

    Args:
        names: the label names in id order.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(str(n) for n in names)
        self.exact = {n: i for i, n in enumerate(self.names)}
        self.folded = {n.lower(): i for i, n in reversed(list(enumerate(self.names)))}
        self.numeric = all(_int_like(n) is not None for n in self.names)

    def __call__(self, value, where: str) -> int:
        text = str(value).strip() if not isinstance(value, float) or not value.is_integer() else str(int(value))
        if text in self.exact:
            return self.exact[text]
        if text.lower() in self.folded:
            return self.folded[text.lower()]
        number = _int_like(value)
        if number is not None and not self.numeric and 0 <= number < len(self.names):
            return number
        valid = ", ".join(f"{i} or {n!r}" for i, n in enumerate(self.names))
        raise ValueError(
            f"{where} has label {value!r}, which is not a known label. Valid labels: {valid}. Fix the data, drop "
            "unlabelled rows (e.g. the GLUE test split's -1), or set task.label_names to the labels the data uses."
        )


def infer_label_names(values, where: str) -> tuple[str, ...]:
    """Label names read from the labels themselves, as transformers' `run_glue.py` does: the sorted distinct values.

    Integers sort by value (`[1, 2, 5]` -> names `"1", "2", "5"`), anything else as text.

    Args:
        values: every label of the training split (token classification: every tag).
        where: the data they come from, for the error message.

    Returns:
        The label names in id order.
    """
    distinct = {v for v in values if v is not None and v != ""}
    if not distinct:
        raise ValueError(f"{where} holds no labels. Give labelled training data or set task.label_names.")
    numbers = {v: _int_like(v) for v in distinct}
    if all(n is not None for n in numbers.values()):
        names = tuple(str(n) for n in sorted(set(numbers.values())))
    else:
        floats = [v for v in distinct if isinstance(v, float)]
        if floats:
            raise ValueError(
                f"{where} has fractional labels (e.g. {floats[0]!r}): for scores set task.problem_type: regression."
            )
        names = tuple(sorted({str(v).strip() for v in distinct}))
    if len(names) < 2:
        raise ValueError(
            f"{where} has a single label value {list(names)}: a classifier needs at least two. Check "
            "task.label_column, or set task.label_names to every label of the task."
        )
    return names


def regression_value(value, where: str) -> float:
    """A regression target as a float, or an error naming where it was read."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where} has label {value!r}, which is not a number: a regression task needs numeric scores. Fix the "
            "data, or set task.problem_type to single_label_classification for class labels."
        ) from None
    if number != number:  # NaN: an unlabelled row
        raise ValueError(f"{where} has no score (NaN). Drop unlabelled rows.")
    return number
