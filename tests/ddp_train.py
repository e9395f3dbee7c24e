"""Run by test_ddp.py under `torchrun`: trains a tiny student against a teacher and dumps each rank's losses."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from utils import TinyDataset, tiny_model, train_args  # noqa: E402

from hf_prune import PruningTrainer  # noqa: E402


def main(output_dir: str, per_device_batch: int) -> None:
    args = train_args(
        output_dir,
        per_device_train_batch_size=per_device_batch,
        distill_alpha=0.5,
        learning_rate=1e-2,
        pruning_method="movement",
        target_sparsity=0.5,
        pruning_frequency=1,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
    )
    trainer = PruningTrainer(
        model=tiny_model(seed=0), args=args, teacher_model=tiny_model(seed=1), train_dataset=TinyDataset(32)
    )
    assert not isinstance(trainer.teacher, torch.nn.parallel.DistributedDataParallel)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(output_dir, f"losses-rank{rank}.json"), "w") as f:
        masks = [m.int().flatten().tolist() for m in trainer.pruner.block_masks]
        json.dump({"world_size": trainer.args.world_size, "logs": logs, "masks": masks}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
