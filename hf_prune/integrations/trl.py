"""Pruning and distillation with trl's `SFTTrainer`: `PruningSFTTrainer` is `PruningMixin` in front of `SFTTrainer`,
configured by `PruningSFTConfig` (`PruningArguments` and `SFTConfig` together), as trl puts a `*Config` beside each
`*Trainer`. Needs `pip install trl`.

```python
from hf_prune.integrations.trl import PruningSFTConfig, PruningSFTTrainer

args = PruningSFTConfig(output_dir="out", pruning_method="movement", pruning_target="attention",
                        attention_granularity="head", target_sparsity=0.25, distill_alpha=0.5)
trainer = PruningSFTTrainer(model=student, args=args, teacher_model=teacher, train_dataset=text_dataset,
                            processing_class=tokenizer)
trainer.train()
trainer.prune()
```

trl prepares the data (tokenization, packing, completion-only labels); hf_prune reads the `labels` it makes: the
token-level distillation skips the positions it masks with -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from ..config import PruningArguments
from ..trainer import PruningMixin

__all__ = ["PruningSFTConfig", "PruningSFTTrainer"]


@dataclass
class PruningSFTConfig(SFTConfig, PruningArguments):
    """The arguments of `SFTConfig` (its defaults first) and of [`PruningArguments`] in one dataclass."""


class PruningSFTTrainer(PruningMixin, SFTTrainer):
    """trl's `SFTTrainer` with hf_prune's pruning and distillation (see [`PruningMixin`]); takes `teacher_model`."""
